"""``daso``: Distributed Asynchronous and Selective Optimization.

Coquelin, Debus, Götz, von der Lehr, Kahn, Siggel, Streit, "Accelerating neural network
training with distributed asynchronous and selective optimization (DASO)", J. Big Data 9:14
(2022), arXiv 2104.05588, section 3. Per batch ``b`` of an epoch of ``B`` batches:

1. forward and backward; gradients are averaged inside the node (DDP over the node group)
   unless the schedule skips this batch (``local_skips``);
2. ``optimizer.step()`` on every rank;
3. on a sending batch (``b % global_skips == 0``) the ranks of one cross-node group ``C_k``
   start a non-blocking sum of their flattened parameters and floating-point buffers, sent as
   bfloat16 by default; ``k`` rotates over the local ranks from one send to the next;
   ``W = batches_to_wait`` batches later the sum is merged with the newer local parameters,

   ``x <- (2W * x_local + sum_over_nodes(x_sent)) / (2W + N)``      (paper, eq. 1)

   and broadcast from that rank to the rest of its node;
4. the last batch of the epoch ends with a blocking average over all nodes (optionally of the
   optimizer state too), so every epoch ends with all ranks identical;
5. after the epoch, the loss averaged over all ranks goes to :class:`~daso.schedule.DASOSchedule`.

During warm-up and cool-down the schedule is blocking: every batch ends with a blocking
average (``global_skips = 0``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from daso.comm import (
    WIRE_DTYPES,
    FlatBuffer,
    model_state_tensors,
    no_sync,
    optimizer_state_tensors,
)
from daso.schedule import DASOSchedule
from daso.strategies.averaging import CrossNodeAverager
from daso.strategies.base import EpochCounters, Strategy
from daso.topology import ProcessGroups

#: Weight of the local parameters per batch of staleness in the merge (paper, eq. 1: 2W).
STALENESS_WEIGHT = 2


def merge_stale_sum(
    local: torch.Tensor, summed: torch.Tensor, batches_waited: int, num_nodes: int
) -> torch.Tensor:
    """DASO's staleness-weighted merge, in place: ``local <- (2W local + summed) / (2W + N)``.

    Args:
        local: float32 ``[P]``, this rank's current (newer) parameters; overwritten.
        summed: float32 ``[P]``, the sum over the N nodes of the parameters sent W batches ago.
        batches_waited: W, batches since the send (0 gives the plain average ``summed / N``).
        num_nodes: N.

    Returns:
        ``local``.
    """
    weight = STALENESS_WEIGHT * batches_waited
    return local.mul_(weight).add_(summed).div_(weight + num_nodes)


class DASOStrategy(Strategy):
    """The DASO strategy (see the module docstring for the algorithm).

    Args:
        groups: the process groups; ``groups.cross_comm`` is this rank's ``C_i`` or ``None``.
        epochs: total epochs (the cool-down is the last ``cooldown_epochs``).
        schedule_options: keyword arguments of :class:`~daso.schedule.DASOSchedule`
            (``warmup_epochs``, ``cooldown_epochs``, ``stability_level``, ``patience``,
            ``max_global_skips``, ``skip_reduction_factor``, ``local_skip_factor``).
        downcast: wire dtype of cross-node syncs: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        sync_optimizer_state: also average floating-point optimizer state (momentum, Adam
            moments) across nodes in the blocking sync at the end of each epoch.
        poll_interval_seconds: how the communication thread drives MPI (see
            :class:`~daso.comm.CrossNodeSum`).
        timeout_seconds: longest wait for a cross-node sum before
            :class:`~daso.errors.CommTimeoutError`.
    """

    name = "daso"

    def __init__(
        self,
        groups: ProcessGroups,
        epochs: int,
        *,
        downcast: str = "bfloat16",
        sync_optimizer_state: bool = True,
        poll_interval_seconds: float = 0.0,
        timeout_seconds: float = 300.0,
        **schedule_options: Any,
    ) -> None:
        super().__init__(groups, epochs, timeout_seconds)
        self.schedule = DASOSchedule(epochs, **schedule_options)
        self.wire_dtype = WIRE_DTYPES[downcast]
        self.sync_optimizer_state = sync_optimizer_state
        self.poll_interval = poll_interval_seconds
        self.pending: tuple[int, int] | None = None  # (batch sent, sender local rank)
        self._received: torch.Tensor | None = None  # a sum waited for by a mid-epoch checkpoint
        self.averager: CrossNodeAverager | None = None
        self._epoch_state: FlatBuffer | None = None
        self.counters = EpochCounters()

    # -- setup -------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        self.averager = CrossNodeAverager(
            self.groups,
            model_state_tensors(model),
            self.wire_dtype,
            self.timeout,
            self.poll_interval,
        )
        return self.model

    # -- per batch -----------------------------------------------------------------------------
    def sync_context(self, batch: int) -> contextlib.AbstractContextManager:
        # the last batch syncs in the node too, so the epoch-closing average sees one model
        last = batch == self.num_batches - 1
        if last or self.schedule.params.is_local_sync_batch(batch):
            return contextlib.nullcontext()
        return no_sync(self.model)

    def after_step(self, batch: int) -> None:
        params = self.schedule.params
        last = batch == self.num_batches - 1
        if self.pending is not None:
            waited = batch - self.pending[0]
            if last or waited >= params.batches_to_wait:
                self._merge(waited)
        if last:
            self._epoch_average()
        elif params.blocking and self.topology.num_nodes > 1:
            self.averager.average(tag="DASO blocking average")
        elif params.is_send_batch(batch):
            self._start_send(batch)

    def _start_send(self, batch: int) -> None:
        averager = self.averager
        sender = averager.next_sender()
        self.pending = (batch, sender)
        if averager.is_sender(sender) and averager.cross is not None:
            averager.cross.start(averager.state.pack(), tag=f"DASO send at batch {batch}")

    def _merge(self, batches_waited: int) -> None:
        _, sender = self.pending
        self.pending = None
        averager = self.averager
        if averager.is_sender(sender):
            local = averager.state.pack()
            if averager.cross is not None:
                summed = self._received if self._received is not None else averager.cross.wait()
                self._received = None
                merge_stale_sum(local, summed, batches_waited, self.topology.num_nodes)
        averager.broadcast_from(sender)

    def _epoch_average(self) -> None:
        """Blocking average closing the epoch: model state, and optimizer state if configured."""
        topo = self.topology
        if topo.num_nodes == 1 and topo.local_world_size == 1:
            return
        buffer = self.averager.state
        if self.sync_optimizer_state:
            tensors = buffer.tensors + optimizer_state_tensors(self.optimizer)
            if self._epoch_state is None or not self._epoch_state.matches(tensors):
                self._epoch_state = FlatBuffer(tensors, device=self.groups.device)
                self.averager.reserve(self._epoch_state.numel)
            buffer = self._epoch_state
        self.averager.average(buffer, tag="DASO end-of-epoch average")

    # -- per epoch -----------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        params = self.schedule.params
        return {
            "global_skips": params.global_skips,
            "local_skips": params.local_skips,
            "batches_to_wait": params.batches_to_wait,
            **self.counters.since_last(*self.averager.counters()),
        }

    def end_epoch(self, epoch: int, loss: float) -> None:
        self.schedule.end_epoch(loss)

    def state_dict(self) -> dict[str, Any]:
        """Schedule (with its plateau detector), sender rotation and, between batches of an
        epoch, the sync in flight: it is completed here and its sum kept, to be merged at the
        batch it was due (merging it early would change the run, so resume would not be exact).
        """
        state: dict[str, Any] = {
            "schedule": self.schedule.state_dict(),
            "sender": self.averager.sender,
            "pending": list(self.pending) if self.pending is not None else None,
        }
        averager = self.averager
        if self.pending is not None and averager.is_sender(self.pending[1]) and averager.cross:
            if self._received is None:
                self._received = averager.cross.wait().clone()
            state["received"] = self._received
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.averager.sender = int(state["sender"])
        pending = state.get("pending")
        self.pending = (int(pending[0]), int(pending[1])) if pending is not None else None
        received = state.get("received")
        self._received = received.to(self.groups.device) if received is not None else None

    def close(self) -> None:
        if self.averager is not None:
            self.averager.close()
