"""``ddp``: synchronous gradient allreduce over all ranks every step (the usual baseline).

PyTorch's ``DistributedDataParallel`` over the whole world; every rank's gradient crosses the
node boundary every step.
"""

from __future__ import annotations

from typing import Any

import torch

from daso.comm import ByteCounter, broadcast_tensors, model_state_tensors, wrap_data_parallel
from daso.strategies.base import Strategy, synchronous_metrics
from daso.topology import ProcessGroups


class DDPStrategy(Strategy):
    """Plain data parallelism: DDP over all ranks, gradients averaged every batch.

    ``cross_node_bytes`` counts the gradient buckets each rank hands to DDP's allreduce when the
    job spans more than one node (0 on one node). At the end of every epoch, floating-point
    buffers (BatchNorm statistics) are broadcast from rank 0 so all ranks hold the same model.
    """

    name = "ddp"
    summary = "Gradient allreduce over all ranks (PyTorch DDP)."

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.counter = ByteCounter()

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        counter = self.counter if self.topology.num_nodes > 1 else None
        self.model = wrap_data_parallel(
            model,
            self.groups.world_group,
            self.topology.world_size,
            self.groups.device,
            counter,
            fixed_buckets=self.deterministic,
        )
        return self.model

    def window_metrics(self) -> dict[str, float]:
        sent, self.counter.bytes_sent = self.counter.bytes_sent, 0
        return synchronous_metrics(sent)

    def end_window(self, epoch: int, loss: float) -> None:
        broadcast_tensors(model_state_tensors(self.model), src=0)
