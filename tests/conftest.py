"""Make the shared multi-process harness importable as ``mpi_harness``; fixtures shared by
several test modules."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mpi_harness import MNIST_EPOCHS, SHARED_JOBS, run_batch  # noqa: E402

#: The MNIST accuracy runs on 2 emulated nodes x 2 ranks: label -> (config, overrides).
MNIST_RUNS = {
    "ddp": ("mnist_cnn_ddp.yaml", []),
    # also the run whose logger files tests/test_run_records.py reads back
    "daso": (
        "mnist_cnn_daso.yaml",
        [
            "strategy.warmup_windows=1",
            "strategy.cooldown_windows=1",
            "trainer.loggers=[jsonl, csv, tensorboard]",
            "trainer.log_every_steps=5",
        ],
    ),
    "daso+nesterov": (
        "mnist_cnn_daso.yaml",
        [
            "strategy.warmup_windows=1",
            "strategy.cooldown_windows=1",
            "strategy.outer_optimizer=nesterov",  # DiLoCo's outer step on the cycling syncs
        ],
    ),
    "hierarchical": ("mnist_cnn_hierarchical.yaml", []),
    "local_sgd": ("mnist_cnn_local_sgd.yaml", []),
    "easgd": ("mnist_cnn_easgd.yaml", []),
    "eamsgd": ("mnist_cnn_eamsgd.yaml", []),
    "async_easgd": ("mnist_cnn_async_easgd.yaml", []),
    "downpour": ("mnist_cnn_downpour.yaml", []),
    "passm": ("mnist_cnn_passm.yaml", []),
    # not an accuracy run: one epoch cut into windows of 4 steps
    "daso_window_steps": (
        "mnist_cnn_daso.yaml",
        [
            "trainer.epochs=1",
            "strategy.window_steps=4",
            "strategy.warmup_windows=2",
            "strategy.cooldown_windows=2",
            "strategy.max_global_skips=4",
        ],
    ),
}


@pytest.fixture(scope="session")
def mnist_job(tmp_path_factory):
    """Every strategy's demo config on real MNIST for ``MNIST_EPOCHS`` epochs (unless the
    overrides say otherwise), 2 emulated nodes x 2 ranks: ``(rows, folders)``, label -> rank
    0's metric rows and label -> the run's output folder. One MPI job trains them one after
    the other (as ``daso train`` builds them), so the ranks start once, not once per run."""
    base = tmp_path_factory.mktemp("mnist")
    scenarios = {
        label: {
            "scenario": "train_config",
            "config": config,
            "overrides": [f"trainer.epochs={MNIST_EPOCHS}", *overrides],
        }
        for label, (config, overrides) in MNIST_RUNS.items()
    }
    results = run_batch(scenarios, 4, "2", base, timeout=900)
    rows = {label: per_rank[0] for label, per_rank in results.items()}
    # run_batch runs the job in <base>/batch, each scenario in <label>/, its run in run/
    return rows, {label: base / "batch" / label / "run" for label in results}


@pytest.fixture(scope="session")
def mnist_runs(mnist_job):
    """Label -> rank 0's metric rows of :func:`mnist_job`."""
    return mnist_job[0]


@pytest.fixture(scope="session")
def mnist_ddp_rows(mnist_runs):
    """The ddp rows of :func:`mnist_runs`: the baseline the MNIST accuracy tests compare to."""
    return mnist_runs["ddp"]


@pytest.fixture(scope="session")
def shared_job(tmp_path_factory):
    """``get(n, layout, label)``: the per-rank results of a scenario registered with
    ``mpi_harness.share_job``; the first request for a layout runs all its scenarios in one
    MPI job."""
    done: dict = {}

    def get(n, layout, label):
        key = (n, layout)
        if key not in done:
            folder = tmp_path_factory.mktemp(f"shared_{n}_{layout}".replace(",", "_"))
            done[key] = run_batch(SHARED_JOBS[key], n, layout, folder, timeout=600)
        return done[key][label]

    return get
