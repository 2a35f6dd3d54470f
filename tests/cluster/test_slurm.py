"""A real Slurm run: ``launch/slurm_cluster.sh`` starts a two-node cluster on this host (``n1``,
``n2``: two slurmd), and ``launch/slurm.sbatch`` trains DASO on MNIST as 2 nodes x 2 tasks. A
time limit that runs out makes Slurm send SIGUSR1 (``--signal=USR1@60``); all ranks checkpoint
and exit 75, the script requeues the job, and the second run (``SLURM_RESTART_COUNT=1``)
resumes and finishes with the very parameters of an uninterrupted run.

Needs root (the set-up installs Debian's slurm-wlm and munge with apt-get and starts the
daemons); skips without, unless ``DASO_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where a
skip is a failure. About three to four minutes on two cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from daso import checkpoint as ckpt

from mpi_harness import ROOT, mpi_env, start_ranks, train_args, wait_ranks

REQUIRED = os.environ.get("DASO_REQUIRE_SERVICES") == "1"
CLUSTER = ROOT / "launch" / "slurm_cluster.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
CONFIG = ROOT / "configs" / "mnist_cnn_daso.yaml"
#: A folder and ports of the test's own, so a cluster of launch/slurm_cluster.sh's defaults that
#: someone runs by hand is left alone.
CLUSTER_ENV = {"DASO_SLURM_DIR": "/tmp/daso-slurm-test", "DASO_SLURM_PORT": "6937"}
EPOCHS = 40
#: Epochs of 31 batches per rank (1.5-6 s here, 60 s or more in all): Slurm sends the signal
#: within 30 s of the limit shrinking to 1 minute (see the test), so the ranks are still
#: training then even when the machine is idle (30 epochs under a 2-minute limit, signalled
#: 18-48 s after the change, once ended first).
OVERRIDES = (
    f"trainer.epochs={EPOCHS}",
    "trainer.deterministic=true",
    "data.train_subset=8000",  # all of the embedded training split
    "data.val_subset=256",
    "strategy.warmup_windows=1",
    "strategy.cooldown_windows=1",
)


def why_not() -> str | None:
    """Why this machine cannot run the cluster, or ``None``."""
    if os.geteuid() != 0:
        return "needs root: launch/slurm_cluster.sh installs Slurm and munge and runs the daemons"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "no Slurm and no apt-get to install it (Debian's slurm-wlm)"
    return None


@pytest.fixture(scope="session")
def slurm_env():
    """The environment for Slurm's clients (SLURM_CONF) with the cluster up; stopped after."""
    reason = why_not()
    if reason:
        if REQUIRED:
            pytest.fail(f"DASO_REQUIRE_SERVICES=1 but the Slurm cluster cannot start: {reason}")
        pytest.skip(reason)
    env = {**os.environ, **CLUSTER_ENV}
    try:
        started = subprocess.run(
            [str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900
        )
        assert started.returncode == 0, f"slurm_cluster.sh start failed:\n{started.stderr}"
        env["SLURM_CONF"] = f"{CLUSTER_ENV['DASO_SLURM_DIR']}/slurm.conf"
        yield env
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def scontrol_job(job: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def scontrol_update(job: str, setting: str, env: dict[str, str]) -> None:
    subprocess.run(["scontrol", "update", f"JobId={job}", setting], env=env, check=True, timeout=30)


def ended(job: str, env: dict[str, str]) -> bool:
    """Whether the job is over for good (a requeued job is PENDING, then RUNNING again)."""
    return scontrol_job(job, env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def wait_until(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no job log)"
            raise AssertionError(f"{what}: not within {timeout} s; job log:\n{text}")
        time.sleep(0.5)


def final_states(path: Path) -> list[dict[str, torch.Tensor]]:
    checkpoint = ckpt.read_checkpoint(path)
    return [ckpt.rank_state(checkpoint, r, torch.device("cpu"))["model"] for r in range(4)]


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm_env, tmp_path):
    out, log = tmp_path / "slurm", tmp_path / "job.log"
    env = {**mpi_env(None), "SLURM_CONF": slurm_env["SLURM_CONF"], "DASO_PYTHON": sys.executable}
    assert "DASO_RANKS_PER_NODE" not in env  # the layout must come from Slurm
    items = ("trainer.progress=false", f"trainer.output_dir={out}", *OVERRIDES)
    sets = [arg for item in items for arg in ("--set", item)]
    submit = [
        "sbatch", "--parsable", f"--output={log}", f"--chdir={tmp_path}",
        "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
        "--time=10", "--signal=USR1@60",
        str(SBATCH), str(CONFIG), *sets,
    ]  # fmt: skip
    job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    reference = None
    try:
        # Slurm sends --signal=USR1@60 when its periodic check (every 30 s) finds the job within
        # 60 + 30 s of its limit: with a short limit at submission the signal could come
        # before the ranks have imported torch and installed their handler. So the job starts
        # with 10 minutes, and once the first epoch is done the limit shrinks to 1: the job is
        # then within 90 s of it at once and the signal comes at the next check, within 30 s,
        # while the ranks train; they stop within seconds, before the limit.
        wait_until((out / "metrics.jsonl").exists, 240, "the first epoch", log)
        scontrol_update(job_id, "TimeLimit=1", env)
        wait_until(lambda: "received SIGUSR1" in log.read_text(), 120, "SIGUSR1", log)
        # the requeued run keeps the job's limit: give it its 10 minutes back
        scontrol_update(job_id, "TimeLimit=10", env)
        # the same training, uninterrupted, under mpiexec with the same layout (2 x 2)
        reference = start_ranks(train_args(CONFIG, tmp_path / "full", *OVERRIDES), 4, "2")
        wait_until(lambda: ended(job_id, env), 360, "the requeued job's end", log)
        info = scontrol_job(job_id, env)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
        assert info["Restarts"] == "1", text
        ref_out, ref_err = wait_ranks(reference, 300)
        assert reference.returncode == 0, ref_err
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
        if reference is not None and reference.poll() is None:
            reference.kill()

    runs = re.split(r"(?m)^(?=daso: job \d+ SLURM_RESTART_COUNT=)", text)[1:]
    assert len(runs) == 2, text
    first, second = runs
    # (a) the layout daso found from Slurm's variables alone
    topology = "topology: 2 node(s), ranks per node [2, 2], world size 4 (layout from slurm)"
    assert topology in first and topology in second, text
    # (b) the signal from the time limit reached the ranks; all four checkpointed and exited 75
    assert first.startswith(f"daso: job {job_id} SLURM_RESTART_COUNT=0 nodes=2 ntasks_per_node=2")
    assert "received SIGUSR1" in first and "exit code 75" in first, first
    assert "daso: ranks 0 1 2 3 exited 75" in first, first
    written = re.findall(r"checkpoint (\S+ckpt-e\d+-b\d+\.pt) written", first)
    assert written, first
    # (c) the script requeued the job, and Slurm ran it again
    assert f"requeueing job {job_id}" in first, first
    assert second.startswith(f"daso: job {job_id} SLURM_RESTART_COUNT=1"), second
    # (d) the requeued run resumed from the stop's checkpoint and finished
    assert f"resumed from {written[-1]}" in second, second
    assert f"done: {EPOCHS} epochs" in second, second
    # (e) bit for bit the parameters of the uninterrupted run, on every rank, and its losses
    name = ckpt.checkpoint_name(EPOCHS, 0)
    expected = final_states(tmp_path / "full" / "checkpoints" / name)
    got = final_states(out / "checkpoints" / name)
    for rank in range(4):
        assert expected[rank].keys() == got[rank].keys()
        for key, value in expected[rank].items():
            assert torch.equal(value, got[rank][key]), f"rank {rank} {key}"

    def losses(path: Path) -> list[float]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [row["train_loss"] for row in rows]

    assert losses(out / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
