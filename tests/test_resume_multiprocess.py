"""Exact resume for every strategy: 4 epochs straight equal 2 epochs, a stop, and 2 more
(bitwise, on every rank: model and optimizer state; and the same per-epoch metrics); so does a
resume from a checkpoint taken in the middle of an epoch."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from mpi_harness import ROOT, run_command, run_ranks

pytestmark = pytest.mark.multiprocess

WORKER = ROOT / "tests" / "resume_worker.py"

#: Strategies and options that make each one do its real work within 4 short epochs.
STRATEGIES = {
    # with the outer optimizer and the progress merge: the outer momentum, the anchor and the
    # sender's own sent difference are part of the exact state (plain DASO resumes bitwise in
    # test_faults_multiprocess's SIGTERM test)
    "daso": {
        "warmup_windows": 1,
        "cooldown_windows": 1,
        "max_global_skips": 4,
        "outer_optimizer": "nesterov",
        "merge": "progress",
    },
    "ddp": {},
    "hierarchical": {},
    "local_sgd": {"period": 3},
    "easgd": {"period": 3},
    "eamsgd": {"period": 2},
    "no_comm": {},
}


def resume_runs(tmp_path, strategies, n=4, layout="2", timeout=300, train_size=384, options=None):
    params = {
        "strategies": [[name, (options or STRATEGIES).get(name, {})] for name in strategies],
        "epochs": 4,
        "stop_epoch": 2,
        "every_batches": 3,
        "train_size": train_size,  # 384: 6 batches of 16 per rank and epoch
    }
    result = run_command(
        [sys.executable, str(WORKER), str(tmp_path), json.dumps(params)], n, layout, timeout
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(n)]


def check_exact(results, name):
    for rank, per_rank in enumerate(results):
        runs = per_rank[name]
        full = runs["full"]
        assert runs["part"]["stopped"] == "stop_at_epoch=2"
        assert len(runs["part"]["history"]) == 2
        assert len(full["history"]) == 4
        resumed_from = runs["resumed"]["start"]  # the state the stopped run saved, exactly
        assert resumed_from == {
            "model": runs["part"]["model"],
            "strategy": runs["part"]["strategy"],
        }
        for label in ("resumed", "mid"):
            run = runs[label]
            assert run["stopped"] is None
            assert run["model"] == full["model"], f"{name} {label}: rank {rank} model differs"
            assert run["optimizer"] == full["optimizer"], f"{name} {label}: optimizer differs"
            assert run["history"] == full["history"], f"{name} {label}: metrics differ"


@pytest.mark.parametrize("layout, n", [("2", 4)])
def test_every_strategy_resumes_exactly(tmp_path, layout, n):
    results = resume_runs(tmp_path, list(STRATEGIES), n, layout)
    for name in STRATEGIES:
        check_exact(results, name)


def test_horovod_resumes_exactly(tmp_path):
    """Separate job: Horovod initialises once per process (see test_horovod_multiprocess)."""
    from test_horovod_multiprocess import HAVE_HOROVOD, REQUIRED

    if not HAVE_HOROVOD and not REQUIRED:
        pytest.skip("Horovod not installed: run `make horovod`")
    check_exact(resume_runs(tmp_path, ["horovod"], train_size=256), "horovod")


def test_asynchronous_strategies_resume_where_they_stopped(tmp_path):
    """``async_easgd`` and ``downpour`` apply pushes in arrival order, and ``passm``'s ranks
    write one shared model without locks, so two runs differ and there is no bitwise target;
    a resume must still restore exactly the saved state (model, center shard, anchor, the
    block optimizer states) and continue the metrics from the stopped run's."""
    names = ["async_easgd", "downpour", "passm"]
    options = {"passm": {"full_model_windows": 1, "period": 4}}
    results = resume_runs(tmp_path, names, options=options)
    for name in names:
        for per_rank in results:
            runs = per_rank[name]
            part, resumed = runs["part"], runs["resumed"]
            assert part["stopped"] == "stop_at_epoch=2" and resumed["stopped"] is None
            assert resumed["start"] == {"model": part["model"], "strategy": part["strategy"]}
            assert resumed["history"][:2] == part["history"]
            assert [row["epoch"] for row in resumed["history"]] == [0, 1, 2, 3]
            assert resumed["history"][-1]["val_accuracy"] > 0.5
    # passm: every rank of both nodes ends each window on one model, resumed or not
    for label in ("part", "resumed", "mid"):
        assert len({per_rank["passm"][label]["model"] for per_rank in results}) == 1, label
    for name in ("async_easgd", "downpour"):
        # no push was lost, before the stop or across the resume: each leader's shard
        # absorbed every node's pushes (the two nodes' leaders are ranks 0 and 2)
        for label in ("part", "resumed"):
            pushed = [results[leader][name][label]["exchanges"] for leader in (0, 2)]
            assert pushed[0] > 0 and pushed[1] > 0
            for leader in (0, 2):
                assert results[leader][name][label]["applied"] == pushed, f"{name} {label}"


def test_ranks_that_resume_different_checkpoints_refuse_to_train(tmp_path):
    """A checkpoint folder the nodes do not share: rank 0 finds a checkpoint, rank 1 none. Both
    ranks stop with a CheckpointError before the first batch instead of training apart."""
    results = run_ranks("resume_disagreement", 2, "1", tmp_path, timeout=120)
    assert [r["resumed"] for r in results] == ["ckpt-e00001-b0000000.pt", None]
    for result in results:
        assert "ranks start training at different points" in result["error"]
        assert "checkpoint.dir" in result["error"]


def test_daso_with_window_steps_resumes_exactly_mid_window(tmp_path):
    """Windows of 4 steps in epochs of 6 (two windows an epoch, the second of 2 steps): the
    checkpoint at epoch 1, batch 3 falls inside a window; the resumed run equals the straight
    one bitwise, schedule included."""
    options = {
        "daso": {
            "window_steps": 4,
            "warmup_windows": 2,
            "cooldown_windows": 2,
            "max_global_skips": 2,
            "stability_level": 0.5,
            "patience": 0,
        }
    }
    results = resume_runs(tmp_path, ["daso"], options=options)
    check_exact(results, "daso")
