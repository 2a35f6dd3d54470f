"""Faults on 2 emulated nodes x 2 ranks: SIGTERM mid-epoch (checkpoint, exit 75, exact resume),
a rank killed with SIGKILL or frozen with SIGSTOP (all others exit within the timeout, naming
it; the last checkpoint intact), NaN losses (``stop`` names epoch, batch and rank; ``skip``
skips consistently and never lets a NaN into the parameters)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from daso import checkpoint as ckpt

from mpi_harness import ROOT, run_command, start_ranks, train_args, wait_ranks

pytestmark = pytest.mark.multiprocess

OUTLIVE = ROOT / "tests" / "outlive.py"
#: A DASO run long enough to be interrupted in its second epoch (16 batches per epoch).
DASO_RUN = (
    "trainer.epochs=3",
    "trainer.deterministic=true",
    "data.train_subset=2048",
    "data.val_subset=256",
    "strategy.warmup_windows=1",
    "strategy.cooldown_windows=1",
)


def launch(args: list[str], outlive: bool = False) -> subprocess.Popen:
    """``args`` as 4 ranks on 2 emulated nodes, in the background (optionally each rank under
    ``outlive.py``, so the launcher does not kill the job when one rank dies)."""
    wrapper = [sys.executable, str(OUTLIVE)] if outlive else []
    return start_ranks([*wrapper, *args], 4, "2", merged=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    return wait_ranks(proc, timeout)[0]


def rank_pids(marker: str, program: str = "daso.cli") -> dict[int, int]:
    """The ``program`` processes (not their wrappers) whose command line holds ``marker``, by
    rank."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(cmdline)
        if program.encode() not in line or marker.encode() not in line:
            continue
        if any(OUTLIVE.name.encode() in part for part in cmdline):
            continue
        for var in environ:
            if var.startswith(b"PMI_RANK="):
                pids[int(var.split(b"=")[1])] = int(entry.name)
    return pids


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.communicate()[0]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"condition not met in {timeout} s:\n{proc.communicate()[0]}")
        time.sleep(0.05)


def final_states(path: Path) -> list[dict[str, torch.Tensor]]:
    checkpoint = ckpt.read_checkpoint(path)
    return [ckpt.rank_state(checkpoint, r, torch.device("cpu"))["model"] for r in range(4)]


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_exactly(tmp_path):
    straight = run_command(train_args("mnist_cnn_daso.yaml", tmp_path / "full", *DASO_RUN), 4, "2")
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "sig"
    args = train_args("mnist_cnn_daso.yaml", out, *DASO_RUN)
    proc = launch(args)
    wait_for(lambda: (out / "metrics.jsonl").exists(), 180, proc)  # epoch 0 done
    pids = rank_pids(str(out))
    os.kill(pids[3], signal.SIGTERM)  # one rank only: the vote stops all four
    log = finish(proc, 120)
    assert proc.returncode == 75, log
    assert "received SIGTERM" in log and "exit code 75" in log
    newest = ckpt.list_checkpoints(out / "checkpoints")[0]
    meta = ckpt.read_checkpoint(newest)["meta"]
    assert meta["epoch"] == 1 and 0 < meta["batch"] < 16, meta  # mid-epoch
    resumed = run_command([*args, "--resume", "auto"], 4, "2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest}" in resumed.stderr
    name = ckpt.checkpoint_name(3, 0)
    expected = final_states(tmp_path / "full" / "checkpoints" / name)
    got = final_states(out / "checkpoints" / name)
    for rank in range(4):
        for key, value in expected[rank].items():
            assert torch.equal(value, got[rank][key]), f"rank {rank} {key}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    full_rows = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [r["train_loss"] for r in rows] == [json.loads(r)["train_loss"] for r in full_rows]


@pytest.mark.parametrize(
    ("how", "victim"), [(signal.SIGKILL, 1), (signal.SIGSTOP, 3)], ids=["killed", "frozen"]
)
def test_dead_or_stuck_rank_stops_every_rank_within_the_timeout(tmp_path, how, victim):
    """Every survivor names exactly the lost rank: a survivor that fails on the same loss and
    exits says so first, so it is never counted among the lost (rank 1 shares rank 0's node,
    so the other node fails through rank 1's cross-node group and the stop vote)."""
    timeout = 6
    out = tmp_path / "run"
    args = train_args("mnist_cnn_daso.yaml", out, *DASO_RUN, f"trainer.timeout_seconds={timeout}")
    proc = launch(args, outlive=True)
    first = out / "checkpoints" / ckpt.checkpoint_name(1, 0)
    wait_for(first.exists, 180, proc)
    time.sleep(0.2)  # into epoch 1
    pid = rank_pids(str(out))[victim]
    os.kill(pid, how)
    began = time.monotonic()
    try:
        log = finish(proc, timeout + 60)
    finally:
        if how == signal.SIGSTOP:
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
    elapsed = time.monotonic() - began
    assert proc.returncode != 0, log
    assert elapsed < timeout + 30, f"{elapsed:.1f} s"
    match = re.search(
        rf"rank (\d): epoch 1[^\n]* failed: rank\(s\) \[{victim}\] stopped answering", log
    )
    assert match, log
    # every survivor names the lost rank, whatever it was blocked in (the launcher does not
    # kill the job here), in one line and without a traceback; no line names another rank
    naming = set(
        re.findall(rf"\[rank (\d)\] ERROR [^\n]*rank\(s\) \[{victim}\] stopped answering", log)
    )
    assert naming == {"0", "1", "2", "3"} - {str(victim)}, log
    assert set(re.findall(r"rank\(s\) (\[[\d, ]+\]) stopped answering", log)) == {f"[{victim}]"}, (
        log
    )
    assert "Traceback" not in log
    ckpt.read_checkpoint(ckpt.list_checkpoints(out / "checkpoints")[0])  # intact, verifies


def test_nan_stop_names_epoch_batch_and_rank(tmp_path):
    args = train_args(
        "mnist_cnn_ddp.yaml",
        tmp_path / "run",
        "optim.lr=1e6",
        "trainer.epochs=1",
        "data.train_subset=512",
        "checkpoint.every_batches=1",
    )
    result = run_command(args, 2, "1", timeout=120)
    assert result.returncode == 1
    found = re.search(
        r"rank (\d): NaN or Inf loss or gradient at epoch 0, batch (\d+)", result.stderr
    )
    assert found, result.stderr
    assert "trainer.nan_policy=skip" in result.stderr
    # one line per failing rank, no traceback on the terminal (it is in the run folder)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert errors and all("NaN or Inf" in line for line in errors), result.stderr
    assert len({line.split("]")[0] for line in errors}) == len(errors) <= 2
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / f"traceback-rank{found[1]}.txt").is_file()
    batch = int(found[2])
    newest = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    checkpoint = ckpt.read_checkpoint(newest)
    assert checkpoint["meta"]["batch"] <= batch  # written before the bad step, and intact
    model = ckpt.rank_state(checkpoint, 0, torch.device("cpu"))["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


def test_nan_skip_is_consistent_and_never_reaches_parameters(tmp_path):
    params = {
        # ddp: rank 2's NaN gradient reaches every rank through the allreduce: all 4 skip;
        # daso (warm-up epoch, node-local averaging every batch): rank 2's node skips.
        "strategies": [["ddp", {}], ["daso", {"warmup_windows": 1, "cooldown_windows": 0}]],
        "bad_rank": 2,
        "bad_step": 3,
    }
    worker = ROOT / "tests" / "nan_worker.py"
    result = run_command([sys.executable, str(worker), str(tmp_path), json.dumps(params)], 4, "2")
    assert result.returncode == 0, result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for name, expected in (("ddp", [4, 0]), ("daso", [2, 0])):
        for per_rank in ranks:
            run = per_rank[name]
            assert run["skipped"] == expected, (name, run["skipped"])
            assert run["finite"]
            assert run["val_accuracy"] > 0.5
        assert len({per_rank[name]["model"] for per_rank in ranks}) == 1  # identical at the end


def test_sigterm_stops_asynchronous_nodes_together_at_the_epoch_end(tmp_path):
    """``async_easgd`` keeps its nodes apart during an epoch: the signal travels through the
    store, every node ends that epoch early and all stop at its end with one checkpoint. (The
    run also sets a key async_easgd ignores: its warning is printed by rank 0 only.)"""
    out = tmp_path / "run"
    args = train_args(
        "mnist_cnn_async_easgd.yaml",
        out,
        "trainer.epochs=3",
        "data.train_subset=2048",
        "data.val_subset=256",
        "checkpoint.every_batches=4",
    )
    proc = launch(args)
    wait_for(lambda: (out / "metrics.jsonl").exists(), 180, proc)
    os.kill(rank_pids(str(out))[2], signal.SIGUSR1)  # a rank of node 1 only
    log = finish(proc, 120)
    assert proc.returncode == 75, log
    assert "received SIGUSR1" in log
    assert log.count("checkpoint.every_batches is ignored") == 1, log  # not once per rank
    newest = ckpt.list_checkpoints(out / "checkpoints")[0]
    meta = ckpt.read_checkpoint(newest)["meta"]
    assert (meta["epoch"], meta["batch"]) == (2, 0), meta  # the interrupted epoch's end
    resumed = run_command([*args, "--resume", "auto"], 4, "2")
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
