"""``local_sgd``: hierarchical post-local SGD.

Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020, in the
hierarchical form of PyTorch's ``HierarchicalModelAverager``: gradients are averaged inside the
node every step (DDP on the node group); across nodes, all parameters and floating-point
buffers are averaged, blocking, after each of the first ``warmup_steps`` steps and then every
``period`` steps. The average weighs each node by its rank count, so with ``period: 1`` and plain
SGD it equals synchronous SGD over all ranks (``ddp``), uneven nodes included.
"""

from __future__ import annotations

from typing import Any

import torch

from daso.comm import WIRE_DTYPES, model_state_tensors
from daso.errors import ConfigError
from daso.strategies.averaging import CrossNodeAverager
from daso.strategies.base import EpochCounters, Strategy
from daso.topology import ProcessGroups


class LocalSGDStrategy(Strategy):
    """Node-local SGD with a blocking cross-node model average every ``period`` steps.

    Args:
        groups: the process groups.
        epochs: total epochs (unused; part of the interface).
        period: steps between cross-node averages (H in the paper), >= 1.
        warmup_steps: initial steps that average after every step, >= 0.
        wire_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` on the MPI wire.
        timeout_seconds: longest wait for a cross-node allreduce.

    The step counter runs across epochs and is part of :meth:`state_dict`.
    """

    name = "local_sgd"

    def __init__(
        self,
        groups: ProcessGroups,
        epochs: int,
        *,
        period: int = 4,
        warmup_steps: int = 0,
        wire_dtype: str = "float32",
        timeout_seconds: float = 300.0,
    ) -> None:
        super().__init__(groups, epochs, timeout_seconds)
        if period < 1 or warmup_steps < 0:
            raise ConfigError(
                f"local_sgd: period must be >= 1 and warmup_steps >= 0 "
                f"(got period={period}, warmup_steps={warmup_steps})"
            )
        self.period = period
        self.warmup_steps = warmup_steps
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self.step = 0
        self.counters = EpochCounters()
        self.averager: CrossNodeAverager | None = None

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        self.averager = CrossNodeAverager(
            self.groups, model_state_tensors(model), self.wire_dtype, self.timeout
        )
        return self.model

    def is_averaging_step(self, step: int) -> bool:
        """Whether global step ``step`` (1-based) ends with a cross-node average."""
        return step <= self.warmup_steps or step % self.period == 0

    def after_step(self, batch: int) -> None:
        self.step += 1
        if self.topology.num_nodes > 1 and self.is_averaging_step(self.step):
            self.averager.average(by_ranks=True, tag=f"local SGD average, step {self.step}")

    def epoch_metrics(self) -> dict[str, float]:
        return {
            "global_skips": self.period,
            "local_skips": 1,
            "batches_to_wait": 0,
            **self.counters.since_last(*self.averager.counters()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sender": self.averager.sender}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.averager.sender = int(state["sender"])

    def close(self) -> None:
        if self.averager is not None:
            self.averager.close()
