"""The Slurm script requeues a job that daso stopped with a checkpoint (exit 75), and only
then; ``srun`` and ``scontrol`` are stand-ins that record how they were called. ``mpirun.sh``
maps ranks per node and forwards the environment (stand-in mpirun), and runs a script under the
venv's MPICH. The real Slurm run is tests/cluster/test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mpi_harness import BIN, ROOT

SBATCH = ROOT / "launch" / "slurm.sbatch"


def fake(bin_dir, name, body):
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("srun_exit, requeued", [(75, True), (0, False), (1, False)])
def test_slurm_script_requeues_on_exit_75(tmp_path, srun_exit, requeued):
    calls = tmp_path / "calls"
    fake(tmp_path, "srun", f'echo "srun $*" >> {calls}; exit {srun_exit}')
    fake(tmp_path, "scontrol", f'echo "scontrol $*" >> {calls}')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    result = subprocess.run(
        ["bash", str(SBATCH), "configs/x.yaml", "--set", "trainer.epochs=3"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == srun_exit
    lines = calls.read_text().splitlines()
    assert "train --config configs/x.yaml --set trainer.epochs=3 --resume auto" in lines[0]
    assert ("scontrol requeue 4242" in lines) == requeued


def test_sbatch_asks_for_the_signal_and_requeue():
    text = SBATCH.read_text()
    assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text


def run_sbatch_with_tasks(tmp_path, task_exits, *args):
    """``slurm.sbatch`` with a stand-in ``srun`` that runs its command once per task, as
    SLURM_PROCID 0, 1, ..., each task's program exiting with its code in ``task_exits``."""
    calls = tmp_path / "calls"
    codes = " ".join(str(c) for c in task_exits)
    fake(
        tmp_path,
        "srun",
        f'echo "srun $*" >> {calls}\n'
        "while [[ $1 == --* ]]; do shift; done\n"
        f"worst=0; i=0; for code in {codes}; do\n"
        '  SLURM_PROCID=$i FAKE_EXIT=$code "$@"; c=$?; [ $c -gt $worst ] && worst=$c; i=$((i+1))\n'
        "done; exit $worst",
    )
    fake(tmp_path, "scontrol", f'echo "scontrol $*" >> {calls}')
    fake(tmp_path, "python", f'echo "python $*" >> {calls}; exit $FAKE_EXIT')
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_NTASKS_PER_NODE": "2",
    }
    env.pop("DASO_PYTHON", None)
    result = subprocess.run(
        ["bash", str(SBATCH), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result, calls.read_text().splitlines()


@pytest.mark.parametrize(
    "task_exits, code, requeued",
    [([75, 75, 75, 75], 75, True), ([0, 0, 0, 0], 0, False), ([75, 1, 75, 75], 1, False)],
)
def test_each_task_exiting_75_is_a_preemption_not_a_bad_exit(tmp_path, task_exits, code, requeued):
    """Under srun --kill-on-bad-exit=1, a rank's 75 would count as a failure and kill the ranks
    still exiting; the task wrapper turns it into 0 plus a mark, and the script into 75."""
    result, lines = run_sbatch_with_tasks(tmp_path, task_exits, "--script", "my_train.py", "-v")
    assert result.returncode == code, result.stdout + result.stderr
    srun = lines[0]
    assert "--kill-on-bad-exit=1" in srun and "--ntasks-per-node=2" in srun and "--mpi=pmi2" in srun
    assert lines.count("python my_train.py -v") == 4
    assert ("scontrol requeue 77" in lines) == requeued
    assert ("ranks 0 1 2 3 exited 75" in result.stdout) == requeued
    assert not list(tmp_path.glob(".daso-stopped*"))  # the marks are cleaned up


def test_sbatch_uses_daso_python_and_explains_the_signal():
    text = SBATCH.read_text()
    assert "DASO_PYTHON" in text and "B:USR1" in text


MPIRUN = ROOT / "launch" / "mpirun.sh"


def run_mpirun_sh(tmp_path, version, *args, extra_env=None):
    """``mpirun.sh`` with a stand-in mpirun that prints ``version`` and records its call."""
    calls = tmp_path / "calls"
    fake(
        tmp_path,
        "mpirun",
        f'if [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n'
        f'printf "%s\\n" "$@" > {calls}',
    )
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b:4\n\n")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", **(extra_env or {})}
    env.pop("DASO_MPIRUN", None)
    result = subprocess.run(
        ["bash", str(MPIRUN), str(hostfile), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines()


def test_mpirun_sh_open_mpi_maps_ranks_per_node_and_forwards_the_venv(tmp_path):
    extra = {"VIRTUAL_ENV": "/venv", "DASO_TIMEOUT": "9", "DASO_PYTHON": "/venv/bin/python"}
    args = run_mpirun_sh(
        tmp_path, "mpirun (Open MPI) 4.1.5", "3", "c.yaml", "--set", "a=1", extra_env=extra
    )
    assert args[args.index("-np") + 1] == "6"  # 2 hosts x 3
    assert args[args.index("--map-by") + 1] == "ppr:3:node"
    forwarded = {args[i + 1] for i, arg in enumerate(args) if arg == "-x"}
    assert {"PATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "DASO_TIMEOUT"} <= forwarded
    assert args[-8:] == [
        "/venv/bin/python",
        "-m",
        "daso.cli",
        "train",
        "--config",
        "c.yaml",
        "--set",
        "a=1",
    ]


def test_mpirun_sh_mpich_runs_a_script_with_the_whole_environment(tmp_path):
    args = run_mpirun_sh(tmp_path, "HYDRA build details:", "2", "--script", "my.py", "--lr", "1")
    assert args[args.index("-n") + 1] == "4" and args[args.index("-ppn") + 1] == "2"
    assert "-genvall" in args
    assert args[-4:] == ["python", "my.py", "--lr", "1"]


def test_mpirun_sh_runs_a_script_under_the_venvs_mpich(tmp_path):
    """For real: the venv's MPICH on this host, 2 ranks of a script that reports what it got."""
    script = tmp_path / "report.py"
    script.write_text(
        "import os, sys\n"
        "line = f\"rank {os.environ['PMI_RANK']} {os.environ['OMP_NUM_THREADS']}"
        " {os.environ.get('DASO_MARK')}\\n\"\n"
        "sys.stdout.write(line)\n"  # one write: print() writes its pieces apart, and the
        # ranks' output is forwarded write by write, so two prints could interleave
        "sys.stdout.flush()\n"
    )
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost\n")
    env = {
        **os.environ,
        "DASO_MPIRUN": str(BIN / "mpiexec"),
        "DASO_PYTHON": sys.executable,
        "DASO_MARK": "forwarded",
    }
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(
        ["bash", str(MPIRUN), str(hostfile), "2", "--script", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["rank 0 1 forwarded", "rank 1 1 forwarded"]
