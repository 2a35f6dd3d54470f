"""Scenarios of the ``passm`` strategy, run on every rank by ``test_passm_multiprocess.py``
(``python passm_worker.py SCENARIO OUT PARAMS_JSON``, see ``worker_main``)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from daso.config import load_config
from daso.distributed import Distributed
from daso.errors import ConfigError
from daso.trainer import Trainer

from mpi_harness import worker_main

#: How long a rank spins on shared memory for a peer's write before the scenario fails.
SPIN_SECONDS = 20.0


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )


def data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g) * 2 + 1
    y = (x[:, 0] + x[:, 1] > 2).long()
    return TensorDataset(x, y)


def spin_until(read: Any, expected: float) -> float:
    """Seconds until ``read()`` returns ``expected``, polling memory only (no message)."""
    begin = time.perf_counter()
    while float(read()) != expected:
        if time.perf_counter() - begin > SPIN_SECONDS:
            raise AssertionError(f"never saw {expected} (last {float(read())})")
    return time.perf_counter() - begin


def scenario_sharing(groups: Any, params: dict[str, Any]) -> Any:
    """Local rank 1 writes a value into a parameter; local rank 0 spins on its own view until
    it reads it, then answers through the memory in the same way: no communication call
    between the write and the read."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Distributed(
        model,
        optimizer,
        "passm",
        {"window_steps": 4},
        steps_per_epoch=4,
        epochs=1,
        groups=groups,
    )
    weight = model[0].weight
    local = groups.topology.local_rank
    token = 1000.0 + groups.topology.node_rank
    dist.barrier()
    with torch.no_grad():
        if local == 1:
            weight[0, 0] = token
            waited = spin_until(lambda: weight[0, 1], -token)
        else:
            waited = spin_until(lambda: weight[0, 0], token)
            weight[0, 1] = -token
    result = {
        "kind": run.strategy.shared.kind,
        "waited": waited,
        "blocks": run.strategy.blocks,
        "described": run.strategy.describe_blocks(),
    }
    dist.barrier()
    run.close()
    return result


def one_step(run: Distributed, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    with run.micro_batch():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        run.backward(loss, samples=len(x))
    run.step()


def scenario_block_step(groups: Any, params: dict[str, Any]) -> Any:
    """Two windows of 2 steps: full-model updates in the first, block-only in the second.
    In each window's first step every rank in turn steps while the others wait at a barrier
    (a quiescent model): what its step changed, tensor by tensor, which gradients autograd
    computed, and (full-model step) the change against ``-lr (g / p + wd x)`` with ``g`` the
    gradient a private copy of the model computes on the same batch (SGD's first momentum
    step)."""
    lr, wd = 0.1, 1e-4
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    options = {"window_steps": 2, "full_model_windows": 1, "period": 100}
    run = Distributed(
        model, optimizer, "passm", options, steps_per_epoch=2, epochs=2, groups=groups
    )
    x, y = data(64).tensors
    rank, local = groups.topology.rank, groups.topology.local_rank
    sharing = len(run.strategy.blocks)
    params_list = list(model.parameters())
    batch = x[16 * local : 16 * local + 16], y[16 * local : 16 * local + 16]
    result: dict[str, Any] = {"block": run.strategy.block, "sharing": sharing}
    for phase in ("full", "block"):
        for turn in range(groups.topology.world_size):
            dist.barrier()
            if turn == rank:
                before = [p.detach().clone() for p in params_list]
                private = copy.deepcopy(model)
                loss = torch.nn.functional.cross_entropy(private(batch[0]), batch[1])
                reference = torch.autograd.grad(loss, list(private.parameters()))
                one_step(run, model, *batch)
                result[f"{phase}_changed"] = [
                    not torch.equal(b, p) for b, p in zip(before, params_list)
                ]
                result[f"{phase}_has_grad"] = [p.grad is not None for p in params_list]
                if phase == "full":
                    result["full_error"] = max(
                        float((p - b + lr * (g / sharing + wd * b)).abs().max())
                        for p, b, g in zip(params_list, before, reference)
                    )
            dist.barrier()
        # the window's second step, by all ranks at once, closes it with the blocking average
        one_step(run, model, x[32:48], y[32:48])
    result["final"] = [p.detach().clone() for p in params_list]
    run.close()
    return result


def scenario_alternate(groups: Any, params: dict[str, Any]) -> Any:
    """``alternate: true`` after the full-model windows: which gradients each of 4 steps
    computed (even steps the block, odd steps the whole model)."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"window_steps": 4, "full_model_windows": 0, "alternate": True, "period": 100}
    run = Distributed(
        model, optimizer, "passm", options, steps_per_epoch=4, epochs=1, groups=groups
    )
    x, y = data(64).tensors
    grads = []
    for step in range(4):
        one_step(run, model, x[16 * step : 16 * step + 16], y[16 * step : 16 * step + 16])
        grads.append([p.grad is not None for p in model.parameters()])
    result = {"block": run.strategy.block, "grads": grads}
    run.close()
    return result


def scenario_too_many_ranks(groups: Any, params: dict[str, Any]) -> Any:
    """A model of one tensor on nodes of 2 ranks: the error every rank raises."""
    model = torch.nn.Linear(8, 2, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        Distributed(model, optimizer, "passm", {}, steps_per_epoch=2, epochs=1, groups=groups)
    except ConfigError as err:
        return str(err)
    return None


def scenario_batchnorm(groups: Any, params: dict[str, Any]) -> Any:
    """Two epochs of the small BatchNorm model with ``params['strategy']``; the BatchNorm
    running statistics at the end, and the mean and variance of the BatchNorm layer's input
    over the training set under the final weights."""
    cfg = load_config(
        None,
        [
            "trainer.progress=false",
            f"trainer.output_dir={params['out']}/run",
            "trainer.epochs=2",
            "data.batch_size=16",
            "optim.lr=0.05",
            f"strategy.name={params['strategy']}",
            *params.get("overrides", []),
        ],
    )
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, optimizer, torch.nn.functional.cross_entropy, cfg, groups=groups)
    train = data(512)
    history = trainer.fit(train, data(128))
    bn = model[1]
    with torch.no_grad():  # what a single process computes from the final weights
        inputs = model[0](train.tensors[0])
    result = {
        "mean": bn.running_mean.clone(),
        "var": bn.running_var.clone(),
        "data_mean": inputs.mean(0),
        "data_var": inputs.var(0),
        "history": history,
    }
    trainer.close()
    return result


if __name__ == "__main__":
    worker_main(
        {
            "sharing": scenario_sharing,
            "block_step": scenario_block_step,
            "alternate": scenario_alternate,
            "too_many_ranks": scenario_too_many_ranks,
            "batchnorm": scenario_batchnorm,
        }
    )
