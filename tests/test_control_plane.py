"""The control plane trusts nothing a process outside the job writes into the rendezvous store:
control values carry an HMAC with the run's secret (checked against Python's own ``hmac``), a
forged ``stop``, ``lost`` or ``done`` is ignored and logged once, and a survivor that stops on
purpose after a failure is never counted among the lost. A 2x2 run whose store gets forged
``stop`` and ``lost`` values from an outside process finishes normally."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import re
import socket
import subprocess
import threading
import time

import pytest
import torch.distributed as dist
from test_careless_use import LoneComm, one_host
from test_faults_multiprocess import finish, wait_for

from daso.comm.control import DONE_KEY, LOST_KEY, STOP_KEY, Heartbeat, sign, verify
from daso.topology import _rendezvous_store

from mpi_harness import MPIEXEC, ROOT, mpi_env, train_args

SECRET = bytes(range(32))


def test_sign_is_hmac_sha256_over_key_and_payload():
    value = sign(SECRET, "daso/lost", "[3]")
    expected = hmac.new(SECRET, b"daso/lost\x00[3]", hashlib.sha256).hexdigest()
    assert value == f"{expected}:[3]"
    assert verify(SECRET, "daso/lost", value.encode()) == "[3]"


@pytest.mark.parametrize(
    "value",
    [
        "[3]",  # unsigned
        "0" * 64 + ":[3]",  # a made-up tag
        sign(SECRET, "daso/stop", "[3]"),  # signed for another key
        sign(bytes(32), "daso/lost", "[3]"),  # signed with another secret
        sign(SECRET, "daso/lost", "[3]")[:-1] + "4]",  # payload changed after signing
        b"\xff\xfe",  # not text
    ],
    ids=["unsigned", "made-up", "other-key", "other-secret", "tampered", "bytes"],
)
def test_verify_refuses_what_the_secret_did_not_sign(value):
    assert verify(SECRET, "daso/lost", value) is None


def _store(world: int):
    timeout = datetime.timedelta(seconds=10)
    store, prefix = _rendezvous_store(one_host(world), {}, LoneComm(world), timeout)
    return store, prefix, dist.PrefixStore(prefix, store)


def test_forged_stop_lost_and_done_are_ignored_and_logged_once(caplog):
    store, prefix, keys = _store(3)
    keys.set(STOP_KEY, "1")
    keys.set(LOST_KEY, "[2]")
    keys.set(f"{DONE_KEY}/1", "1")  # would hide rank 1 once it stops beating
    with caplog.at_level(logging.WARNING, logger="daso"):
        beat = Heartbeat(store.host, store.port, 0, 3, 0.05, prefix, lost_after=0.4, secret=SECRET)
        keys.add("daso/heartbeat/1", 1)  # rank 1 beat once, then died
        deadline = time.monotonic() + 10
        while not beat.lost and time.monotonic() < deadline:
            keys.add("daso/heartbeat/2", 1)  # rank 2 is alive
            time.sleep(0.05)
        time.sleep(0.3)  # several more beats: each forged key is still there
        beat.close()
    assert not beat.stop_seen()
    assert beat.lost == [1]  # the forged [2] was not taken, the forged done/1 did not hide 1
    forged = [m for m in caplog.messages if "does not carry this run's signature" in m]
    assert sorted(re.search(r"under (\S+)", m)[1] for m in forged) == sorted(
        [STOP_KEY, LOST_KEY, f"{DONE_KEY}/1"]
    )


def test_a_survivor_that_stopped_on_purpose_is_not_named_lost():
    store, prefix, keys = _store(4)
    beat = Heartbeat(store.host, store.port, 0, 4, 0.05, prefix, secret=SECRET)
    try:
        for r in (1, 2, 3):
            keys.add(f"daso/heartbeat/{r}", 1)
        keys.set(f"{DONE_KEY}/2", sign(SECRET, f"{DONE_KEY}/2", "1"))  # exiting after the failure
        # ranks 2 and 3 are silent from here on; rank 1 keeps beating
        began = time.monotonic()
        result: list[list[int] | None] = []
        probe = threading.Thread(target=lambda: result.append(beat.silent_ranks(0.4)))
        probe.start()
        while probe.is_alive():
            keys.add("daso/heartbeat/1", 1)
            time.sleep(0.05)
        assert time.monotonic() - began < 5
    finally:
        beat.close()
    assert result == [[3]]


# -- a 2x2 run whose store an outside process writes into ---------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_forged_stop_and_lost_from_outside_the_job_are_ignored_and_the_run_finishes(tmp_path):
    """The store's port is fixed here (``MASTER_PORT``, as under torchrun) so the test knows
    it; the job's key namespace is found as any local process finds it, from ``list_keys``."""
    out = tmp_path / "run"
    args = train_args(
        "mnist_cnn_async_easgd.yaml",
        out,
        "trainer.epochs=4",  # long enough for several heartbeats after the forgery
        "data.train_subset=2048",
        "data.val_subset=256",
    )
    port = _free_port()
    env = {**mpi_env("2"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.Popen(
        [str(MPIEXEC), "-n", "4", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    found: list[str] = []
    outsider: list[dist.TCPStore] = []

    def keys_listed() -> bool:
        try:
            if not outsider:
                outsider.append(
                    dist.TCPStore(
                        "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=2)
                    )
                )
            names = outsider[0].list_keys()
        except Exception:  # noqa: BLE001 - the store is not up yet
            time.sleep(0.2)
            return False
        found.extend(n.split("daso/heartbeat/")[0] for n in names if "daso/heartbeat/" in n)
        return bool(found)

    wait_for(keys_listed, 120, proc)
    prefix = found[0]
    outsider[0].set(f"{prefix}{STOP_KEY}", "3")  # what stopped async_easgd with exit 75
    outsider[0].set(f"{prefix}{LOST_KEY}", "[3]")  # what made every rank name rank 3 lost
    metrics = out / "metrics.jsonl"
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    assert done < 2, f"the run was at epoch {done} of 4 when the values were forged: too late"
    log = finish(proc, 180)
    assert proc.returncode == 0, log
    assert "stopped answering" not in log and "stopped by a signal" not in log
    assert "does not carry this run's signature" in log
    assert len(metrics.read_text().splitlines()) == 4
