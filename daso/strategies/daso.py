"""``daso``: Distributed Asynchronous and Selective Optimization.

Coquelin, Debus, Götz, von der Lehr, Kahn, Siggel, Streit, "Accelerating neural network
training with distributed asynchronous and selective optimization (DASO)", J. Big Data 9:14
(2022), arXiv 2104.05588, section 3. Per batch ``b`` of an epoch of ``B`` batches:

1. forward and backward; gradients are averaged inside the node (DDP over the node group)
   unless the schedule skips this batch (``local_skips``);
2. ``optimizer.step()`` on every rank;
3. on a sending batch (``b % global_skips == 0``) the ranks of one cross-node group ``C_k``
   start a non-blocking sum of their flattened parameters and floating-point buffers, sent as
   the difference from the float32 anchor ``a`` (the state after the last sync, equal on all
   ranks), in bfloat16 by default; ``k`` rotates over the local ranks from one send to the
   next; ``W = batches_to_wait`` batches later the sum arrives, the mean is formed in float32
   and merged with the newer local parameters,

   ``mean = a + sum_n (x_sent_n - a) / N``,  ``x <- (2W * x_local + N * mean) / (2W + N)``
   (paper, eq. 1), ``a <- mean`` (or the outer optimizer's step, ``outer_optimizer``),

   and broadcast from that rank to the rest of its node;
4. the last batch of the epoch ends with a blocking average over all nodes (node-local mean
   first, then the cross-node mean; optionally of the optimizer state too), so every epoch
   ends with all ranks identical;
5. after the epoch, the loss averaged over all ranks goes to :class:`~daso.schedule.DASOSchedule`.

During warm-up and cool-down the schedule is blocking: every batch ends with a blocking
average (``global_skips = 0``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from daso.comm import WIRE_DTYPES, no_sync, optimizer_state_tensors, synced_state_tensors
from daso.errors import ConfigError
from daso.schedule import CYCLING, DASOSchedule
from daso.strategies.averaging import CrossNodeAverager
from daso.strategies.base import EpochCounters, Strategy
from daso.strategies.outer import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM, build_outer_optimizer
from daso.topology import ProcessGroups

#: How a sender merges the arrived mean with its newer parameters (see
#: :meth:`~daso.strategies.averaging.CrossNodeAverager.merge`).
MERGE_RULES = ("staleness", "progress")
#: Per-epoch counts in :meth:`DASOStrategy.epoch_metrics`.
SYNC_COUNTS = ("sends", "merges", "blocking_averages")


class DASOStrategy(Strategy):
    """The DASO strategy (see the module docstring for the algorithm).

    Args:
        groups: the process groups; ``groups.cross_comm`` is this rank's ``C_i`` or ``None``.
        epochs: total epochs (the cool-down is the last ``cooldown_epochs``).
        schedule_options: keyword arguments of :class:`~daso.schedule.DASOSchedule`
            (``warmup_epochs``, ``cooldown_epochs``, ``stability_level``, ``patience``,
            ``max_global_skips``, ``skip_reduction_factor``, ``local_skip_factor``).
        downcast: wire dtype of the differences from the anchor in cross-node syncs:
            ``"bfloat16"``, ``"float16"`` or ``"float32"``. The model state itself stays
            float32; memory: one float32 anchor of the synced state per rank.
        merge: ``"progress"`` (default: ``x <- mean + (x - x_sent)``, the node's own progress
            since the send on top of the mean, so nodes do not drift apart between syncs; one
            more float32 copy of the state on the sender while a sync is in flight) or
            ``"staleness"`` (the paper's eq. 1, ``x <- (2W x + N mean) / (2W + N)``, which
            keeps part of every node's divergence at each sync; see benchmarks/README.md for
            the runs behind the default).
        outer_optimizer: ``"none"`` (the plain mean, the paper's algorithm) or ``"nesterov"``
            (DiLoCo's outer SGD with Nesterov momentum on the anchor, driven by the
            pseudo-gradient ``anchor - mean``; one more float32 copy of the state per rank).
            It steps on the syncs of the cycling phase (the merges and the epoch-end
            averages); the per-batch blocking averages of warm-up and cool-down take the
            plain mean, since an outer momentum step after every optimizer step would stack a
            second momentum on the inner one (about ``outer_lr / (1 - outer_momentum)`` = 7
            times the inner step at DiLoCo's defaults).
        outer_lr: the outer learning rate (DiLoCo: 0.7).
        outer_momentum: the outer Nesterov momentum (DiLoCo: 0.9).
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
        merge: str = "progress",
        outer_optimizer: str = "none",
        outer_lr: float = DEFAULT_OUTER_LR,
        outer_momentum: float = DEFAULT_OUTER_MOMENTUM,
        sync_optimizer_state: bool = True,
        poll_interval_seconds: float = 0.0,
        timeout_seconds: float = 300.0,
        **schedule_options: Any,
    ) -> None:
        super().__init__(groups, epochs, timeout_seconds)
        self.schedule = DASOSchedule(epochs, **schedule_options)
        self.wire_dtype = WIRE_DTYPES[downcast]
        if merge not in MERGE_RULES:
            raise ConfigError(f"daso: merge must be one of {', '.join(MERGE_RULES)}, got {merge!r}")
        self.merge_rule = merge
        self.outer_options = (outer_optimizer, outer_lr, outer_momentum)
        build_outer_optimizer(outer_optimizer, 0, "cpu", outer_lr, outer_momentum)  # validate
        self.sync_optimizer_state = sync_optimizer_state
        self.poll_interval = poll_interval_seconds
        self.pending: tuple[int, int] | None = None  # (batch sent, sender local rank)
        self._received: torch.Tensor | None = None  # a sum waited for by a mid-epoch checkpoint
        self.averager: CrossNodeAverager | None = None
        self.counters = EpochCounters()
        self.syncs = dict.fromkeys(SYNC_COUNTS, 0)  # this epoch's sends, merges, averages

    # -- setup -------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        tensors, param_numel = synced_state_tensors(model)
        name, lr, momentum = self.outer_options
        self.averager = CrossNodeAverager(
            self.groups,
            tensors,
            self.wire_dtype,
            self.timeout,
            self.poll_interval,
            param_numel=param_numel,
            outer=build_outer_optimizer(name, param_numel, self.groups.device, lr, momentum),
        )
        return self.model

    # -- per batch -----------------------------------------------------------------------------
    def sync_context(self, batch: int) -> contextlib.AbstractContextManager:
        # the last batch syncs in the node too, so the epoch-closing average sees one model
        last = batch == self.num_batches - 1
        if last or self.schedule.params.is_local_sync_batch(batch):
            return contextlib.nullcontext()
        self.averager.node_diverged = True  # the node's ranks step on their own gradients
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
            self.averager.average(outer=False, tag="DASO blocking average")
            self.syncs["blocking_averages"] += 1
        elif params.is_send_batch(batch):
            self._start_send(batch)

    def _start_send(self, batch: int) -> None:
        keep = self.merge_rule == "progress"
        sender = self.averager.start(tag=f"DASO send at batch {batch}", keep_sent=keep)
        self.pending = (batch, sender)
        self.syncs["sends"] += 1

    def _merge(self, batches_waited: int) -> None:
        _, sender = self.pending
        self.pending = None
        received, self._received = self._received, None
        self.averager.merge(sender, batches_waited, summed=received, rule=self.merge_rule)
        self.syncs["merges"] += 1

    def _epoch_average(self) -> None:
        """Blocking average closing the epoch: model state, and optimizer state if configured
        (momentum and Adam moments cross as they are, in the wire dtype, once per epoch)."""
        topo = self.topology
        if topo.num_nodes == 1 and topo.local_world_size == 1:
            return
        extra = optimizer_state_tensors(self.optimizer) if self.sync_optimizer_state else []
        cycling = self.schedule.params.phase == CYCLING
        self.averager.average(extra, outer=cycling, tag="DASO end-of-epoch average")
        self.syncs["blocking_averages"] += 1

    # -- per epoch -----------------------------------------------------------------------------
    def epoch_metrics(self) -> dict[str, float]:
        """The schedule's knobs, the bytes and wait, and the epoch's ``sends`` (non-blocking
        syncs started), ``merges`` and ``blocking_averages`` (epoch end included) since the
        previous call."""
        params = self.schedule.params
        syncs, self.syncs = self.syncs, dict.fromkeys(SYNC_COUNTS, 0)
        return {
            "global_skips": params.global_skips,
            "local_skips": params.local_skips,
            "batches_to_wait": params.batches_to_wait,
            **syncs,
            **self.counters.since_last(*self.averager.counters()),
        }

    def end_epoch(self, epoch: int, loss: float) -> None:
        self.schedule.end_epoch(loss)

    def state_dict(self) -> dict[str, Any]:
        """Schedule (with its plateau detector), sender rotation and, between batches of an
        epoch, the sync in flight: it is completed here and its sum kept, to be merged at the
        batch it was due (merging it early would change the run, so resume would not be exact).
        """
        averager = self.averager
        state: dict[str, Any] = {
            "schedule": self.schedule.state_dict(),
            "averager": averager.state_dict(),
            "pending": list(self.pending) if self.pending is not None else None,
        }
        if self.pending is not None and averager.is_sender(self.pending[1]):
            if self._received is None:
                self._received = averager.collect().clone()
            state["received"] = self._received.cpu()
            if averager.sent_delta is not None:
                state["sent_delta"] = averager.sent_delta.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.averager.load_state_dict(state["averager"])
        pending = state.get("pending")
        self.pending = (int(pending[0]), int(pending[1])) if pending is not None else None
        received = state.get("received")
        self._received = received.to(self.groups.device) if received is not None else None
        sent = state.get("sent_delta")
        self.averager.sent_delta = sent.to(self.groups.device) if sent is not None else None

    def close(self) -> None:
        if self.averager is not None:
            self.averager.close()
