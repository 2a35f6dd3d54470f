"""A user's own training script wrapped in ``daso.run(main)`` ends like ``daso train``: exit 75
after a pre-emption checkpoint (and resumes from it), 2 on a bad config; and the Slurm script
runs it with ``--script`` and requeues it on 75."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from test_faults_multiprocess import finish, rank_pids, wait_for
from test_launch_scripts import fake

from daso import checkpoint as ckpt

from mpi_harness import ROOT, run_command, start_ranks

pytestmark = pytest.mark.multiprocess

SCRIPT = f"""
import sys

import torch
from torch.utils.data import Subset

import daso
from daso.data import mnist_datasets
from daso.models import build_model


def main():
    config = daso.load_config({str(ROOT / "configs" / "mnist_cnn_daso.yaml")!r}, sys.argv[1:])
    torch.manual_seed(config.trainer.seed)
    model = build_model("mnist_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = daso.Trainer(model, optimizer, torch.nn.functional.cross_entropy, config)
    trainer.resume("auto")
    train, val = mnist_datasets()
    trainer.fit(Subset(train, range(2048)), Subset(val, range(256)))
    trainer.close()


if __name__ == "__main__":
    daso.run(main)
"""


def script_args(tmp_path, out, *overrides):
    path = tmp_path / "user_train.py"
    path.write_text(SCRIPT)
    sets = ["trainer.progress=false", f"trainer.output_dir={out}", *overrides]
    return [sys.executable, str(path), *sets]


def test_user_script_exits_75_after_a_checkpoint_on_sigusr1_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = script_args(
        tmp_path,
        out,
        "trainer.epochs=3",
        "strategy.warmup_windows=1",
        "strategy.cooldown_windows=1",
    )
    proc = start_ranks(args, 4, "2", merged=True)
    wait_for(lambda: (out / "metrics.jsonl").exists(), 180, proc)  # epoch 0 done
    os.kill(rank_pids(str(out), "user_train.py")[3], signal.SIGUSR1)
    log = finish(proc, 120)
    assert proc.returncode == 75, log
    newest = ckpt.list_checkpoints(out / "checkpoints")[0]
    meta = ckpt.read_checkpoint(newest)["meta"]
    assert meta["epoch"] == 1 and 0 < meta["batch"] < 16, meta  # written before exiting
    resumed = run_command(args, 4, "2", timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]


def test_user_script_exits_2_on_a_bad_config(tmp_path):
    args = script_args(tmp_path, tmp_path / "run", "strategy.max_global_skips=0")
    result = run_command(args, 2, "1", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    # every rank that finds bad input says so, in one line; the job ends with exit 2
    assert sorted(line.split("]")[0].split("[")[1] for line in errors) == ["rank 0", "rank 1"]
    assert all("strategy.max_global_skips" in line for line in errors), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_script_runs_a_user_script_and_requeues_it_on_75(tmp_path):
    calls = tmp_path / "calls"
    fake(tmp_path, "srun", f'echo "srun $*" >> {calls}; exit 75')
    fake(tmp_path, "scontrol", f'echo "scontrol $*" >> {calls}')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    sbatch = ROOT / "launch" / "slurm.sbatch"
    result = subprocess.run(
        ["bash", str(sbatch), "--script", "my_train.py", "--lr", "0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 75
    lines = calls.read_text().splitlines()
    assert lines[0].endswith("python my_train.py --lr 0.1"), lines
    assert "scontrol requeue 7" in lines


# -- daso.run closes what a script left open ----------------------------------------------------
class _Run:
    """A stand-in for a Trainer or Distributed that the script did not close."""

    def __init__(self) -> None:
        from daso.distributed import register_open

        self.closed: list[bool] = []
        register_open(self)

    def close(self, clean: bool = True) -> None:
        from daso.distributed import unregister_open

        self.closed.append(clean)
        unregister_open(self)


@pytest.mark.parametrize(
    ("outcome", "code", "clean"),
    [("preempted", 75, True), ("returned", 0, True), ("failed", 1, False)],
)
def test_daso_run_closes_every_run_a_script_left_open(outcome, code, clean):
    import daso
    from daso.script import exit_code

    runs: list[_Run] = []

    def main():
        runs.extend([_Run(), _Run()])
        if outcome == "preempted":
            raise daso.Preempted
        if outcome == "failed":
            raise ValueError("a bug in the user's loop")

    assert exit_code(main) == code
    assert [r.closed for r in runs] == [[clean], [clean]]


OWN_LOOP_DEATH = """
import sys, time
from pathlib import Path

import torch

import daso


def main():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    dist = daso.Distributed(model, torch.optim.SGD(model.parameters(), lr=0.01), "ddp",
                            steps_per_epoch=100000, timeout_seconds=6)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    while True:
        with dist.micro_batch():
            dist.backward(torch.nn.functional.cross_entropy(dist.model(x), y))
        dist.step()
        if dist.step_count == 20:
            Path(sys.argv[1], f"rank{dist.topology.rank}").touch()
        time.sleep(0.01)


if __name__ == "__main__":
    daso.run(main)
"""


def test_a_dead_rank_under_distributed_is_named_in_one_line_without_a_traceback(tmp_path):
    """The own-loop API, not only the trainer, turns the Gloo error of a dead peer into one
    line naming it, after asking the heartbeats."""
    from test_faults_multiprocess import launch

    script = tmp_path / "loop.py"
    script.write_text(OWN_LOOP_DEATH)
    proc = launch([sys.executable, str(script), str(tmp_path)], outlive=True)
    wait_for(lambda: all((tmp_path / f"rank{r}").exists() for r in range(4)), 120, proc)
    os.kill(rank_pids(str(script), program=str(script))[3], signal.SIGKILL)
    log = finish(proc, 90)
    assert proc.returncode != 0, log
    assert "Traceback" not in log, log
    named = re.findall(r"\[rank (\d)\] ERROR [^\n]*rank\(s\) \[3\] stopped answering", log)
    assert set(named) == {"0", "1", "2"}, log
    assert set(re.findall(r"rank\(s\) (\[[\d, ]+\]) stopped answering", log)) == {"[3]"}, log


ABORTING = """
import sys
from pathlib import Path

import daso
from daso.errors import PeerFailureError


def main():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    comm.Barrier()
    mapped = [line.split()[5] for line in open("/proc/self/maps")
              if len(line.split()) == 6 and "/dev/shm/mpich_shm_" in line]
    Path(sys.argv[1], f"mapped{comm.Get_rank()}").write_text("\\n".join(sorted(set(mapped))))
    comm.Barrier()
    if comm.Get_rank() == 1:
        raise PeerFailureError("rank 1: a failure that aborts the job")
    comm.Barrier()  # rank 0 waits here until the abort


if __name__ == "__main__":
    daso.run(main)
"""


def test_an_aborted_job_leaves_no_mpich_shared_memory_behind(tmp_path):
    script = tmp_path / "abort.py"
    script.write_text(ABORTING)
    result = run_command([sys.executable, str(script), str(tmp_path)], 2, "2", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "a failure that aborts the job" in result.stderr
    mapped = {p for r in (0, 1) for p in (tmp_path / f"mapped{r}").read_text().split()}
    assert mapped, "MPICH mapped no shared memory here: nothing to check"
    assert [p for p in mapped if os.path.exists(p)] == []


def test_daso_run_closes_open_runs_newest_first():
    """The clean close is collective: every rank must close in the same order (creation)."""
    from daso.script import exit_code

    order: list[int] = []

    class Numbered(_Run):
        def __init__(self, number: int) -> None:
            self.number = number
            super().__init__()

        def close(self, clean: bool = True) -> None:
            order.append(self.number)
            super().close(clean)

    kept: list[_Run] = []
    assert exit_code(lambda: kept.extend(Numbered(n) for n in range(6))) == 0
    assert order == [5, 4, 3, 2, 1, 0]
