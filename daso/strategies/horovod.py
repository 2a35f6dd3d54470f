"""``horovod``: Horovod's ``DistributedOptimizer``, the DASO paper's own baseline.

Gradients are averaged over all ranks every step by Horovod's allreduce (its MPI or Gloo
operations; with ``hierarchical_allreduce`` Horovod reduces inside each node first, where the
build supports it). Rank 0's parameters and optimizer state are broadcast at the start with
``broadcast_parameters`` / ``broadcast_optimizer_state``.

Horovod is an optional extra: the released 0.28.1 only builds against torch 2.13 as C++17, so
``pip install horovod`` fails; ``make horovod`` (``docker/install_horovod.sh``) builds it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from pydantic import Field

from daso.errors import ConfigError
from daso.options import StrategyOptions
from daso.strategies.base import Strategy, synchronous_metrics
from daso.topology import ProcessGroups

INSTALL_HINT = (
    "strategy 'horovod' needs Horovod, which is not installed in this environment; build it "
    "with `make horovod` (docker/install_horovod.sh: Horovod 0.28.1 as C++17 against this "
    "torch and MPI), then launch with mpiexec"
)


def import_horovod() -> Any:
    """``horovod.torch``, or :class:`ConfigError` saying how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return hvd


class HorovodOptions(StrategyOptions):
    hierarchical_allreduce: bool = Field(
        False, description="HOROVOD_HIERARCHICAL_ALLREDUCE: reduce inside nodes first."
    )


class HorovodStrategy(Strategy):
    """Synchronous data parallelism through ``horovod.torch.DistributedOptimizer``.

    Horovod builds its own communicators over MPI_COMM_WORLD.

    Options (:class:`HorovodOptions`):
        hierarchical_allreduce: set ``HOROVOD_HIERARCHICAL_ALLREDUCE=1`` before ``hvd.init()``.

    ``timeout_seconds`` sets Horovod's stall check: a collective that some rank has not joined
    for this long shuts Horovod down with an error (``HOROVOD_STALL_CHECK_TIME_SECONDS`` and
    ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``, unless already set).

    Raises:
        ConfigError: Horovod is not installed (the message says how to build it).

    ``cross_node_bytes`` counts the gradient bytes each rank hands to Horovod's allreduce per
    step when the job spans more than one node.
    """

    name = "horovod"
    summary = "horovod.torch.DistributedOptimizer (make horovod first)."
    Options = HorovodOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.hvd = import_horovod()
        if self.options.hierarchical_allreduce:
            os.environ["HOROVOD_HIERARCHICAL_ALLREDUCE"] = "1"
        stall = str(max(int(self.timeout), 1))
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", stall)
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", stall)
        self.hvd.init()
        if self.hvd.size() != self.topology.world_size or self.hvd.rank() != self.topology.rank:
            raise ConfigError(
                f"Horovod sees rank {self.hvd.rank()} of {self.hvd.size()} but the launcher says "
                f"{self.topology.rank} of {self.topology.world_size}; launch with mpiexec"
            )
        self.bytes_sent = 0

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        hvd = self.hvd
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        self.optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            backward_passes_per_step=self.accumulate_steps,
        )
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        return model

    def after_backward(self, batch: int) -> None:
        # finish the allreduce now, so clipping sees averaged gradients; step() then skips it
        self.optimizer.synchronize()
        if self.topology.num_nodes > 1:
            self.bytes_sent += sum(
                p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None
            )

    def step_context(self) -> contextlib.AbstractContextManager:
        return self.optimizer.skip_synchronize()

    def window_metrics(self) -> dict[str, float]:
        sent, self.bytes_sent = self.bytes_sent, 0
        return synchronous_metrics(sent)

    def end_window(self, epoch: int, loss: float) -> None:
        # BatchNorm statistics are per rank under Horovod; take rank 0's, as DDP does
        buffers = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        self.hvd.broadcast_parameters(buffers, root_rank=0)
