"""``local_sgd``: hierarchical post-local SGD.

Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020, in the
hierarchical form of PyTorch's ``HierarchicalModelAverager``: gradients are averaged inside the
node every step (DDP on the node group); across nodes, all parameters and floating-point
buffers are averaged, blocking, after each of the first ``warmup_steps`` steps and then every
``period`` steps (sent as the difference from a float32 anchor, the last average, so a 16-bit
wire rounds the update, not the weight; optionally with DiLoCo's outer Nesterov step on the
anchor, ``outer_optimizer: nesterov``). The average weighs each node by its rank count, so
with ``period: 1`` and plain SGD it equals synchronous SGD over all ranks (``ddp``), uneven
nodes included.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from daso.comm import WIRE_DTYPES, synced_state_tensors
from daso.options import OuterOptimizerOptions, WireDtype
from daso.strategies.averaging import CrossNodeAverager
from daso.strategies.base import EpochCounters, Strategy
from daso.strategies.outer import build_outer_optimizer
from daso.topology import ProcessGroups


class LocalSGDOptions(OuterOptimizerOptions):
    period: int = Field(4, ge=1, description="Steps between blocking cross-node averages.")
    warmup_steps: int = Field(0, ge=0, description="First steps that average every step.")
    wire_dtype: WireDtype = Field(
        "float32", description="Wire dtype of the model average (differences from the anchor)."
    )


class LocalSGDStrategy(Strategy):
    """Node-local SGD with a blocking cross-node model average every ``period`` steps.

    Options (:class:`LocalSGDOptions`):
        period: steps between cross-node averages (H in the paper), >= 1.
        warmup_steps: initial steps that average after every step, >= 0.
        wire_dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: dtype of the
            differences from the anchor on the MPI wire (memory: one float32 anchor per rank).
        outer_optimizer: ``"none"`` (plain average) or ``"nesterov"`` (DiLoCo, arXiv
            2311.08105: outer SGD with Nesterov momentum on the pseudo-gradient
            ``anchor - mean``).
            The warm-up steps' per-step averages take the plain mean.
        outer_lr: outer learning rate (DiLoCo: 0.7).
        outer_momentum: outer Nesterov momentum (DiLoCo: 0.9).

    The step counter runs across epochs and is part of :meth:`state_dict`.
    """

    name = "local_sgd"
    summary = "Post-local SGD (Lin et al. 2020), hierarchical."
    Options = LocalSGDOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.period = self.options.period
        self.warmup_steps = self.options.warmup_steps
        self.wire_dtype = WIRE_DTYPES[self.options.wire_dtype]
        self.step = 0
        self.counters = EpochCounters()
        self.averager: CrossNodeAverager | None = None

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        tensors, param_numel = synced_state_tensors(model)
        self.averager = CrossNodeAverager(
            self.groups,
            tensors,
            self.wire_dtype,
            self.timeout,
            param_numel=param_numel,
            outer=build_outer_optimizer(self.options, param_numel, self.groups.device),
        )
        return self.model

    def is_averaging_step(self, step: int) -> bool:
        """Whether global step ``step`` (1-based) ends with a cross-node average."""
        return step <= self.warmup_steps or step % self.period == 0

    def after_step(self, batch: int) -> None:
        self.step += 1
        if self.topology.num_nodes > 1 and self.is_averaging_step(self.step):
            self.averager.average(
                by_ranks=True,
                outer=self.step > self.warmup_steps,
                tag=f"local SGD average, step {self.step}",
            )

    def window_metrics(self) -> dict[str, float]:
        averages = min(self.step, self.warmup_steps) + max(
            0, self.step // self.period - self.warmup_steps // self.period
        )
        return {
            "period": self.period,
            "averages": averages if self.topology.num_nodes > 1 else 0,  # so far in the run
            **self.counters.since_last(*self.averager.counters()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.averager.load_state_dict(state["averager"])

    def close(self) -> None:
        if self.averager is not None:
            self.averager.close()
