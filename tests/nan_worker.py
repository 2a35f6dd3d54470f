"""``nan_policy: skip`` on every rank: ``python nan_worker.py OUT PARAMS_JSON``.

For each strategy of ``PARAMS["strategies"]``, trains the MNIST CNN for 2 epochs of 8 batches
with a loss that turns NaN on rank ``bad_rank`` at its training step ``bad_step`` (0-based over
the run), and saves per rank: the metrics, whether every parameter is finite, and the digest of
the final model, to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from mpi_worker import digest

from daso.comm import model_state_tensors
from daso.config import load_config
from daso.data import mnist_datasets
from daso.models import build_model
from daso.topology import init_distributed, shutdown_distributed
from daso.trainer import Trainer


def poisoned_loss(rank: int, bad_rank: int, bad_step: int):
    """Cross-entropy that is NaN on ``bad_rank``'s training step ``bad_step``."""
    calls = {"step": 0}

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(output, target)
        if not torch.is_grad_enabled():  # validation
            return loss
        step, calls["step"] = calls["step"], calls["step"] + 1
        return loss * float("nan") if (rank, step) == (bad_rank, bad_step) else loss

    return loss_fn


def main() -> None:
    out, params = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    groups = init_distributed("cpu", timeout_seconds=120)
    rank = groups.topology.rank
    train, val = mnist_datasets(None, val_size=128, seed=0)
    data = (torch.utils.data.Subset(train, range(512)), val)
    results = {}
    for name, options in params["strategies"]:
        overrides = [
            "trainer.epochs=2",
            "trainer.progress=false",
            "trainer.nan_policy=skip",
            "data.batch_size=16",
            f"trainer.output_dir={out / name}",
            f"strategy.name={name}",
            *[f"strategy.{k}={v}" for k, v in options.items()],
        ]
        config = load_config(None, overrides)
        torch.manual_seed(0)
        model = build_model("mnist_cnn")
        loss_fn = poisoned_loss(rank, params["bad_rank"], params["bad_step"])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        trainer = Trainer(model, optimizer, loss_fn, config, groups=groups)
        history = trainer.fit(*data)
        tensors = model_state_tensors(model)
        results[name] = {
            "skipped": [row["skipped_steps"] for row in history],
            "finite": all(bool(torch.isfinite(t).all()) for t in tensors),
            "model": digest(tensors),
            "val_accuracy": history[-1]["val_accuracy"],
        }
        trainer.close()
    torch.save(results, out / f"rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
