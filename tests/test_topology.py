"""Topology: each launcher's variables, emulated and uneven layouts, clear errors, daso info."""

from __future__ import annotations

import socket
import sys

import pytest

from daso.errors import TopologyError
from daso.topology import (
    LauncherInfo,
    Topology,
    detect_topology,
    layout_from_keys,
    layout_from_override,
    read_launcher_env,
    resolve_topology,
    with_slurm_step_ids,
)

from mpi_harness import run_command


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {
                "RANK": "5",
                "WORLD_SIZE": "8",
                "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "4",
                "GROUP_RANK": "1",
            },
            ("torchrun", 5, 8, 1, 4, 1),
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            ("openmpi", 3, 4, 1, 2, None),
        ),
        (
            {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"},
            ("mpich", 2, 3, 0, 1, None),
        ),
        (
            {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1"},
            ("slurm", 6, 8, 2, None, 1),
        ),
        ({}, ("none", 0, 1, 0, 1, None)),
    ],
)
def test_launcher_variables_parse(env, expected):
    info = read_launcher_env(env)
    assert (
        info.source,
        info.rank,
        info.world_size,
        info.local_rank,
        info.local_world_size,
        info.node_id,
    ) == expected


def test_launcher_errors_name_the_variables():
    with pytest.raises(TopologyError, match="PMI_RANK=.x."):
        read_launcher_env({"PMI_RANK": "x", "PMI_SIZE": "2"})
    with pytest.raises(
        TopologyError, match=r"rank 4 is not in \[0, world size 4\).*SLURM_PROCID=4"
    ):
        read_launcher_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})


@pytest.mark.parametrize(
    "spec, world, nodes",
    [
        ("2", 4, [0, 0, 1, 1]),
        ("1", 2, [0, 1]),
        ("2,1", 3, [0, 0, 1]),
        ("1,3", 4, [0, 1, 1, 1]),
        ("4", 4, [0, 0, 0, 0]),
    ],
)
def test_override_layouts(spec, world, nodes):
    assert layout_from_override(spec, world) == nodes


@pytest.mark.parametrize(
    "spec, world, words",
    [
        ("3", 4, "does not divide 4 ranks"),
        ("2,1", 4, "holds 3 ranks but the job has 4"),
        ("two", 4, "expected an integer"),
        ("0", 4, "at least one rank"),
    ],
)
def test_bad_override_is_a_clear_error(spec, world, words):
    with pytest.raises(TopologyError, match=words) as err:
        layout_from_override(spec, world)
    assert "DASO_RANKS_PER_NODE" in str(err.value)


def test_layout_from_hostnames_numbers_nodes_by_first_rank():
    assert layout_from_keys(["b", "b", "a", "a", "c"]) == [0, 0, 1, 1, 2]
    assert layout_from_keys(["a", "b", "a", "b"]) == [0, 1, 0, 1]  # non-contiguous ranks


def test_uneven_topology_groups():
    topo = Topology(rank=2, world_size=5, node_of_rank=(0, 0, 0, 1, 1), hostname="h")
    assert topo.num_nodes == 2 and topo.ranks_per_node == [3, 2]
    assert topo.local_rank == 2 and topo.local_world_size == 3
    assert topo.num_cross_groups == 2
    assert topo.cross_group_ranks(0) == [0, 3] and topo.cross_group_ranks(1) == [1, 4]
    with pytest.raises(ValueError, match="C_2 does not exist"):
        topo.cross_group_ranks(2)
    assert "cross_group=none" in topo.describe()


def test_non_contiguous_nodes_get_the_right_local_ranks():
    topo = Topology(rank=3, world_size=4, node_of_rank=(0, 1, 0, 1), hostname="h")
    assert (
        topo.node_ranks == [1, 3] and topo.local_rank == 1 and topo.cross_group_ranks(1) == [2, 3]
    )


def test_launcher_local_rank_disagreeing_with_layout_is_an_error():
    info = LauncherInfo(
        "openmpi",
        1,
        2,
        local_rank=1,
        local_world_size=2,
        variables=(("OMPI_COMM_WORLD_LOCAL_RANK", "1"),),
    )
    with pytest.raises(TopologyError, match="OMPI_COMM_WORLD_LOCAL_RANK=1"):
        resolve_topology(info, ["host-a", "host-b"], None, "host-b")
    topo = resolve_topology(info, ["host-a", "host-a"], None, "host-a")
    assert topo.local_rank == 1 and topo.source == "hostname"


def test_daso_info_prints_two_nodes_of_two_ranks():
    result = run_command([sys.executable, "-m", "daso.cli", "info"], 4, "2", timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 node(s), ranks per node [2, 2], world size 4" in out
    assert "node 0: ranks [0, 1]" in out and "node 1: ranks [2, 3]" in out
    assert "cross-node group C_0: ranks [0, 2]" in out and "C_1: ranks [1, 3]" in out
    for rank in range(4):
        assert f"rank {rank}/4 host" in out
    assert out.count("backend=gloo") == 4


def test_daso_info_with_impossible_layout_fails_clearly():
    result = run_command([sys.executable, "-m", "daso.cli", "info"], 4, "3", timeout=120)
    assert result.returncode != 0
    assert "DASO_RANKS_PER_NODE='3' with world size 4" in result.stderr
    assert "does not divide" in result.stderr


class _GatherComm:
    """A stand-in MPI world of ``len(keys)`` ranks seen from ``rank``: ``allgather`` returns
    the other ranks' keys from ``keys`` and this rank's own key."""

    def __init__(self, rank, keys):
        self.rank, self.keys = rank, keys

    def Get_rank(self):  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self):  # noqa: N802
        return len(self.keys)

    def allgather(self, key):
        return [key if r == self.rank else k for r, k in enumerate(self.keys)]


def _srun_pmi2_env(rank, node, local, world=4):
    """What ``srun --mpi=pmi2`` gives task ``rank``: PMI's rank and size and Slurm's ids."""
    return {
        "PMI_RANK": str(rank),
        "PMI_SIZE": str(world),
        "PMI_FD": "11",
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(world),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
    }


def test_srun_pmi2_layout_comes_from_slurm_node_ids_even_on_one_host():
    """srun --mpi=pmi2 sets PMI_RANK (the MPICH row wins) and no MPICH local rank: the nodes
    still come from SLURM_NODEID, so two slurmd on one host are two nodes."""
    host = socket.gethostname()
    keys = [(0, host), (0, host), (1, host), (1, host)]
    topo = detect_topology(_GatherComm(3, keys), _srun_pmi2_env(3, node=1, local=1))
    assert topo.ranks_per_node == [2, 2] and topo.source == "slurm"
    assert topo.node_rank == 1 and topo.local_rank == 1


def test_slurm_ids_of_a_different_world_are_ignored_and_never_mixed():
    """mpiexec inside a batch step: every rank inherits SLURM_PROCID=0, so only rank 0's
    Slurm ids match its own rank; all ranks then group by host name."""
    env = {**_srun_pmi2_env(0, node=0, local=0), "MPI_LOCALRANKID": "0"}
    host = socket.gethostname()
    keys = [(0, host), (None, host), (None, host), (None, host)]
    topo = detect_topology(_GatherComm(0, keys), env)
    assert topo.ranks_per_node == [4] and topo.source == "hostname"
    other = {**_srun_pmi2_env(2, node=0, local=0), "SLURM_PROCID": "0", "MPI_LOCALRANKID": "2"}
    assert with_slurm_step_ids(read_launcher_env(other), other).node_id is None
