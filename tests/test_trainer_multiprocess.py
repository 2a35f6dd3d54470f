"""Trainer features across 2 emulated nodes x 1 rank: weights survive wrapping, AMP, clipping,
LR schedule, metrics file; and bad data paths fail before training with exit code 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mpi_harness import DETERMINISTIC_METRICS, run_command, run_ranks, train_args

pytestmark = pytest.mark.multiprocess


def test_rank0_weights_survive_wrapping_and_features_run(tmp_path):
    results = run_ranks("trainer_features", 2, "1", tmp_path)
    rank0, rank1 = results
    assert not all(torch.equal(a, b) for a, b in zip(rank0["before"], rank1["before"]))
    for r in results:  # every rank starts from rank 0's own (pretrained) weights, unchanged
        assert all(torch.equal(a, b) for a, b in zip(r["after_wrap"], rank0["before"]))
    assert rank0["final"] == rank1["final"]
    history = rank0["history"]
    assert [row["lr"] for row in history] == [0.1, 0.05, 0.025]  # StepLR, once per epoch
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["val_accuracy"] > 0.6
    assert [row["global_skips"] for row in history] == [0, 4, 0]
    assert rank0["schedule"]["schedule"]["window"] == 3
    lines = (tmp_path / "trainer_features" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    required = {*DETERMINISTIC_METRICS, "epoch_seconds", "strategy"}
    assert len(rows) == 3 and all(required <= set(row) for row in rows)
    assert all(0 <= row["val_accuracy"] <= 1 and row["strategy"] == "daso" for row in rows)


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.root=/nonexistent/mnist", "/nonexistent/mnist"),
        ("strategy.max_global_skips=0", "strategy.max_global_skips"),
    ],
)
def test_bad_input_fails_before_training_with_exit_code_2(tmp_path, override, words):
    result = run_command(train_args("mnist_cnn_daso.yaml", tmp_path, override), 2, "1", timeout=120)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert result.stderr.count("ERROR") == 1  # said once, by rank 0
    assert not (tmp_path / "metrics.jsonl").exists()
