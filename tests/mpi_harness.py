"""The one harness multi-process tests share: run N ranks under the venv's mpiexec.

``run_ranks(scenario, n, layout)`` starts ``tests/mpi_worker.py SCENARIO OUT`` as ``n`` MPI
processes with ``DASO_RANKS_PER_NODE=layout`` (emulated nodes), waits with a time limit, and
returns what every rank saved (``OUT/rank<r>.pt``), indexed by rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
WORKER = Path(__file__).with_name("mpi_worker.py")
#: Per-epoch metrics every run reports that repeat exactly in a deterministic rerun (timings
#: do not).
DETERMINISTIC_METRICS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "global_skips",
    "local_skips",
    "batches_to_wait",
    "cross_node_bytes",
    "skipped_steps",
    "lr",
)


def mpi_env(layout: str | None) -> dict[str, str]:
    """Environment for child ranks: emulated layout, one torch thread, the repo importable."""
    env = dict(os.environ)
    env.pop("DASO_RANKS_PER_NODE", None)
    if layout is not None:
        env["DASO_RANKS_PER_NODE"] = layout
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def start_ranks(
    args: list[str], n: int, layout: str | None, cwd: Path | None = None, merged: bool = False
) -> subprocess.Popen:
    """Start ``args`` (a program and its arguments) as ``n`` MPI ranks in the background, in a
    session of their own; ``merged`` sends stderr into stdout."""
    return subprocess.Popen(
        [str(MPIEXEC), "-n", str(n), *args],
        env=mpi_env(layout),
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_ranks(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``(stdout, stderr)`` of ranks started by :func:`start_ranks`; all killed on timeout."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} did not finish in {timeout} s\n{out}\n{err}") from None


def run_command(
    args: list[str], n: int, layout: str | None, timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``args`` (a program and its arguments) as ``n`` MPI ranks; kill all on timeout."""
    proc = start_ranks(args, n, layout, cwd)
    out, err = wait_ranks(proc, timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def train_args(config: str | Path, output_dir: Path, *overrides: str) -> list[str]:
    """``python -m daso.cli train`` for ``config`` (a name in configs/ or a path), quiet,
    writing to ``output_dir``, with ``dotted.key=value`` overrides."""
    path = config if Path(config).is_absolute() else ROOT / "configs" / config
    sets = ["trainer.progress=false", f"trainer.output_dir={output_dir}", *overrides]
    return [
        sys.executable,
        "-m",
        "daso.cli",
        "train",
        "--config",
        str(path),
        *[arg for item in sets for arg in ("--set", item)],
    ]


#: Epochs and accuracy bound of the multi-process MNIST tests (8,000 real MNIST images).
MNIST_EPOCHS = 3
MNIST_ACCURACY_BOUND = 0.95


def train_cli(tmp_path: Path, config: str, n: int, layout: str | None, *overrides: str) -> list:
    """Run ``daso train`` on ``n`` ranks (``layout`` ranks per node) and return its metric
    rows; fails the test on a non-zero exit."""
    out = tmp_path / "run"
    result = run_command(train_args(config, out, *overrides), n, layout, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


#: The scenario name that runs several scenarios in one job (see :func:`run_batch`).
BATCH = "batch"


def worker_main(scenarios: dict[str, Any]) -> None:
    """``python WORKER SCENARIO OUT PARAMS_JSON``: run ``scenarios[SCENARIO](groups, params)``
    on this rank and save its result to ``OUT/rank<r>.pt``."""
    from daso.topology import init_distributed, shutdown_distributed

    name, out = sys.argv[1], Path(sys.argv[2])
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    params.setdefault("out", str(out))
    torch.set_num_threads(1)
    groups = init_distributed("cpu", timeout_seconds=120)
    if name == BATCH:  # several scenarios, one after the other, each in its own folder
        result = {}
        for label, scenario_params in params["scenarios"]:
            folder = out / label
            folder.mkdir(exist_ok=True)
            scenario = scenarios[scenario_params.pop("scenario", label)]
            if groups.topology.rank == 0:  # a failure's output then names the scenario
                print(f"batch: running {label}", file=sys.stderr, flush=True)
            result[label] = scenario(groups, {"out": str(folder), **scenario_params})
    else:
        result = scenarios[name](groups, params)
    torch.save(result, out / f"rank{groups.topology.rank}.pt")
    shutdown_distributed()


def run_ranks(
    scenario: str,
    n: int,
    layout: str | None,
    tmp_path: Path,
    params: dict[str, Any] | None = None,
    timeout: float = 240,
    worker: Path = WORKER,
) -> list[Any]:
    """Run ``scenario`` of ``worker`` (``mpi_worker.py``) on ``n`` ranks; return each rank's
    saved result."""
    out = tmp_path / scenario
    out.mkdir(parents=True, exist_ok=True)
    result = run_command(
        [sys.executable, str(worker), scenario, str(out), json.dumps(params or {})],
        n,
        layout,
        timeout,
    )
    assert result.returncode == 0, f"{scenario} failed:\n{result.stdout}\n{result.stderr}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]


def run_batch(
    scenarios: dict[str, dict[str, Any]],
    n: int,
    layout: str | None,
    tmp_path: Path,
    worker: Path = WORKER,
    timeout: float = 400,
) -> dict[str, list[Any]]:
    """Run several scenarios of ``worker`` in one MPI job, one after the other: each rank
    imports torch once instead of once per scenario (about 4 s of CPU a rank).

    ``scenarios`` maps a label to the scenario's params; the label names the scenario unless
    the params say ``"scenario": NAME`` (to run one scenario several times). Returns each
    label's per-rank results."""
    per_rank = run_ranks(
        BATCH, n, layout, tmp_path, {"scenarios": list(scenarios.items())}, timeout, worker
    )
    return {name: [rank[name] for rank in per_rank] for name in scenarios}


#: ``mpi_worker.py`` scenarios that test modules register when they are imported (at
#: collection, before any test runs), by ``(ranks, layout)``: label -> params. The
#: ``shared_job`` fixture runs each layout's scenarios in one MPI job, once a session.
SHARED_JOBS: dict[tuple[int, str | None], dict[str, dict[str, Any]]] = {}


def share_job(n: int, layout: str | None, label: str, params: dict[str, Any]) -> None:
    """Register scenario ``params`` (with ``"scenario": NAME`` unless ``label`` is the name)
    to run in the session's one job of ``n`` ranks on ``layout``."""
    SHARED_JOBS.setdefault((n, layout), {})[label] = params
