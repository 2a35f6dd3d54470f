"""The benchmarks' own arithmetic, checked against independent computations: the steps an
epoch has (from the real loader), the paired confidence interval (against NumPy and a printed
t table), and ``trainer.eval_every_epochs``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from daso.config import load_config
from daso.data.loaders import train_loader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
import equal_accuracy  # noqa: E402


@pytest.mark.parametrize("images, world, expected", [(8000, 4, 63), (4000, 4, 32), (8000, 2, 125)])
def test_steps_per_epoch_counts_the_short_last_batch(images, world, expected):
    """8,000 images on 4 ranks of 32: 2,000 a rank, 62 full batches and one of 16: 63 steps
    (the accuracy suite assumed 62). The expectation is counted here from the loader's
    batches."""
    config = load_config(ROOT / "configs/cifar10_bench.yaml", [f"data.train_subset={images}"])
    assert compare.steps_per_epoch(config, world) == expected
    dataset = torch.utils.data.TensorDataset(torch.arange(images))
    loader, _ = train_loader(dataset, 1, world, config.data, config.trainer, torch.device("cpu"))
    assert sum(1 for _ in loader) == expected
    assert expected == math.ceil((images // world) / 32)


def test_paired_interval_is_students_t_over_the_differences():
    """95 % two-sided t interval of the mean of paired differences; t(0.975, 2) = 4.303 and
    t(0.975, 4) = 2.776 from a printed table."""
    diffs = [0.012, -0.004, 0.007]
    mean, low, high = equal_accuracy.paired_interval(diffs)
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    assert mean == pytest.approx(np.mean(diffs))
    assert (low, high) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half), rel=1e-3)
    five = [0.01, 0.02, -0.01, 0.0, 0.015]
    _, low, high = equal_accuracy.paired_interval(five)
    half = 2.776 * np.std(five, ddof=1) / np.sqrt(5)
    assert high - low == pytest.approx(2 * half, rel=1e-3)
    mean, low, high = equal_accuracy.paired_interval([0.3])
    assert mean == 0.3 and math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize(
    "every, validated", [(0, [3]), (1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2, 3])]
)
def test_eval_every_epochs_validates_those_epochs_and_the_last(tmp_path, every, validated):
    import daso

    config = load_config(
        None,
        [
            "strategy.name=ddp",
            "trainer.progress=false",
            "trainer.epochs=4",
            f"trainer.eval_every_epochs={every}",
            "data.batch_size=16",
            f"trainer.output_dir={tmp_path}",
        ],
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    trainer = daso.Trainer(model, optimizer, torch.nn.functional.cross_entropy, config)
    try:
        history = trainer.fit(data, data)
    finally:
        trainer.close()
    got = [row["epoch"] for row in history if row.get("val_accuracy") is not None]
    assert got == validated
