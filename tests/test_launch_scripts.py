"""The Slurm script requeues a job that daso stopped with a checkpoint (exit 75), and only
then; ``srun`` and ``scontrol`` are stand-ins that record how they were called."""

from __future__ import annotations

import os
import subprocess

import pytest

from mpi_harness import ROOT

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
