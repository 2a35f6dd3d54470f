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
   ranks), in float32 by default (``cycling_downcast``, as the reference implementation); ``k``
   rotates over the local ranks from one send to the next; ``W = batches_to_wait`` batches
   later the sum arrives, the mean is formed in float32, the sender broadcasts the sum inside
   its node and every rank merges its own newer state with it,

   ``mean = a + sum_n (x_sent_n - a) / N``,  ``x <- (2W * x_local + N * mean) / (2W + N)``
   (paper, eq. 1; or ``merge: progress``, ``x <- mean + (x_local - x_sent)``),
   ``a <- mean`` (the outer optimizer, if any, steps once per window: ``outer_step_at``);
4. the last batch of the epoch ends with a blocking average over all nodes (node-local mean
   first, then the cross-node mean, in bfloat16 by default: ``downcast``; optionally of the
   optimizer state too), so every epoch ends with all ranks identical;
5. after the epoch, the loss averaged over all ranks goes to :class:`~daso.schedule.DASOSchedule`.

During warm-up and cool-down the schedule is blocking (``global_skips = 0``): every batch
ends with a blocking average of the model state (``blocking_sync: parameters``, the paper's),
or its gradients are averaged over every rank before ``optimizer.step()``
(``blocking_sync: gradients``: ``ddp``'s step for any optimizer, also adaptive ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, model_validator

from daso.comm import WIRE_DTYPES, no_sync, optimizer_state_tensors, synced_state_tensors
from daso.options import OuterOptimizerOptions, WireDtype
from daso.schedule import CYCLING, DASOSchedule
from daso.strategies.averaging import CrossNodeAverager
from daso.strategies.base import EpochCounters, Strategy
from daso.strategies.outer import build_outer_optimizer
from daso.strategies.overlap import OverlappedGradientSum
from daso.topology import ProcessGroups

#: Per-epoch counts in :meth:`DASOStrategy.window_metrics`.
SYNC_COUNTS = ("sends", "merges", "blocking_averages")


class DASOOptions(OuterOptimizerOptions):
    warmup_windows: int = Field(
        4,
        ge=0,
        validation_alias=AliasChoices("warmup_windows", "warmup_epochs"),
        description="Blocking windows at the start (alias warmup_epochs; a window is an "
        "epoch unless window_steps is set).",
    )
    cooldown_windows: int = Field(
        4,
        ge=0,
        validation_alias=AliasChoices("cooldown_windows", "cooldown_epochs"),
        description="Blocking windows at the end (alias cooldown_epochs).",
    )
    stability_level: float = Field(
        0.05, ge=0, lt=1, description="Relative loss improvement below which a window stalls."
    )
    patience: int = Field(2, ge=0, description="Stalled windows before a plateau.")
    max_global_skips: int = Field(
        8, ge=1, description="Largest global_skips; cycling starts at half."
    )
    skip_reduction_factor: int = Field(2, ge=2, description="Skips divided by this per plateau.")
    local_skip_factor: int = Field(
        4, ge=1, description="After a reset, local_skips = batches_to_wait = max / this."
    )
    downcast: WireDtype = Field(
        "bfloat16",
        description="Wire dtype of the blocking cross-node syncs (warm-up, cool-down, window "
        "ends; differences from the anchor).",
    )
    cycling_downcast: WireDtype | None = Field(
        "float32",
        description="Wire dtype of the non-blocking syncs of the cycling phase (null: "
        "downcast). The reference implementation sends float32 there.",
    )
    outer_step_at: Literal["window_end", "every_sync"] = Field(
        "window_end",
        description="Where outer_optimizer steps in the cycling phase: once per window, from "
        "the last window end to the window-end mean; or at every merge and window end.",
    )
    merge: Literal["staleness", "progress"] = Field(
        "progress",
        description="Merge of an arrived sync: progress (mean + own progress since the send) "
        "or staleness ((2W x + N mean) / (2W + N), the paper's eq. 1).",
    )
    sync_optimizer_state: bool = Field(
        True, description="Average optimizer state across nodes at each window end."
    )
    blocking_sync: Literal["parameters", "gradients"] = Field(
        "parameters",
        description="What warm-up and cool-down average across nodes every step: parameters "
        "(the paper: the model after the step) or gradients (before the step: ddp's steps "
        "for any optimizer, e.g. AdamW).",
    )
    sync_momentum: bool = Field(
        False,
        description="Send the optimizer state (momentum) with every non-blocking sync and "
        "merge it like the parameters (SlowMo-style; twice the cycling bytes with SGD momentum).",
    )
    controller: Literal["plateaus", "lr"] = Field(
        "plateaus",
        description="What sets global_skips in the cycling phase: loss plateaus (the paper) or "
        "the learning rate (post-local SGD: ceil(max_global_skips * (1 - lr / peak lr)), "
        "synchronous while the LR is high, looser as it decays).",
    )
    poll_interval_seconds: float = Field(
        0.001,
        ge=0,
        description="MPI_Test then sleep at most this long (seconds) while a sync is in "
        "flight; 0: MPI's blocking progress (spins a core the compute needs).",
    )

    @model_validator(mode="after")
    def _gradients_need_one_optimizer_state(self) -> DASOOptions:
        if self.blocking_sync == "gradients" and not self.sync_optimizer_state:
            raise ValueError(
                "blocking_sync: gradients needs sync_optimizer_state: true (the nodes' "
                "optimizer states must agree for equal gradients to give equal steps); set it, "
                "or use blocking_sync: parameters"
            )
        return self

    def schedule_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~daso.schedule.DASOSchedule`."""
        return {
            "warmup_windows": self.warmup_windows,
            "cooldown_windows": self.cooldown_windows,
            "stability_level": self.stability_level,
            "patience": self.patience,
            "max_global_skips": self.max_global_skips,
            "skip_reduction_factor": self.skip_reduction_factor,
            "local_skip_factor": self.local_skip_factor,
            "controller": self.controller,
        }


class DASOStrategy(Strategy):
    """The DASO strategy (see the module docstring for the algorithm).

    Options (:class:`DASOOptions`): the schedule's (``warmup_windows``,
    ``cooldown_windows``, ``stability_level``, ``patience``, ``max_global_skips``,
    ``skip_reduction_factor``, ``local_skip_factor``: see :class:`~daso.schedule.DASOSchedule`),
    and:

        downcast: wire dtype of the differences from the anchor in the blocking cross-node
            syncs (warm-up and cool-down steps, window ends): ``"bfloat16"`` (default),
            ``"float16"`` or ``"float32"``. The model state itself stays float32; memory: one
            float32 anchor of the synced state per rank.
        cycling_downcast: wire dtype of the non-blocking syncs of the cycling phase
            (``"float32"`` by default, as the reference implementation; ``None``: ``downcast``).
            Cycling moves few bytes (one sync every ``global_skips`` steps, overlapped), so its
            precision costs little time. A different dtype takes a second MPI communicator
            (a duplicate of ``C_k``) and wire buffer.
        merge: ``"progress"`` (default: ``x <- mean + (x - x_sent)``, the node's own progress
            since the send on top of the mean, so nodes do not drift apart between syncs; one
            more float32 copy of the state on the sender while a sync is in flight) or
            ``"staleness"`` (the paper's eq. 1, ``x <- (2W x + N mean) / (2W + N)``, which
            keeps part of every node's divergence at each sync; see benchmarks/README.md for
            the runs behind the default).
        outer_optimizer: ``"none"`` (the plain mean, the paper's algorithm) or ``"nesterov"``
            (DiLoCo's outer SGD with Nesterov momentum, driven by a pseudo-gradient
            ``start - mean``; one more float32 copy of the state per rank, two with
            ``outer_step_at: window_end``). Only the cycling phase steps; the per-batch
            blocking averages of warm-up and cool-down take the plain mean, since an outer
            momentum step after every optimizer step would stack a second momentum on the
            inner one.
        outer_step_at: ``"window_end"`` (default): one outer step per cycling window, at its
            end, from the state at the previous window end (SlowMo's and DiLoCo's horizon of
            many inner steps; merges inside the window take the plain mean).
            ``"every_sync"``: a step at every merge and at the window end, from the anchor of
            the previous sync (horizons of ``global_skips`` steps; a merge on the window's
            last step then takes the plain mean, so that step takes one outer step, not two).
        outer_lr: the outer learning rate (default 1, SlowMo's; DiLoCo: 0.7).
        outer_momentum: the outer Nesterov momentum (default 0.5, SlowMo's largest at 12-48
            inner steps; DiLoCo's 0.9 amplifies short rounds about 7 times and diverges).
        sync_optimizer_state: also average floating-point optimizer state (momentum, Adam
            moments) across nodes in the blocking sync at the end of each epoch.
        blocking_sync: what the blocking windows (warm-up, cool-down) average across nodes
            every step. ``"parameters"`` (default, the paper): the model state after each
            ``optimizer.step()``; with plain or momentum SGD, whose step is linear in the
            gradient, that is ``ddp``'s step, but with an adaptive optimizer (Adam, AdamW)
            it is the mean of steps normalised by node-local gradient statistics, not the
            step on the global gradient. ``"gradients"``: the gradients, over every rank, in
            ``backward()`` bucket by bucket (``hierarchical``'s overlapped allreduce,
            :class:`~daso.strategies.overlap.OverlappedGradientSum`, in the ``downcast``
            dtype), so every blocking step is ``ddp``'s for any optimizer; the
            window-end average still syncs buffers (BatchNorm statistics, which then differ
            across nodes inside a blocking window) and the optimizer state. Needs
            ``sync_optimizer_state`` (the optimizer states must agree when a blocking window
            starts).
        sync_momentum: also send the floating-point optimizer state (SGD's momentum buffers,
            Adam's moments) with every non-blocking sync of the cycling phase and merge it
            with the same rule against its plain mean over nodes (SlowMo, Wang et al. 2020,
            averages the momentum buffers likewise); with SGD momentum it doubles the cycling
            bytes. Default ``False``.
        controller: ``"plateaus"`` (default, the paper's section 3.3) or ``"lr"``:
            :class:`~daso.schedule.DASOSchedule`'s ``controller``.
        poll_interval_seconds: how the communication thread drives MPI (see
            :class:`~daso.comm.CrossNodeSum`): ``MPI_Test`` and sleeps doubling from 50 us to
            at most this (default 1 ms: 13 % faster runs than 0 at 50 Mbit/s with 4 ranks on 2
            cores, benchmarks/README.md), or 0: MPI's blocking call, whose busy progress loop
            takes a core from the compute it overlaps (the lowest latency where cores are
            spare).

    ``epochs`` is the run's number of windows; ``timeout_seconds`` the longest wait for a
    cross-node sum before :class:`~daso.errors.CommTimeoutError`.
    """

    name = "daso"
    summary = "DASO (Coquelin et al. 2022)."
    Options = DASOOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        opts = self.options
        self.schedule = DASOSchedule(epochs, **opts.schedule_options())
        self.wire_dtype = WIRE_DTYPES[opts.downcast]
        self.send_wire_dtype = WIRE_DTYPES[opts.cycling_downcast or opts.downcast]
        self.outer_every_sync = opts.outer_step_at == "every_sync"
        self.merge_rule = opts.merge
        self.sync_optimizer_state = opts.sync_optimizer_state
        self.poll_interval = opts.poll_interval_seconds
        self.pending: tuple[int, int] | None = None  # (batch sent, sender local rank)
        self._received: torch.Tensor | None = None  # a sum waited for by a mid-epoch checkpoint
        self.averager: CrossNodeAverager | None = None
        self.gradients: OverlappedGradientSum | None = None  # blocking_sync: gradients
        self._gradient_bytes = 0  # gradients' byte counter at the last blocking step
        self.counters = EpochCounters()
        self.syncs = dict.fromkeys(SYNC_COUNTS, 0)  # this epoch's sends, merges, averages

    # -- setup -------------------------------------------------------------------------------
    def set_run_length(self, windows: int) -> None:
        super().set_run_length(windows)
        self.schedule.set_windows(windows)

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        tensors, param_numel = synced_state_tensors(model)
        self.averager = CrossNodeAverager(
            self.groups,
            tensors,
            self.wire_dtype,
            self.timeout,
            self.poll_interval,
            param_numel=param_numel,
            outer=build_outer_optimizer(self.options, param_numel, self.groups.device),
            outer_from_window_start=not self.outer_every_sync,
            send_wire_dtype=self.send_wire_dtype,
        )
        if self.options.blocking_sync == "gradients" and self.topology.num_nodes > 1:
            # blocking windows: hierarchical's overlapped bucket allreduce inside backward()
            self.gradients = OverlappedGradientSum(
                self.groups,
                self.wire_dtype,
                self.timeout,
                cross_node=False,
                poll_interval=self.poll_interval,
            )
            self.model = self.wrap_in_node(model, self.gradients.hook)
        else:
            self.model = self.wrap_in_node(model)
        return self.model

    # -- per batch -----------------------------------------------------------------------------
    def sync_context(self, batch: int) -> contextlib.AbstractContextManager:
        # the last batch syncs in the node too, so the epoch-closing average sees one model
        last = batch == self.window_length - 1
        if self.gradients is not None:  # across nodes in blocking windows, in the node else
            self.gradients.cross_node = self.schedule.params.blocking
        if last or self.schedule.params.is_local_sync_batch(batch):
            return contextlib.nullcontext()
        self.averager.node_diverged = True  # the node's ranks step on their own gradients
        return no_sync(self.model)

    def after_backward(self, batch: int) -> None:
        if self.gradients is None or not self.schedule.params.blocking:
            return
        # the gradients were averaged over every rank inside backward(), bucket by bucket
        sent = self.gradients.counters()[0]
        self.syncs["blocking_averages"] += 1
        self.record_event(
            "average", kind="gradients", bytes=sent - self._gradient_bytes, wait_seconds=0.0
        )
        self._gradient_bytes = sent

    def after_step(self, batch: int) -> None:
        params = self.schedule.params
        last = batch == self.window_length - 1
        if self.pending is not None:
            waited = batch - self.pending[0]
            if last or waited >= params.batches_to_wait:
                # on the last step the window-end average takes the one outer step
                self._merge(waited, outer=self.outer_every_sync and not last)
        if last:
            self._epoch_average()
        elif params.blocking and self.topology.num_nodes > 1 and self.gradients is None:
            self._average([], False, "blocking", "DASO blocking average")
        elif params.is_send_batch(batch):
            self._start_send(batch)

    def _start_send(self, batch: int) -> None:
        keep = self.merge_rule == "progress"
        sent, _ = self.averager.counters()
        sender = self.averager.start(
            tag=f"DASO send at batch {batch}", keep_sent=keep, extra=self._sent_with_state()
        )
        self.pending = (batch, sender)
        self.syncs["sends"] += 1
        self.record_event("send", sender=sender, bytes=self.averager.counters()[0] - sent)

    def _sent_with_state(self) -> list[torch.Tensor]:
        """The optimizer state a non-blocking sync carries (``sync_momentum``), else none."""
        return optimizer_state_tensors(self.optimizer) if self.options.sync_momentum else []

    def _merge(self, batches_waited: int, outer: bool) -> None:
        _, sender = self.pending
        self.pending = None
        received, self._received = self._received, None
        sent, waited = self.averager.counters()
        self.averager.merge(
            sender,
            batches_waited,
            summed=received,
            rule=self.merge_rule,
            outer=outer,
            extra=self._sent_with_state(),
        )
        self.syncs["merges"] += 1
        after_sent, after_waited = self.averager.counters()
        self.record_event(
            "merge",
            sender=sender,
            staleness=batches_waited,
            wait_seconds=after_waited - waited,
            bytes=after_sent - sent,
        )

    def _epoch_average(self) -> None:
        """Blocking average closing the epoch: model state, and optimizer state if configured
        (momentum and Adam moments cross as they are, in the wire dtype, once per epoch)."""
        topo = self.topology
        if topo.num_nodes == 1 and topo.local_world_size == 1:
            return
        extra = optimizer_state_tensors(self.optimizer) if self.sync_optimizer_state else []
        cycling = self.schedule.params.phase == CYCLING
        self._average(extra, cycling, "window_end", "DASO end-of-epoch average", window_end=True)

    def _average(
        self, extra: list[torch.Tensor], outer: bool, kind: str, tag: str, window_end=False
    ) -> None:
        averager = self.averager

        def sync() -> None:
            averager.average(extra, outer=outer, tag=tag, window_end=window_end)

        self._blocking(averager, kind, sync)

    def _blocking(self, link: Any, kind: str, sync: Callable[[], None]) -> None:
        """Run the blocking ``sync`` on ``link`` (an averager with ``counters()``), count it
        and record an ``average`` event with its bytes and wait."""
        sent, waited = link.counters()
        sync()
        self.syncs["blocking_averages"] += 1
        after_sent, after_waited = link.counters()
        self.record_event(
            "average", kind=kind, bytes=after_sent - sent, wait_seconds=after_waited - waited
        )

    # -- per epoch -----------------------------------------------------------------------------
    def window_metrics(self) -> dict[str, float]:
        """The schedule's knobs, the bytes and wait, and the epoch's ``sends`` (non-blocking
        syncs started), ``merges`` and ``blocking_averages`` (epoch end included) since the
        previous call."""
        params = self.schedule.params
        syncs, self.syncs = self.syncs, dict.fromkeys(SYNC_COUNTS, 0)
        return {
            "phase": params.phase,
            "global_skips": params.global_skips,
            "local_skips": params.local_skips,
            "batches_to_wait": params.batches_to_wait,
            **syncs,
            **self.counters.since_last(*self._totals()),
        }

    def _totals(self) -> tuple[int, float]:
        """Bytes handed to MPI and seconds waited since the start, parameters and gradients."""
        sent, waited = self.averager.counters()
        if self.gradients is not None:  # its waits are inside backward(), not counted
            sent += self.gradients.counters()[0]
        return sent, waited

    def end_window(self, epoch: int, loss: float) -> None:
        self.schedule.end_window(loss, lr=self.optimizer.param_groups[0]["lr"])

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
        if self.pending is not None and averager.sent_delta is not None:  # every rank's own
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
        if self.gradients is not None:
            self.gradients.close()
