"""A careless or hostile user: bad input seen by one rank only, an outside process on the
rendezvous store, a rank that stops beating. (A warning every rank would repeat is printed once:
tests/test_faults_multiprocess.py's asynchronous stop checks it.)"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from daso.comm.control import LOST_KEY, Heartbeat, sign, verify
from daso.topology import Topology, _rendezvous_store

from mpi_harness import mpi_env, train_args

SHORT = ("data.train_subset=512", "data.val_subset=128", "trainer.epochs=1")


def test_bad_input_on_one_rank_only_ends_the_whole_job_with_exit_2(tmp_path):
    """Rank 1 cannot read its config (a path missing on its node): it says so, rank 0 (whose
    input is fine) does not wait for it forever, and the job exits 2 within seconds."""
    good = train_args("mnist_cnn_ddp.yaml", tmp_path / "run", *SHORT)
    bad = [a.replace("mnist_cnn_ddp.yaml", "missing_on_this_node.yaml") for a in good]
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = {**mpi_env(None), "DASO_RANKS_PER_NODE": "1"}
    began = time.monotonic()
    result = subprocess.run(
        [mpiexec, "-n", "1", *good, ":", "-n", "1", *bad],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - began
    assert result.returncode == 2, result.stderr
    assert elapsed < 60, elapsed
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "[rank 1]" in errors[0] and "missing_on_this_node.yaml does not exist" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# -- the rendezvous store ------------------------------------------------------------------------
def one_host(world: int = 1) -> Topology:
    return Topology(rank=0, world_size=world, node_of_rank=(0,) * world, source="test")


class LoneComm:
    """An MPI communicator stand-in for rank 0 of ``size`` ranks, the others not started."""

    def __init__(self, size: int) -> None:
        self.size = size

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name
        return self.size

    def bcast(self, value, root=0):
        return value


def outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_the_store_of_a_one_host_job_listens_on_loopback_only_under_a_random_namespace():
    timeout = datetime.timedelta(seconds=10)
    store, prefix = _rendezvous_store(one_host(), {}, None, timeout)
    other_store, other_prefix = _rendezvous_store(one_host(), {}, None, timeout)
    assert store.host == "127.0.0.1"
    assert prefix.startswith("daso-") and len(prefix) == len("daso-") + 32 + 1
    assert prefix != other_prefix
    address = outside_address()
    if address is not None:  # the port is not reachable from the network
        with pytest.raises(OSError), socket.create_connection((address, store.port), 2):
            pass
    beat = Heartbeat(store.host, store.port, 0, 1, interval=0.05, prefix=prefix)
    time.sleep(0.3)
    beat.close()
    outsider = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timeout)
    assert not outsider.check(["daso/heartbeat/0"])  # the names an outsider could guess
    assert not outsider.check(["daso/stop"])
    assert dist.PrefixStore(prefix, outsider).add("daso/heartbeat/0", 0) > 0
    del other_store


def test_rank_0_declares_a_rank_lost_that_stopped_beating_and_every_rank_names_it(caplog):
    timeout = datetime.timedelta(seconds=10)
    store, prefix = _rendezvous_store(one_host(3), {}, LoneComm(3), timeout)
    keys = dist.PrefixStore(prefix, store)
    secret = b"s" * 32
    with caplog.at_level(logging.ERROR, logger="daso"):
        watcher = Heartbeat(
            store.host, store.port, 0, 3, 0.05, prefix, lost_after=0.5, secret=secret
        )
        keys.add("daso/heartbeat/1", 1)  # rank 1 beat once, then died
        keys.set("daso/done/2", sign(secret, "daso/done/2", "1"))  # rank 2 finished, said so
        deadline = time.monotonic() + 10
        while not watcher.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.close()
    assert watcher.lost == [1]
    assert verify(secret, LOST_KEY, keys.get(LOST_KEY)) == "[1]"
    assert any("rank 0: rank(s) [1] stopped answering" in m for m in caplog.messages)


def test_sigusr1_while_a_rank_is_lost_is_a_failure_not_a_preemption():
    """``mpiexec -disable-auto-cleanup`` sends the survivors SIGUSR1 when a rank dies: with a
    rank's heartbeat gone, the stop vote's signal is that notice, so no pre-emption checkpoint
    is written and the run fails naming the lost rank."""
    import signal
    import types

    from daso.errors import PeerFailureError
    from daso.trainer import Trainer

    def survivor(lost):
        control = types.SimpleNamespace(lost_ranks=lambda: list(lost))
        return types.SimpleNamespace(rank=1, control=control)

    Trainer._raise_if_ranks_lost(survivor([]), signal.SIGUSR1)  # all beat: a pre-emption
    with pytest.raises(PeerFailureError, match=r"rank 1: SIGUSR1 came while rank\(s\) \[3\]"):
        Trainer._raise_if_ranks_lost(survivor([3]), signal.SIGUSR1)


def test_a_bad_ranks_per_node_override_is_printed_once_not_by_every_rank(tmp_path):
    args = train_args("mnist_cnn_ddp.yaml", tmp_path / "run", *SHORT)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    result = subprocess.run(
        [mpiexec, "-n", "4", *args],
        cwd=tmp_path,
        env=mpi_env("3"),  # 3 ranks per node cannot split 4
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "DASO_RANKS_PER_NODE" in errors[0], result.stderr
    assert "[rank 0]" in errors[0]
