"""CUDA-aware MPI: whether the MPI library takes CUDA device buffers, and which path the
cross-node sums take.

Three paths (:func:`cross_node_path`, printed by ``daso info``):

* ``host (no CUDA)``: CPU tensors go to MPI as they are;
* ``cuda-aware MPI (...)``: the wire buffer lives on the GPU and MPI gets the device pointer;
* ``staged through pinned host memory (...)``: the wire buffer is pinned host memory, filled
  and emptied by copies on a side stream (what every CUDA run did before this module).

Detection (:func:`detect_cuda_support`), after ``MPI_Init``: the library's own answer where
it has one, called through ctypes in the library mpi4py loaded (:func:`query_function`:
MPICH's ``MPIX_GPU_query_support``, else ``MPIX_Query_cuda_support()`` of Open MPI, MVAPICH2
and MPICH); otherwise the vendor's run-time switch (Cray MPICH
``MPICH_GPU_SUPPORT_ENABLED=1``, MVAPICH2 ``MV2_USE_CUDA=1``, Intel MPI ``I_MPI_OFFLOAD=1``,
Open MPI ``OMPI_MCA_opal_cuda_support=true``, MPICH ``MPIR_CVAR_ENABLE_GPU=1``).
``trainer.cuda_aware_mpi`` (``auto``/``on``/``off``) overrides it: some Open MPI 5 builds
answer 0 although they take device buffers (open-mpi/ompi#11070, #13130), so ``on`` is the
fix where ``ompi_info`` shows CUDA support and ``daso info`` says not detected.

Two limits of what MPI libraries do with device buffers shape the device path:

* 16-bit wires (bfloat16, float16) are summed by a user-defined ``MPI_Op`` whose body is a
  torch add over *host* memory. Open MPI's ``cuda`` coll component stages reductions through
  host buffers before it calls the op, so under Open MPI every wire dtype can go as device
  buffers; under other libraries only a float32 wire does (``MPI_SUM`` on ``MPI_FLOAT`` is
  the library's own), and 16-bit wires stay staged through pinned host memory.
* Open MPI's CUDA support covers blocking collectives, not non-blocking ones, so device
  buffers always go through the blocking ``MPI_Allreduce`` on the communication thread
  (:class:`~daso.comm.mpi.CrossNodeSum` ignores ``poll_interval`` on that path).

None of the device path has run on a GPU in this project's tests (no GPU there); the
decision logic is unit-tested with stubs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from daso.errors import ConfigError

#: Values of ``trainer.cuda_aware_mpi``.
SETTINGS = ("auto", "on", "off")

#: (vendor, environment variable, values that mean on): the run-time switches of each MPI's
#: CUDA support, read only when the library has no CUDA query function.
ENV_SWITCHES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Cray MPICH", "MPICH_GPU_SUPPORT_ENABLED", ("1",)),
    ("MVAPICH2", "MV2_USE_CUDA", ("1",)),
    ("Intel MPI", "I_MPI_OFFLOAD", ("1",)),
    ("Open MPI", "OMPI_MCA_opal_cuda_support", ("1", "true", "yes")),
    ("MPICH", "MPIR_CVAR_ENABLE_GPU", ("1", "true", "yes")),
)

# (marker in MPI_Get_library_version, vendor), most specific first (Cray MPICH and MVAPICH2
# also say "MPICH").
_VENDORS = (
    ("CRAY MPICH", "Cray MPICH"),
    ("MVAPICH", "MVAPICH2"),
    ("INTEL(R) MPI", "Intel MPI"),
    ("OPEN MPI", "Open MPI"),
    ("MPICH", "MPICH"),
)


@dataclasses.dataclass(frozen=True)
class CudaSupport:
    """What is known about the MPI library's CUDA support.

    Attributes:
        aware: whether MPI takes CUDA device buffers.
        how: how that was found, for messages (e.g. ``"Open MPI MPIX_Query_cuda_support"``).
        vendor: ``"Open MPI"``, ``"MPICH"``, ``"Cray MPICH"``, ``"MVAPICH2"``,
            ``"Intel MPI"`` or ``"unknown MPI"``.
    """

    aware: bool
    how: str
    vendor: str = "unknown MPI"

    @property
    def host_reductions(self) -> bool:
        """Whether the library stages reductions of device buffers through host buffers before
        it calls the op (Open MPI's ``cuda`` coll component), so a user-defined op sees host
        memory."""
        return self.vendor == "Open MPI"


@dataclasses.dataclass(frozen=True)
class CrossNodePath:
    """How one cross-node sum hands its buffer to MPI.

    Attributes:
        device_buffers: whether the wire buffer is on the GPU and MPI gets the device pointer.
        description: one line for ``daso info`` and logs.
    """

    device_buffers: bool
    description: str


def vendor_of(library_version: str) -> str:
    """The MPI vendor named by ``MPI_Get_library_version``'s text (``"unknown MPI"`` if none)."""
    text = library_version.upper()
    for marker, vendor in _VENDORS:
        if marker in text:
            return vendor
    return "unknown MPI"


#: ``MPIX_GPU_SUPPORT_CUDA`` of MPICH's ``mpi.h`` (the ``gpu_type`` of ``MPIX_GPU_query_support``).
MPIX_GPU_SUPPORT_CUDA = 0


def _gpu_query(function: Any) -> Callable[[], int]:
    """``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &ok)`` as a no-argument query; an error
    code counts as no support."""
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]

    def query() -> int:
        supported = ctypes.c_int(0)
        code = function(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(supported))
        return supported.value if code == 0 else 0

    query.__name__ = "MPIX_GPU_query_support"
    return query


def query_function(paths: list[str] | None = None) -> Callable[[], int] | None:
    """The loaded MPI library's own CUDA query, through ctypes, or ``None``.

    MPICH's ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, ...)`` where it exists (MPICH
    before 4.0 built without GPU support fails an assertion inside ``MPIX_Query_cuda_support``;
    the generic query returns an error code instead), else ``MPIX_Query_cuda_support()``
    (Open MPI, MVAPICH2, MPICH). The result's ``__name__`` is the function's name.

    Looks in the shared objects ``paths`` (default: mpi4py's extension module, whose
    dependencies include ``libmpi``; then every ``libmpi*`` mapped into this process), then in
    the process's global symbols. Call the result only after ``MPI_Init``.
    """
    if paths is None:
        paths = []
        try:
            from mpi4py import MPI

            paths.append(MPI.__file__)
        except ImportError:
            pass
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:
                mapped = {line.split()[-1] for line in maps if "libmpi" in line}
            paths += sorted(p for p in mapped if p.startswith("/"))
        except OSError:
            pass
    for path in [*paths, None]:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        generic = getattr(lib, "MPIX_GPU_query_support", None)
        if generic is not None:
            return _gpu_query(generic)
        function = getattr(lib, "MPIX_Query_cuda_support", None)
        if function is not None:
            function.restype = ctypes.c_int
            function.argtypes = []
            return function
    return None


def detect_cuda_support(
    library_version: str,
    query: Callable[[], int] | None,
    env: Mapping[str, str],
) -> CudaSupport:
    """Whether the MPI library takes CUDA device buffers.

    The library's own query decides when it exists (its 0 is trusted too: it means no CUDA
    build, or CUDA support switched off); otherwise the vendor's switch in
    :data:`ENV_SWITCHES`.

    Args:
        library_version: ``MPI.Get_library_version()``.
        query: :func:`query_function`'s result, returning nonzero for CUDA support (``None``:
            the library has no such function).
        env: the environment (the vendors' switches).

    Returns:
        The :class:`CudaSupport`.
    """
    vendor = vendor_of(library_version)
    if query is not None:
        try:
            answer = int(query())
        except Exception as err:  # noqa: BLE001 - a broken extension: treat it as "no"
            return CudaSupport(False, f"{vendor} CUDA query failed: {err}", vendor)
        name = getattr(query, "__name__", "")
        how = f"{vendor} {name if name.startswith('MPIX_') else 'MPIX_Query_cuda_support'}"
        return CudaSupport(bool(answer), how if answer else f"{how}() = 0", vendor)
    for switch_vendor, name, on in ENV_SWITCHES:
        if switch_vendor != vendor:
            continue
        value = env.get(name)
        if value is not None and value.strip().lower() in on:
            return CudaSupport(True, f"{name}={value} ({vendor})", vendor)
        return CudaSupport(False, f"{vendor} without a CUDA query; {name} unset", vendor)
    return CudaSupport(False, f"{vendor} without a CUDA query", vendor)


@functools.cache
def detect_loaded_mpi() -> CudaSupport:
    """:func:`detect_cuda_support` for the MPI library mpi4py loaded (initialises MPI;
    cached: the answer does not change within a process)."""
    from mpi4py import MPI

    return detect_cuda_support(MPI.Get_library_version(), query_function(), os.environ)


def cross_node_path(
    setting: str,
    device: torch.device | str,
    wire_dtype: torch.dtype | None = None,
    detect: Callable[[], CudaSupport] = detect_loaded_mpi,
) -> CrossNodePath:
    """Which path a cross-node sum of ``wire_dtype`` vectors on ``device`` takes.

    ==========  ==================  =========================================================
    device      setting             path
    ==========  ==================  =========================================================
    CPU         any                 host (no CUDA)
    CUDA        off                 staged through pinned host memory
    CUDA        auto, not detected  staged through pinned host memory
    CUDA        auto detected / on  device buffers (float32 wire, or any wire under Open MPI);
                                    a 16-bit wire elsewhere stays staged (see module doc)
    ==========  ==================  =========================================================

    Args:
        setting: ``"auto"``, ``"on"`` or ``"off"`` (``trainer.cuda_aware_mpi``).
        device: where the summed vectors live.
        wire_dtype: dtype on the wire; ``None`` when not known (``daso info``): the
            description then covers both kinds of wire.
        detect: returns the library's :class:`CudaSupport` (called only for ``auto``/``on``
            on CUDA; ``on`` still asks it for the vendor).

    Raises:
        ConfigError: ``setting`` is not one of :data:`SETTINGS`.
    """
    if setting not in SETTINGS:
        raise ConfigError(
            f"trainer.cuda_aware_mpi is {setting!r}; use one of {', '.join(SETTINGS)}"
        )
    if torch.device(device).type != "cuda":
        return CrossNodePath(False, "host (no CUDA)")
    staged = "staged through pinned host memory"
    if setting == "off":
        return CrossNodePath(False, f"{staged} (trainer.cuda_aware_mpi: off)")
    support = detect()
    if setting == "on":
        support = CudaSupport(True, "trainer.cuda_aware_mpi: on", support.vendor)
    if not support.aware:
        return CrossNodePath(False, f"{staged} (CUDA-aware MPI not detected: {support.how})")
    aware = f"cuda-aware MPI ({support.how})"
    if support.host_reductions or wire_dtype == torch.float32:
        return CrossNodePath(True, aware)
    if wire_dtype is None:
        return CrossNodePath(False, f"{aware} for float32 wires; 16-bit wires {staged}")
    wire = str(wire_dtype).removeprefix("torch.")
    return CrossNodePath(
        False,
        f"{staged}: the {wire} wire's sum is an op on host memory under {support.vendor} "
        f"({aware}); a float32 wire would hand MPI device buffers",
    )
