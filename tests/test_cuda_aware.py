"""CUDA-aware MPI: detection (stubs for the library's query and the environment) and the path
cross-node buffers take (auto/on/off x detected or not x CUDA or CPU). No GPU here, so the
device path itself is not run."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from daso.comm import CrossNodeSum
from daso.comm.cuda_aware import (
    MPIX_GPU_SUPPORT_CUDA,
    CudaSupport,
    _gpu_query,
    cross_node_path,
    detect_cuda_support,
    query_function,
    vendor_of,
)
from daso.errors import ConfigError

OPEN_MPI = "Open MPI v5.0.7, package: Open MPI builder Distribution, ident: 5.0.7"
MPICH = "MPICH Version:      4.2.0\nMPICH Release date: Fri Feb  9 2024"
CRAY = "MPI VERSION    : CRAY MPICH version 8.1.28.29 (ANL base 3.4a2)"
MVAPICH = "MVAPICH2 Version      :\t2.3.7\nMVAPICH2 Release date :\tWed March 02 22:00:00 EST 2022"


@pytest.mark.parametrize(
    "text, vendor",
    [
        (OPEN_MPI, "Open MPI"),
        (MPICH, "MPICH"),
        (CRAY, "Cray MPICH"),
        (MVAPICH, "MVAPICH2"),
        ("Intel(R) MPI Library 2021.13 for Linux* OS", "Intel MPI"),
        ("SomeMPI 1.0", "unknown MPI"),
    ],
)
def test_vendor_from_library_version(text, vendor):
    assert vendor_of(text) == vendor


def test_library_query_decides_when_it_exists():
    support = detect_cuda_support(OPEN_MPI, lambda: 1, {})
    assert support.aware and support.how == "Open MPI MPIX_Query_cuda_support"
    assert support.host_reductions
    # its 0 is trusted over a vendor switch (a build without CUDA)
    support = detect_cuda_support(MPICH, lambda: 0, {"MPIR_CVAR_ENABLE_GPU": "1"})
    assert not support.aware and "MPIX_Query_cuda_support() = 0" in support.how


@pytest.mark.parametrize(
    "text, env, aware",
    [
        (CRAY, {"MPICH_GPU_SUPPORT_ENABLED": "1"}, True),
        (CRAY, {"MPICH_GPU_SUPPORT_ENABLED": "0"}, False),
        (CRAY, {"MV2_USE_CUDA": "1"}, False),  # another vendor's switch means nothing here
        (MVAPICH, {"MV2_USE_CUDA": "1"}, True),
        (OPEN_MPI, {"OMPI_MCA_opal_cuda_support": "true"}, True),
        (MPICH, {"MPIR_CVAR_ENABLE_GPU": "1"}, True),
        (MPICH, {}, False),
        ("SomeMPI 1.0", {"MPICH_GPU_SUPPORT_ENABLED": "1"}, False),
    ],
)
def test_vendor_switches_without_the_query(text, env, aware):
    support = detect_cuda_support(text, None, env)
    assert support.aware is aware
    if aware:
        assert next(iter(env)) in support.how


def test_query_function_finds_the_loaded_mpi():
    """This venv's MPI (MPICH or Open MPI from PyPI) has a CUDA query; built without CUDA,
    it says 0."""
    query = query_function()
    assert query is not None and query() == 0
    assert query.__name__ in ("MPIX_GPU_query_support", "MPIX_Query_cuda_support")
    support = detect_cuda_support(MPI.Get_library_version(), query, {})
    assert not support.aware and support.how.endswith(f"{query.__name__}() = 0")


@pytest.mark.parametrize("code, flag, answer", [(0, 1, 1), (0, 0, 0), (15, 1, 0)])
def test_mpich_generic_query_asks_for_cuda_and_an_error_means_no(code, flag, answer):
    asked = []

    def fake(gpu_type, supported):  # MPIX_GPU_query_support(int, int *)
        asked.append(gpu_type)
        supported._obj.value = flag
        return code

    query = _gpu_query(fake)
    assert query() == answer and asked == [MPIX_GPU_SUPPORT_CUDA] == [0]
    support = detect_cuda_support(MPICH, query, {})
    assert support.aware is bool(answer) and "MPICH MPIX_GPU_query_support" in support.how


def test_a_failing_query_counts_as_not_aware():
    def broken():
        raise OSError("symbol resolved to a stub")

    support = detect_cuda_support(OPEN_MPI, broken, {"OMPI_MCA_opal_cuda_support": "true"})
    assert not support.aware and "failed: symbol resolved to a stub" in support.how


DETECTED = CudaSupport(True, "MPICH MPIX_Query_cuda_support", "MPICH")
OMPI = CudaSupport(True, "Open MPI MPIX_Query_cuda_support", "Open MPI")
ABSENT = CudaSupport(False, "MPICH MPIX_Query_cuda_support() = 0", "MPICH")


def never():
    raise AssertionError("detection must not run here")


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
@pytest.mark.parametrize("support", [DETECTED, ABSENT])
def test_cpu_tensors_always_go_to_mpi_from_host(setting, support):
    path = cross_node_path(setting, "cpu", torch.float32, detect=never)
    assert path == type(path)(False, "host (no CUDA)")


@pytest.mark.parametrize(
    "setting, support, wire, device_buffers, words",
    [
        ("off", DETECTED, torch.float32, False, "(trainer.cuda_aware_mpi: off)"),
        ("auto", ABSENT, torch.float32, False, "CUDA-aware MPI not detected"),
        ("auto", DETECTED, torch.float32, True, "cuda-aware MPI (MPICH MPIX_Query_cuda_support)"),
        ("on", ABSENT, torch.float32, True, "cuda-aware MPI (trainer.cuda_aware_mpi: on)"),
        ("on", DETECTED, torch.float32, True, "trainer.cuda_aware_mpi: on"),
        # a 16-bit wire's sum is an op on host memory: device buffers only under Open MPI
        ("auto", DETECTED, torch.bfloat16, False, "bfloat16 wire's sum is an op on host"),
        ("auto", OMPI, torch.bfloat16, True, "cuda-aware MPI (Open MPI"),
        ("auto", DETECTED, None, False, "for float32 wires; 16-bit wires staged"),
    ],
)
def test_cuda_decision_table(setting, support, wire, device_buffers, words):
    detect = never if setting == "off" else (lambda: support)
    path = cross_node_path(setting, torch.device("cuda", 0), wire, detect=detect)
    assert path.device_buffers is device_buffers
    assert words in path.description
    if not device_buffers:
        assert "pinned host memory" in path.description


def test_bad_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.cuda_aware_mpi is 'yes'; use one of auto"):
        cross_node_path("yes", "cpu")


def test_cpu_cross_node_sum_keeps_the_host_path():
    cross = CrossNodeSum(MPI.COMM_SELF, 8, torch.bfloat16, "cpu", cuda_aware_mpi="on")
    try:
        assert not cross.path.device_buffers and cross.wire.device.type == "cpu"
        flat = torch.arange(8, dtype=torch.float32)
        assert torch.equal(cross.allreduce(flat), flat)
    finally:
        cross.close()
