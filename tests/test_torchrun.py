"""What the topology layer asks of MPI at start: under torchrun, one node without an MPI world
(every process an MPI singleton) and a clear error for several nodes, whose cross-node layer
needs MPI; MPI_THREAD_MULTIPLE wherever MPI is called from a communication thread."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
from mpi4py import MPI

from daso.errors import TopologyError
from daso.topology import (
    check_torchrun_single_node,
    detect_topology,
    read_launcher_env,
    require_thread_multiple,
)

from mpi_harness import ROOT, mpi_env

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def torchrun_env(rank, world, local_world, group_rank=0, groups=1, **extra):
    """What torchrun gives worker ``rank`` of ``world`` (``local_world`` per node)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank % local_world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "GROUP_RANK": str(group_rank),
        "GROUP_WORLD_SIZE": str(groups),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        **extra,
    }


class _Singleton:
    """The MPI world a torchrun process sees: itself alone."""

    def Get_rank(self):  # noqa: N802 - mpi4py's names
        return 0

    def Get_size(self):  # noqa: N802
        return 1

    def allgather(self, value):
        raise AssertionError("MPI must not be used to build a torchrun world")


def test_torchrun_on_one_node_is_one_node_without_mpi():
    topo = detect_topology(_Singleton(), torchrun_env(1, 2, 2))
    assert (topo.rank, topo.world_size, topo.num_nodes, topo.local_rank) == (1, 2, 1, 1)
    assert topo.source == "torchrun" and topo.ranks_per_node == [2]


@pytest.mark.parametrize(
    "env",
    [
        torchrun_env(3, 4, 2, group_rank=1, groups=2),  # the second node of two
        torchrun_env(0, 4, 2, group_rank=0, groups=2),  # the first node of two
        {k: v for k, v in torchrun_env(0, 4, 2).items() if not k.startswith("GROUP_")},
    ],
)
def test_multi_node_torchrun_says_the_cross_node_layer_needs_mpi(env):
    with pytest.raises(TopologyError) as caught:
        detect_topology(_Singleton(), env)
    message = str(caught.value)
    assert "torchrun spans several nodes" in message and "WORLD_SIZE=4" in message
    assert "cross-node layer runs over MPI" in message
    assert "mpirun/mpiexec or srun --mpi=pmi2" in message
    with pytest.raises(TopologyError, match="torchrun spans several nodes"):
        check_torchrun_single_node(read_launcher_env(env), env)


def test_torchrun_with_an_override_of_several_nodes_fails_clearly():
    env = torchrun_env(0, 2, 2, DASO_RANKS_PER_NODE="1")
    with pytest.raises(TopologyError, match="emulates several nodes.*mpiexec -n 2"):
        detect_topology(_Singleton(), env)
    topo = detect_topology(_Singleton(), torchrun_env(0, 2, 2, DASO_RANKS_PER_NODE="2"))
    assert topo.num_nodes == 1


def readme_torchrun_command():
    """The command of the README's "torchrun, one node" row in its Launching table."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^\| torchrun, one node \| `([^`]+)` \|", readme, re.M)
    assert found, "README's Launching table lacks the 'torchrun, one node' row"
    return shlex.split(found.group(1))


def test_readme_torchrun_row_is_the_command_tested():
    assert readme_torchrun_command() == [
        "torchrun",
        "--nproc-per-node",
        "2",
        "-m",
        "daso.cli",
        "train",
        "--config",
        "configs/mnist_cnn_daso.yaml",
    ]


@pytest.mark.multiprocess
def test_readme_torchrun_command_trains_on_one_node(tmp_path):
    """The README's row, for real (the venv's torchrun), shortened to one epoch of 512 images
    (DASO's warm-up and cool-down in windows of 4 steps)."""
    sets = [
        "trainer.epochs=1",
        "strategy.window_steps=4",
        "data.train_subset=512",
        "data.val_subset=256",
        "trainer.progress=false",
        f"trainer.output_dir={tmp_path / 'run'}",
    ]
    command = [TORCHRUN, *readme_torchrun_command()[1:]]
    command += [arg for item in sets for arg in ("--set", item)]
    result = subprocess.run(
        command,
        env=mpi_env(None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert re.search(r"done: 1 epochs, final val accuracy \d\.\d{4}, results in ", lines[-1]), (
        output
    )


def stub_mpi(provided):
    """A stand-in for ``mpi4py.MPI`` whose ``Query_thread()`` answers ``provided``."""
    return types.SimpleNamespace(
        THREAD_SINGLE=0,
        THREAD_FUNNELED=1,
        THREAD_SERIALIZED=2,
        THREAD_MULTIPLE=3,
        Query_thread=lambda: provided,
    )


def test_thread_multiple_passes():
    require_thread_multiple(stub_mpi(3))


def test_thread_serialized_fails_naming_the_level_and_the_fix():
    with pytest.raises(TopologyError) as caught:
        require_thread_multiple(stub_mpi(2))
    message = str(caught.value)
    assert "MPI provides MPI_THREAD_SERIALIZED" in message
    assert "needs MPI_THREAD_MULTIPLE" in message
    assert "--enable-mpi-thread-multiple" in message and "mpi4py.rc.thread_level" in message


def test_this_venvs_mpi_gives_thread_multiple():
    require_thread_multiple(MPI)
