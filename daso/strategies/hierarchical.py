"""``hierarchical``: synchronous two-level gradient allreduce every step.

The scheme of Horovod's hierarchical allreduce and of NCCL's trees: reduce inside the node,
allreduce across nodes, spread inside the node again. By default (``overlap: true``) it runs
per DDP gradient bucket, as soon as the bucket is ready, so the cross-node transfer overlaps
the rest of the backward pass, as Horovod and DDP do
(:class:`~daso.strategies.overlap.OverlappedGradientSum`):

1. the bucket is summed over the node's ``L_n`` ranks (DDP's hook, asynchronous);
2. the bucket is cut into ``K = min_n L_n`` shards; local rank ``i < K`` sums shard ``i`` with
   local rank ``i`` of every other node, over its cross-node MPI group ``C_i``, and divides by
   the world size (the mean over *ranks*, even with uneven nodes): all of a node's ranks use
   the cross-node link at once, each for ``1/K`` of the bytes;
3. each owner broadcasts its shard inside the node (a node-local allgather).

``overlap: false`` keeps the earlier scheme for comparison: DDP averages inside the node
during ``backward()`` and the whole flat gradient goes across nodes after it
(:class:`~daso.strategies.averaging.GradientAverager`), so the link waits for the backward pass.

Either way the result equals the gradient ``ddp`` computes, up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from daso.comm import WIRE_DTYPES, broadcast_tensors, model_state_tensors
from daso.options import StrategyOptions, WireDtype
from daso.strategies.averaging import GradientAverager
from daso.strategies.base import EpochCounters, Strategy, synchronous_metrics
from daso.strategies.overlap import OverlappedGradientSum
from daso.topology import ProcessGroups


class HierarchicalOptions(StrategyOptions):
    wire_dtype: WireDtype = Field("float32", description="Wire dtype of gradient shards.")
    overlap: bool = Field(
        True,
        description="Send each DDP bucket across nodes as soon as it is ready (overlapping "
        "the backward pass); false: the whole gradient after backward().",
    )
    poll_interval_seconds: float = Field(
        0.001,
        ge=0,
        description="Overlapped shard sums: MPI_Test then sleep at most this long (seconds); "
        "0: MPI's blocking call, which spins a core the backward pass needs.",
    )
    bucket_cap_mb: float | None = Field(
        None,
        gt=0,
        description="DDP's gradient bucket size in MiB (null: DDP's default, a first bucket "
        "of 1 MiB, then 25 MiB).",
    )


class HierarchicalStrategy(Strategy):
    """Two-level synchronous gradient averaging (see the module docstring).

    Options (:class:`HierarchicalOptions`):
        wire_dtype: dtype of the cross-node gradient shards: ``"float32"`` (default, exact),
            ``"bfloat16"`` or ``"float16"``.
        overlap: ``True`` (default): per bucket during ``backward()``; ``False``: the whole
            gradient after it.
        poll_interval_seconds: how the MPI thread waits for a shard sum: ``MPI_Test`` and
            sleeps from 50 us doubling to at most this (default 1 ms; measured 21 % faster
            steps than 0 at 50 Mbit/s on 4 ranks sharing 2 cores, benchmarks/README.md); 0:
            MPI's blocking call, whose busy progress loop takes a core from the backward pass it
            overlaps (the lowest latency where cores are spare).
        bucket_cap_mb: DDP's bucket size in MiB (``None``: DDP's default, 1 MiB for the first
            bucket and 25 MiB after); smaller buckets start the transfer earlier, at more
            messages per step.

    ``cross_node_bytes`` counts the shard bytes each rank hands to MPI: per step, every node
    hands over the whole gradient once (``P * itemsize`` bytes, split over its ``K`` ranks).
    ``comm_wait_seconds``: with ``overlap`` the waits happen inside ``backward()`` (DDP waits
    for the last bucket) and are not counted (0, as for ``ddp``); without it, the seconds
    blocked after ``backward()``.
    """

    name = "hierarchical"
    summary = "Node reduce, sharded cross-node allreduce, node allgather."
    Options = HierarchicalOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.wire_dtype = WIRE_DTYPES[self.options.wire_dtype]
        self.counters = EpochCounters()
        self.gradients: GradientAverager | OverlappedGradientSum | None = None

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        cap = self.options.bucket_cap_mb
        if self.options.overlap and self.topology.num_nodes > 1:
            self.gradients = OverlappedGradientSum(
                self.groups,
                self.wire_dtype,
                self.timeout,
                poll_interval=self.options.poll_interval_seconds,
            )
            self.model = self.wrap_in_node(model, self.gradients.hook, cap)
            return self.model
        self.model = self.wrap_in_node(model, bucket_cap_mb=cap)
        params = [p for p in model.parameters() if p.requires_grad]
        self.gradients = GradientAverager(self.groups, params, self.wire_dtype, self.timeout)
        return self.model

    def after_backward(self, batch: int) -> None:
        if isinstance(self.gradients, GradientAverager):
            self.gradients.average(tag=f"gradient shard, batch {batch}")

    def window_metrics(self) -> dict[str, float]:
        sent, waited = self.gradients.counters() if self.gradients else (0, 0.0)
        if isinstance(self.gradients, OverlappedGradientSum):
            waited = 0.0  # inside backward(); the thread's own waits are not the caller's
        return synchronous_metrics(**self.counters.since_last(sent, waited))

    def end_window(self, epoch: int, loss: float) -> None:
        # parameters agree everywhere; BatchNorm statistics were only synced inside nodes
        broadcast_tensors(model_state_tensors(self.model), src=0)

    def close(self) -> None:
        if self.gradients is not None:
            self.gradients.close()
