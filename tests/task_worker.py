"""Scenarios of the general trainer and the step-level API, run on every rank by
``test_tasks.py`` (``python task_worker.py SCENARIO OUT PARAMS_JSON``, see ``worker_main``)."""

from __future__ import annotations

from typing import Any

import torch
from mpi_worker import digest
from torch.utils.data import IterableDataset, TensorDataset

from daso.comm import model_state_tensors
from daso.config import load_config
from daso.distributed import Distributed
from daso.strategies import STRATEGIES
from daso.trainer import Trainer

from mpi_harness import worker_main


def config(groups: Any, params: dict[str, Any], *overrides: str) -> Any:
    return load_config(
        None,
        [
            "trainer.progress=false",
            f"trainer.output_dir={params['out']}/run",
            "data.batch_size=16",
            "data.val_batch_size=32",
            "optim.lr=0.05",
            "strategy.name=daso",
            "strategy.warmup_windows=1",
            "strategy.cooldown_windows=1",
            *overrides,
        ],
    )


def fit(groups: Any, cfg: Any, model: torch.nn.Module, train: Any, val: Any, **task: Any) -> Any:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
    loss_fn = task.pop("loss_fn", None)
    trainer = Trainer(model, optimizer, loss_fn, cfg, groups=groups, **task)
    history = trainer.fit(train, val)
    final = digest(model_state_tensors(trainer.module))
    trainer.close()
    return {"history": history, "final": final}


def scenario_regression(groups: Any, params: dict[str, Any]) -> Any:
    """``y = x @ w + 0.1 noise``, a linear model with output ``[B, 1]``, MSE: loss only."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():  # the untrained model's validation loss
        untrained = float(torch.nn.functional.mse_loss(model(x[384:]), y[384:]))
    cfg = config(groups, params, "trainer.epochs=4", "optim.lr=0.02")
    data = TensorDataset(x[:384], y[:384]), TensorDataset(x[384:], y[384:])
    result = fit(groups, cfg, model, *data, loss_fn=torch.nn.functional.mse_loss)
    return {**result, "untrained": untrained}


class LogitsAndAux(torch.nn.Module):
    """A classifier that returns ``(logits [B, 3], aux [B])``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, logits.pow(2).mean(dim=1)


def tuple_loss(output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    logits, aux = output
    return torch.nn.functional.cross_entropy(logits, target) + 0.01 * aux.mean()


def tuple_accuracy(output: Any, batch: Any) -> dict[str, float]:
    return {"logits_accuracy": float((output[0].argmax(1) == batch[1]).float().mean())}


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable Gaussian blobs in 4 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.5 + torch.eye(4)[y] * 3
    return x, y


def scenario_tuple_output(groups: Any, params: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    cfg = config(groups, params, "trainer.epochs=3")
    train, val = TensorDataset(*blobs(384, 2)), TensorDataset(*blobs(128, 3))
    return fit(
        groups, cfg, LogitsAndAux(), train, val, loss_fn=tuple_loss, metrics_fn=tuple_accuracy
    )


class BlobStream(IterableDataset):
    """An endless stream of dict samples ``{"x": float[4], "y": int64}`` (the same sequence on
    every rank; the trainer shards it), reshuffled by ``set_epoch``."""

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        x, y = blobs(256, self.seed + 100 * self.epoch)
        for i in range(len(y)):
            yield {"x": x[i], "y": y[i]}


def dict_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    logits = model(batch["x"])
    return torch.nn.functional.cross_entropy(logits, batch["y"]), logits


def scenario_iterable(groups: Any, params: dict[str, Any]) -> Any:
    """An IterableDataset of dict batches, 2-step gradient accumulation, per-step cosine LR
    after a warm-up; 12 steps an epoch (more than one pass of the stream per rank)."""
    torch.manual_seed(0)
    cfg = config(
        groups,
        params,
        "trainer.epochs=3",
        "trainer.steps_per_epoch=12",
        "trainer.accumulate_steps=2",
        "optim.scheduler=cosine",
        "optim.scheduler_interval=step",
        "optim.warmup_steps=4",
    )
    model = torch.nn.Linear(4, 3)
    return fit(groups, cfg, model, BlobStream(5), BlobStream(6), step_fn=dict_step)


def scenario_every_strategy(groups: Any, params: dict[str, Any]) -> Any:
    """Every registered strategy (Horovod where installed) built from its defaults through the
    step-level API, run for 8 windows of 2 steps."""
    result = {}
    for name in STRATEGIES:
        if name in params.get("skip", []):
            continue
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        dist = Distributed(model, optimizer, name, {}, steps_per_epoch=2, epochs=8, groups=groups)
        x, y = blobs(16 * 2 * 8, 7 + groups.topology.rank)
        rows = []
        for step in range(16):
            with dist.micro_batch():
                index = slice(16 * step, 16 * step + 16)
                loss = torch.nn.functional.cross_entropy(dist.model(x[index]), y[index])
                dist.backward(loss, samples=16)
            row = dist.step()
            if row is not None:
                rows.append(row)
        result[name] = {
            "rows": rows,
            "final": digest(model_state_tensors(dist.module)),
            "lockstep": dist.strategy.lockstep,
            "should_stop": dist.should_stop(),
        }
        dist.close()
    return result


def expect_error(kind: type[BaseException], call: Any) -> str:
    """The message of the ``kind`` error ``call()`` raises (``"no error"`` if none)."""
    try:
        call()
    except kind as err:
        return str(err)
    return "no error"


def scenario_misuse(groups: Any, params: dict[str, Any]) -> Any:
    """The step-level API refuses calls out of order and bad arguments, naming the fix."""
    from daso.errors import ConfigError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def build(**kwargs: Any) -> Distributed:
        options = kwargs.pop("options", {})
        return Distributed(model, optimizer, "ddp", options, groups=groups, **kwargs)

    dist = build(steps_per_epoch=4, accumulate_steps=2)
    x, y = blobs(8, 1)
    messages = {"step_first": expect_error(RuntimeError, dist.step)}
    messages["backward_outside"] = expect_error(
        RuntimeError, lambda: dist.backward(dist.model(x).sum())
    )

    def no_backward() -> None:
        with dist.micro_batch():
            dist.model(x)

    messages["no_backward"] = expect_error(RuntimeError, no_backward)
    dist.micro = 0

    def nested() -> None:
        with dist.micro_batch(), dist.micro_batch():
            pass

    messages["nested"] = expect_error(RuntimeError, nested)
    dist.micro = 0
    with dist.micro_batch():
        dist.backward(torch.nn.functional.cross_entropy(dist.model(x), y))
    messages["state_inside_step"] = expect_error(RuntimeError, dist.state_dict)
    with dist.micro_batch():
        dist.backward(torch.nn.functional.cross_entropy(dist.model(x), y))

    def third() -> None:
        with dist.micro_batch():
            pass

    messages["too_many"] = expect_error(RuntimeError, third)
    messages["stepped"] = dist.step() is None and dist.step_count == 1
    dist.close()
    messages["bad_steps"] = expect_error(ConfigError, lambda: build(steps_per_epoch=0))
    messages["bad_option"] = expect_error(
        ConfigError, lambda: build(steps_per_epoch=2, options={"perod": 3})
    )
    messages["short_run"] = expect_error(
        ConfigError,
        lambda: Distributed(
            model, optimizer, "daso", {"window_steps": 5}, steps_per_epoch=10, groups=groups
        ),
    )
    return messages


def scenario_accumulation(groups: Any, params: dict[str, Any]) -> Any:
    """Two micro-batches of 8 per step give the parameters one batch of 16 gives (ddp)."""
    x, y = blobs(16 * 3, 11 + groups.topology.rank)
    finals = {}
    for accumulate in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dist = Distributed(
            model, optimizer, "ddp", {}, steps_per_epoch=3, accumulate_steps=accumulate,
            groups=groups, preemption=False,
        )  # fmt: skip
        size = 16 // accumulate
        for step in range(3):
            for micro in range(accumulate):
                start = 16 * step + size * micro
                with dist.micro_batch():
                    out = dist.model(x[start : start + size])
                    dist.backward(torch.nn.functional.cross_entropy(out, y[start : start + size]))
            row = dist.step()
        finals[accumulate] = [p.detach().clone() for p in model.parameters()]
        finals[f"loss{accumulate}"] = row["train_loss"]
        dist.close()
    return finals


def scenario_control(groups: Any, params: dict[str, Any]) -> Any:
    """Rank 2 flags a stop at step 3; every rank records the step its vote said stop."""
    from daso.comm.control import ControlPlane

    control = ControlPlane(groups, lockstep=True, timeout=60)
    stopped_at = None
    for step in range(8):
        flag = 1 if groups.topology.rank == 2 and step >= 3 else 0
        if control.stop_vote.exchange(flag) and stopped_at is None:
            stopped_at = step
    control.close()
    return {"stopped_at": stopped_at}


SCENARIOS = {
    "control": scenario_control,
    "misuse": scenario_misuse,
    "accumulation": scenario_accumulation,
    "regression": scenario_regression,
    "tuple_output": scenario_tuple_output,
    "iterable": scenario_iterable,
    "every_strategy": scenario_every_strategy,
}

if __name__ == "__main__":
    worker_main(SCENARIOS)
