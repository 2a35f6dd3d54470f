"""The trainer's components on their own: the metrics log, the epoch row built from window
rows, the LR schedule from the config, and the control plane's stop vote (4 ranks)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from daso.config import load_config
from daso.metrics import MetricsLog, summary_line
from daso.trainer import epoch_row, scheduler_from_config

ROW = {
    "epoch": 3,
    "train_loss": 0.5,
    "val_loss": 0.25,
    "val_accuracy": None,
    "cross_node_bytes": 2_000_000,
    "epoch_seconds": 1.5,
}


def test_metrics_log_writes_json_lines_and_one_summary_on_rank_0(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    with caplog.at_level(logging.INFO, logger="daso.trainer"):
        for rank, epoch in ((0, 3), (1, 4)):  # other ranks write nothing
            log = MetricsLog(tmp_path, rank, ["jsonl"])
            log.open("run-a", {}, [], 0)
            log.write({**ROW, "epoch": epoch, "global_skips": 4})
            log.close()
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [3]
    assert caplog.messages == [
        "epoch 3 | train loss 0.5000 | val loss 0.2500 | global_skips 4 | cross-node 2.00 MB "
        "| 1.5 s"
    ]
    resumed = MetricsLog(tmp_path, 0, ["jsonl"])  # a resume: the checkpoint's history
    resumed.open("run-a", {}, [ROW, {**ROW, "epoch": 4}], 10)
    assert len(path.read_text().splitlines()) == 2


def test_summary_line_has_accuracy_only_where_there_is_one():
    assert "val acc 0.9000" in summary_line({**ROW, "val_accuracy": 0.9})
    assert "acc" not in summary_line(ROW)
    assert "no validation" in summary_line({**ROW, "val_loss": None})


def test_epoch_row_sums_counters_weights_losses_and_keeps_the_last_knobs():
    windows = [
        {"window": 0, "epoch": 0, "train_loss": 2.0, "loss_sum": 20.0, "samples": 10.0,
         "phase": "warmup", "global_skips": 0, "sends": 0, "cross_node_bytes": 5},
        {"window": 1, "epoch": 0, "train_loss": 1.0, "loss_sum": 30.0, "samples": 30.0,
         "phase": "cycling", "global_skips": 4, "sends": 3, "cross_node_bytes": 7},
    ]  # fmt: skip
    row = epoch_row(windows)
    assert row["train_loss"] == pytest.approx(50.0 / 40.0)
    assert row["cross_node_bytes"] == 12 and row["sends"] == 3
    assert row["global_skips"] == 4 and row["phase"] == "cycling"
    assert [w["window"] for w in row["windows"]] == [0, 1]
    single = epoch_row(windows[:1])
    assert "windows" not in single and single["train_loss"] == 2.0


def test_per_step_cosine_after_linear_warmup():
    config = load_config(
        None,
        ["optim.scheduler=cosine", "optim.scheduler_interval=step", "optim.warmup_steps=4"],
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = scheduler_from_config(optimizer, config.optim, epochs=2, steps_per_epoch=12)
    lrs = []
    for _ in range(24):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.025, 0.04375, 0.0625, 0.08125, 0.1])  # linear warm-up
    assert all(b < a for a, b in zip(lrs[4:], lrs[5:]))  # then cosine decay over 20 steps
    assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(19 / 20 * math.pi)), rel=1e-9)
