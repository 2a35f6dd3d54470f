"""``hierarchical``: synchronous two-level gradient allreduce every step.

The scheme of Horovod's hierarchical allreduce and of NCCL's trees: reduce inside the node,
allreduce across nodes, spread inside the node again. Here:

1. DDP averages the gradients over the node's ``L_n`` ranks during ``backward()`` (bucketed,
   overlapping the backward pass);
2. the flat gradient is cut into ``K = min_n L_n`` shards; local rank ``i < K`` sums shard
   ``i`` (scaled by ``L_n``, so the result is the mean over *ranks* even with uneven nodes) with
   local rank ``i`` of every other node, over its cross-node MPI group ``C_i``: all of a node's
   ranks use the cross-node link at once, each for ``1/K`` of the bytes;
3. each owner broadcasts its shard inside the node (a node-local allgather).

The result equals the gradient ``ddp`` computes, up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from daso.comm import WIRE_DTYPES, broadcast_tensors, model_state_tensors
from daso.options import StrategyOptions, WireDtype
from daso.strategies.averaging import GradientAverager
from daso.strategies.base import EpochCounters, Strategy, synchronous_metrics
from daso.topology import ProcessGroups


class HierarchicalOptions(StrategyOptions):
    wire_dtype: WireDtype = Field("float32", description="Wire dtype of gradient shards.")


class HierarchicalStrategy(Strategy):
    """Two-level synchronous gradient averaging (see the module docstring).

    Options (:class:`HierarchicalOptions`):
        wire_dtype: dtype of the cross-node gradient shards: ``"float32"`` (default, exact),
            ``"bfloat16"`` or ``"float16"``.

    ``cross_node_bytes`` counts the shard bytes each rank hands to MPI: per step, every node
    hands over the whole gradient once (``P * itemsize`` bytes, split over its ``K`` ranks).
    """

    name = "hierarchical"
    summary = "Node reduce, sharded cross-node allreduce, node allgather."
    Options = HierarchicalOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.wire_dtype = WIRE_DTYPES[self.options.wire_dtype]
        self.counters = EpochCounters()
        self.gradients: GradientAverager | None = None

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.gradients = GradientAverager(self.groups, params, self.wire_dtype, self.timeout)
        return self.model

    def after_backward(self, batch: int) -> None:
        self.gradients.average(tag=f"gradient shard, batch {batch}")

    def window_metrics(self) -> dict[str, float]:
        totals = self.gradients.counters() if self.gradients else (0, 0.0)
        return synchronous_metrics(**self.counters.since_last(*totals))

    def end_window(self, epoch: int, loss: float) -> None:
        # parameters agree everywhere; BatchNorm statistics were only synced inside nodes
        broadcast_tensors(model_state_tensors(self.model), src=0)

    def close(self) -> None:
        if self.gradients is not None:
            self.gradients.close()
