"""Exact-resume runs of one or more strategies, on every rank, in one MPI job.

``python resume_worker.py OUT PARAMS_JSON``; for each strategy in ``PARAMS["strategies"]``:

1. ``full``: train ``epochs`` epochs straight;
2. ``part``: the same config (with ``trainer.deterministic``), stopped after ``stop_epoch``
   epochs (``Trainer.stop_at_epoch``), with a checkpoint every ``every_batches`` batches too;
3. ``resumed``: a new trainer resumes ``part``'s newest checkpoint and finishes;
4. ``mid``: a new trainer resumes ``part``'s mid-epoch checkpoint (epoch ``stop_epoch - 1``,
   batch ``every_batches``) and finishes (strategies in lockstep only).

Each rank saves, per strategy and run, the SHA-256 of its model and strategy state right after
the resume and at the end, of its final optimizer state, and the run's per-epoch metrics, to
``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from mpi_worker import digest

from daso.checkpoint import checkpoint_name
from daso.comm import model_state_tensors, optimizer_state_tensors, unwrap
from daso.config import load_config
from daso.data import mnist_datasets
from daso.models import build_model
from daso.strategies import STRATEGIES
from daso.topology import init_distributed, shutdown_distributed
from daso.trainer import Trainer

from mpi_harness import DETERMINISTIC_METRICS


def strategy_digest(trainer: Trainer) -> str:
    """Digest of the tensors in the strategy's state (a center variable, a stored sum)."""
    state = trainer.strategy.state_dict()
    return digest([v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor)])


def run(groups: Any, overrides: list[str], data: tuple, stop: int | None, resume: Any) -> dict:
    config = load_config(None, overrides)
    torch.manual_seed(config.trainer.seed)
    model = build_model("mnist_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, optimizer, torch.nn.functional.cross_entropy, config, groups=groups)
    trainer.stop_at_epoch = stop
    module = unwrap(trainer.model)
    if resume is not None:
        trainer.resume(resume)
    start = {"model": digest(model_state_tensors(module)), "strategy": strategy_digest(trainer)}
    # no rank trains (pushes to this rank's center shard) before every rank has entered fit():
    # the digest above sees the restored state only, unless a resume lets peers start early
    history = trainer.fit(*data)
    result = {
        "start": start,
        "strategy": strategy_digest(trainer),
        "model": digest(model_state_tensors(module)),
        "optimizer": digest(optimizer_state_tensors(trainer.optimizer)),
        "history": [{k: row.get(k) for k in DETERMINISTIC_METRICS} for row in history],
        "stopped": trainer.stopped,
    }
    if not trainer.strategy.lockstep:  # pushes this node made, and (leaders) those applied
        state = trainer.strategy.state_dict()
        result["exchanges"], result["applied"] = state["exchanges"], state.get("applied")
    trainer.close()
    return result


def main() -> None:
    out = Path(sys.argv[1])
    params = json.loads(sys.argv[2])
    torch.set_num_threads(1)
    groups = init_distributed("cpu", timeout_seconds=120)
    train, val = mnist_datasets(None, val_size=params.get("val_size", 64), seed=0)
    train = torch.utils.data.Subset(train, range(params.get("train_size", 384)))
    data = (train, val)
    epochs, stop, every = params["epochs"], params["stop_epoch"], params["every_batches"]
    results: dict[str, dict[str, Any]] = {}
    for name, options in params["strategies"]:
        base = [
            f"trainer.epochs={epochs}",
            "trainer.progress=false",
            "data.batch_size=16",
            "optim.scheduler=cosine",
            "trainer.deterministic=true",
            f"strategy.name={name}",
            *[f"strategy.{k}={v}" for k, v in options.items()],
        ]

        def at(folder: str, *extra: str, base: list[str] = base, name: str = name) -> list[str]:
            where = out / name / folder
            return [*base, f"trainer.output_dir={where}", *extra]

        part_dir = out / name / "part" / "checkpoints"
        runs = {
            "full": run(groups, at("full"), data, None, None),
            "part": run(
                groups,
                at("part", f"checkpoint.every_batches={every}", "checkpoint.keep=100"),
                data,
                stop,
                None,
            ),
        }
        if STRATEGIES[name].lockstep:  # the others checkpoint at epoch ends only
            mid = part_dir / checkpoint_name(stop - 1, every)
            runs["mid"] = run(groups, at("mid"), data, None, mid)
        runs["resumed"] = run(groups, at("part"), data, None, "auto")
        results[name] = runs
    torch.save(results, out / f"rank{groups.topology.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
