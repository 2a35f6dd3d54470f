"""Cross-node averaging of a model's state, shared by the strategies that average parameters.

The wire carries differences from an **anchor**, never the state itself: every rank keeps a
float32 copy ``a`` of the model state as it was after the last cross-node sync (bitwise equal on
all ranks); a sync sends ``x - a`` in the wire dtype and forms the mean in float32,
``mean = a + sum_n (x_n - a) / N``, so 16-bit rounding is relative to the update since the last
sync, not to the weight (DESIGN.md, "The wire and the master weights"). The new anchor is the
mean, or the outer optimizer's step from ``a`` along ``a - mean`` (:mod:`daso.strategies.outer`).

Non-blocking syncs (DASO's sends): one rank per node (local rank ``k`` of every node, the
cross-node group ``C_k``) sums the flattened state over the nodes through MPI, then broadcasts
the result inside its node; ``k`` rotates from one sync to the next so every rank of a node
takes turns on the cross-node link (DASO paper, section 3.2). Blocking averages use every
cross-node group at once, each for one shard. Ranks whose local rank has no cross-node group
(uneven nodes) only receive the node broadcasts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from daso.comm import CrossNodeSum, FlatBuffer, average_in_group, broadcast, shard_bounds
from daso.strategies.outer import OuterNesterov
from daso.topology import ProcessGroups


def shard_sum_link(
    groups: ProcessGroups, numel: int, wire_dtype: torch.dtype, timeout: float
) -> CrossNodeSum | None:
    """The cross-node sum a rank needs for :func:`sum_shards_over_nodes` on vectors of
    ``numel`` elements: sized for this rank's shard, or ``None`` without a cross-node group."""
    if groups.cross_comm is None:
        return None
    topo = groups.topology
    start, stop = shard_bounds(numel, topo.num_cross_groups)[topo.local_rank]
    return CrossNodeSum(
        groups.cross_comm,
        stop - start,
        wire_dtype,
        groups.device,
        timeout=timeout,
        cuda_aware_mpi=groups.cuda_aware_mpi,
    )


def sum_shards_over_nodes(
    flat: torch.Tensor,
    groups: ProcessGroups,
    cross: CrossNodeSum | None,
    scale: float = 1.0,
    divisor: float = 1.0,
    tag: Any = None,
) -> torch.Tensor:
    """``flat <- sum over nodes of (scale * flat_node) / divisor``, in place, on every rank.

    The vector is cut into ``K = min_n L_n`` shards; local rank ``i < K`` sums shard ``i``
    over its cross-node group ``C_i`` (all of a node's ranks use the link at once, each for
    ``1/K`` of the bytes, as in Horovod's hierarchical allreduce); each owner then broadcasts
    its shard inside the node. The ranks of a node must hold the same ``flat``.

    Args:
        flat: float32 ``[P]``, identical within the node.
        groups: this rank's process groups.
        cross: this rank's cross-node sum (capacity >= its shard), ``None`` if it has none.
        scale: factor applied to the node's contribution (e.g. ``L_n`` for a mean over ranks).
        divisor: the sum is divided by it (e.g. the world size or the number of nodes).
        tag: label for timeout errors.

    Returns:
        ``flat``.
    """
    topo = groups.topology
    bounds = shard_bounds(flat.numel(), topo.num_cross_groups)
    if cross is not None:
        start, stop = bounds[topo.local_rank]
        shard = flat[start:stop]
        if scale != 1.0:
            shard.mul_(scale)
        shard.copy_(cross.allreduce(shard, tag=tag))
        if divisor != 1.0:
            shard.div_(divisor)
    for owner, (start, stop) in enumerate(bounds):
        broadcast(flat[start:stop], topo.global_rank(topo.node_rank, owner), groups.node_group)
    return flat


class CrossNodeLink:
    """A holder of one :class:`~daso.comm.CrossNodeSum` in :attr:`cross` (``None`` on ranks
    without a cross-node group): its counters, and its shutdown."""

    cross: CrossNodeSum | None

    def counters(self) -> tuple[int, float]:
        """``(bytes handed to MPI, seconds waited)`` since construction, this rank."""
        if self.cross is None:
            return 0, 0.0
        return self.cross.bytes_sent, self.cross.wait_seconds

    def close(self) -> None:
        """Stop the communication thread."""
        if self.cross is not None:
            self.cross.close()


class GradientAverager(CrossNodeLink):
    """Synchronous two-level gradient mean over every rank, after ``backward()``.

    DDP has already averaged the gradients inside the node; this sums the node's flat
    gradient across nodes in shards (:func:`sum_shards_over_nodes`, every local rank on the
    link at once), weighting node ``n`` by its rank count ``L_n`` and dividing by the world
    size: the gradient ``ddp`` computes, so the optimizer step that follows is ``ddp``'s for
    any optimizer (the scheme of Horovod's hierarchical allreduce).

    Args:
        groups: this rank's process groups.
        params: the trainable parameters, in the same order on every rank.
        wire_dtype: dtype of the gradient shards on the MPI wire.
        timeout: seconds before a cross-node wait fails with ``CommTimeoutError``.

    Memory: one float32 ``[P]`` gradient vector and this rank's shard on the wire.
    """

    def __init__(
        self,
        groups: ProcessGroups,
        params: Sequence[torch.Tensor],
        wire_dtype: torch.dtype,
        timeout: float,
    ) -> None:
        self.groups = groups
        self.params = list(params)
        self.grads = FlatBuffer(self.params, device=groups.device)
        self.cross = shard_sum_link(groups, self.grads.numel, wire_dtype, timeout)

    def _gradients(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:  # a parameter unused this step contributes zeros
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def average(self, tag: Any = None) -> None:
        """Replace every ``p.grad`` by the mean over all ranks (no-op on one node)."""
        topo = self.groups.topology
        if topo.num_nodes == 1:
            return  # DDP over the node already averaged over every rank
        grads = self._gradients()
        sum_shards_over_nodes(
            self.grads.pack(grads),
            self.groups,
            self.cross,
            scale=topo.local_world_size,
            divisor=topo.world_size,
            tag=tag,
        )
        self.grads.unpack(tensors=grads)


#: Weight of the local parameters per batch of staleness in DASO's merge (paper, eq. 1: 2W).
STALENESS_WEIGHT = 2


def merge_stale(
    local: torch.Tensor, mean: torch.Tensor, batches_waited: int, num_nodes: int
) -> torch.Tensor:
    """DASO's staleness-weighted merge, in place: ``local <- (2W local + N mean) / (2W + N)``.

    DASO paper, eq. 1, ``(2W x_local + sum_n x_n) / (2W + N)``, with the sum over the N nodes
    of the parameters sent W batches ago written as ``N * mean`` (the mean comes from the delta
    wire in float32, or is the outer optimizer's new anchor).

    Args:
        local: float32 ``[P]``, this rank's current (newer) parameters; overwritten.
        mean: float32 ``[P]``, the cross-node mean of the parameters sent W batches ago.
        batches_waited: W, batches since the send (0 gives ``mean`` itself).
        num_nodes: N.

    Returns:
        ``local``.
    """
    weight = STALENESS_WEIGHT * batches_waited
    return local.mul_(weight).add_(mean, alpha=num_nodes).div_(weight + num_nodes)


class CrossNodeAverager(CrossNodeLink):
    """Averages a model's state across nodes over the delta wire, and keeps every node
    consistent.

    Args:
        groups: this rank's process groups.
        tensors: the state to sync (trainable parameters, then floating-point buffers: see
            :func:`~daso.comm.synced_state_tensors`), shapes any.
        wire_dtype: dtype on the MPI wire (bfloat16, float16 or float32) of the differences
            from the anchor.
        timeout: seconds before a cross-node wait fails with ``CommTimeoutError``.
        poll_interval: progress mode of the communication thread (see ``CrossNodeSum``).
        param_numel: elements of ``tensors`` that are parameters (at the front); the outer
            optimizer steps those, the rest (buffers) take the plain mean. Default: all.
        outer: the outer optimizer (:class:`~daso.strategies.outer.OuterNesterov`), or ``None``
            for the plain average.
        outer_from_window_start: the outer step's pseudo-gradient runs from the state at the
            last window end (:attr:`origin`) to the window-end mean, so one outer step covers
            a whole window whatever syncs happened inside it (DASO's ``outer_step_at:
            window_end``); ``False``: from the anchor of the previous sync.
        send_wire_dtype: wire dtype of the non-blocking syncs (:meth:`start`), if other than
            ``wire_dtype`` (DASO's ``cycling_downcast``); they then run on a duplicate of the
            cross-node communicator, with a wire buffer of their own.

    Memory: besides :attr:`state`, one float32 ``[P]`` anchor per rank (and one more ``[P]``
    momentum buffer with ``outer``, one more ``[P]`` origin with
    ``outer_from_window_start``), ``P`` the number of synced elements; while a non-blocking
    sync with ``keep_sent`` is in flight, one more ``[P]`` per rank.

    Attributes:
        state: the :class:`~daso.comm.FlatBuffer` mirroring ``tensors`` (float32 ``[P]``).
        anchor: float32 ``[P]``, the state after the last cross-node sync; equal on all ranks.
        cross: the :class:`~daso.comm.CrossNodeSum`, or ``None`` on ranks without a
            cross-node group (and on a single node).
        sender: local rank whose group talks on the next non-blocking sync.
        node_diverged: set by the strategy when the ranks of a node may hold different
            parameters (a batch without node-local gradient averaging); the next blocking
            average then takes the node-local mean of everything first (otherwise only of the
            buffers, which every rank updates from its own batch).
        origin: float32 ``[P]``, the state at the last window end (``outer_from_window_start``),
            else ``None``.
    """

    def __init__(
        self,
        groups: ProcessGroups,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype,
        timeout: float,
        poll_interval: float = 0.0,
        param_numel: int | None = None,
        outer: OuterNesterov | None = None,
        outer_from_window_start: bool = False,
        send_wire_dtype: torch.dtype | None = None,
    ) -> None:
        self.groups = groups
        self.topology = groups.topology
        self.state = FlatBuffer(tensors, device=groups.device)
        self.param_numel = self.state.numel if param_numel is None else param_numel
        self.anchor = self.state.pack().clone()
        self.outer = outer
        self.origin = self.anchor.clone() if outer is not None and outer_from_window_start else None
        self._sum: torch.Tensor | None = None  # receive buffer of a merge's sum (non-senders)
        self.node_diverged = False
        self.cross: CrossNodeSum | None = None
        self.sends: CrossNodeSum | None = None  # the sum of the non-blocking syncs
        if groups.cross_comm is not None:

            def link(comm: Any, dtype: torch.dtype) -> CrossNodeSum:
                return CrossNodeSum(
                    comm,
                    self.state.numel,
                    dtype,
                    groups.device,
                    timeout=timeout,
                    poll_interval=poll_interval,
                    cuda_aware_mpi=groups.cuda_aware_mpi,
                )

            self.cross = self.sends = link(groups.cross_comm, wire_dtype)
            if send_wire_dtype not in (None, wire_dtype):
                self.sends = link(groups.cross_comm.Dup(), send_wire_dtype)
        self.sender = 0
        self._extended: FlatBuffer | None = None
        self._sent: torch.Tensor | None = None  # one node: the sum over nodes of the delta
        self.sent_delta: torch.Tensor | None = None  # the sender's own x_sent - anchor

    def counters(self) -> tuple[int, float]:
        """``(bytes handed to MPI, seconds waited)`` since construction, this rank, blocking
        and non-blocking syncs together."""
        sent, waited = super().counters()
        if self.sends is not None and self.sends is not self.cross:
            sent, waited = sent + self.sends.bytes_sent, waited + self.sends.wait_seconds
        return sent, waited

    def close(self) -> None:
        """Stop the communication threads."""
        super().close()
        if self.sends is not None and self.sends is not self.cross:
            self.sends.close()

    # -- the anchor ------------------------------------------------------------------------
    def _advance_anchor(
        self, mean: torch.Tensor, outer: bool = True, window_end: bool = False
    ) -> torch.Tensor:
        """``anchor <- mean``, or, with ``outer`` and an outer optimizer, its step along
        ``start - mean`` (``start``: :attr:`origin` if kept, else the anchor); at a
        ``window_end`` the origin moves to the new anchor. Returns the anchor."""
        if self.outer is None or not outer:
            self.anchor.copy_(mean)
        else:
            n = self.param_numel
            start = self.origin if self.origin is not None else self.anchor
            self.outer.step(start[:n], mean[:n])
            self.anchor[:n].copy_(start[:n])
            self.anchor[n:].copy_(mean[n:])
        if window_end and self.origin is not None:
            self.origin.copy_(self.anchor)
        return self.anchor

    # -- non-blocking (DASO's sends) -------------------------------------------------------
    def next_sender(self) -> int:
        """Local rank whose cross-node group takes this sync; advances the rotation."""
        sender = self.sender
        self.sender = (sender + 1) % self.topology.num_cross_groups
        return sender

    def is_sender(self, sender: int) -> bool:
        """Whether this rank talks across nodes for ``sender``'s sync."""
        return self.topology.local_rank == sender

    def start(
        self, tag: Any = None, keep_sent: bool = False, extra: Sequence[torch.Tensor] = ()
    ) -> int:
        """Start the non-blocking sum over nodes of ``[x - anchor | extra]`` on the next
        sender's cross-node group; returns at once with the sender's local rank.

        ``extra`` (``Q`` elements, e.g. the optimizer's momentum buffers: DASO's
        ``sync_momentum``) crosses as it is, not as a difference; :meth:`merge` must get the
        same tensors. With ``keep_sent`` every rank keeps its own float32 ``[P + Q]`` vector
        as sent in :attr:`sent_delta` while the sync is in flight (for the ``progress``
        merge), since a node's ranks may hold different states (local skips); the sender's
        is the one summed."""
        sender = self.next_sender()
        buffer = self._buffer_with(extra)
        flat = buffer.pack()
        flat[: self.state.numel].sub_(self.anchor)
        self.sent_delta = flat.clone() if keep_sent else None
        if self.is_sender(sender):
            if self.sends is not None:
                self.sends.start(flat, tag=tag)
            else:
                self._sent = flat.clone()
        return sender

    def collect(self) -> torch.Tensor:
        """On the sender: block until its sum arrives; float32 ``[P]``, ``sum_n (x_n - a)``."""
        if self.sends is not None:
            return self.sends.wait()
        sent, self._sent = self._sent, None
        return sent

    def merge(
        self,
        sender: int,
        batches_waited: int,
        summed: torch.Tensor | None = None,
        rule: str = "staleness",
        outer: bool = True,
        extra: Sequence[torch.Tensor] = (),
    ) -> None:
        """Complete ``sender``'s sync: the sender broadcasts the sum over nodes inside its node
        (one float32 ``[P]`` broadcast); on every rank the anchor becomes the mean (or, with
        ``outer``, the outer step) and the rank merges its own newer state with the new anchor
        ``a'``, so the progress a node's ranks made on their own gradients since the send
        (local skips) is kept; where the node's ranks agree, they still agree bit for bit.

        Rules, with ``x`` the rank's current state and ``x_sent`` its state at the send:

        * ``"staleness"`` (DASO paper, eq. 1): ``x <- (2W x + N a') / (2W + N)``
          (:func:`merge_stale`);
        * ``"progress"``: ``x <- a' + (x - x_sent)``, the node's own progress since the send
          laid on the new global point (needs :meth:`start` with ``keep_sent``); every node
          then differs from the others only by its last W batches of progress.

        Args:
            sender: the local rank :meth:`start` returned.
            batches_waited: W, optimizer steps since the send.
            summed: the sender's completed sum, if it was already collected (a checkpoint).
            rule: ``"staleness"`` or ``"progress"``.
            outer: take the outer optimizer's step (if there is one), else the plain mean.
            extra: the tensors :meth:`start` sent with the state; they take the same rule
                against their plain mean (``progress``: ``m <- mean_m + (m - m_sent)``).
        """
        topo = self.topology
        src = topo.global_rank(topo.node_rank, sender)
        buffer = self._buffer_with(extra)
        if self.is_sender(sender):
            total = summed if summed is not None else self.collect()
        else:
            if self._sum is None or self._sum.numel() < buffer.numel:
                self._sum = torch.empty(buffer.numel, device=self.anchor.device)
            total = self._sum[: buffer.numel]
        broadcast(total, src, self.groups.node_group)
        n, nodes = self.state.numel, topo.num_nodes
        if self.sent_delta is not None:  # as sent: the state, and extra as it was
            sent = self.sent_delta
            sent[:n].add_(self.anchor)
        anchor = self._advance_anchor(self.anchor + total[:n] / nodes, outer)
        flat = buffer.pack()
        mean = torch.cat([anchor, total[n:] / nodes]) if buffer.numel > n else anchor
        if rule == "progress":
            flat.sub_(sent).add_(mean)
        else:
            merge_stale(flat, mean, batches_waited, nodes)
        buffer.unpack()
        self.sent_delta = None

    # -- blocking ----------------------------------------------------------------------------
    def _buffer_with(self, extra: Sequence[torch.Tensor]) -> FlatBuffer:
        if not extra:
            return self.state
        tensors = self.state.tensors + list(extra)
        if self._extended is None or not self._extended.matches(tensors):
            self._extended = FlatBuffer(tensors, device=self.groups.device)
            self.reserve(self._extended.numel)
        return self._extended

    def average(
        self,
        extra: Sequence[torch.Tensor] = (),
        by_ranks: bool = False,
        outer: bool = True,
        tag: Any = None,
        window_end: bool = False,
    ) -> None:
        """Blocking average of the model state (and of ``extra``) over all nodes.

        1. The node is made consistent: the node-local mean of everything if
           :attr:`node_diverged`, else of the buffers (BatchNorm statistics, which each rank
           updates from its own batch);
        2. the flat vector ``[x - anchor | extra]`` is cut into ``K = min_n L_n`` shards and
           local rank ``i < K`` sums shard ``i`` over its cross-node group ``C_i`` in the wire
           dtype, so all of a node's ranks use the link at once, each for ``1/K`` of the
           bytes; each owner then broadcasts its shard in the node;
        3. in float32: ``mean = anchor + sum / N``, the anchor advances (plain mean or outer
           step) and the model takes the new anchor; ``extra`` takes its plain mean.

        Args:
            extra: more floating-point tensors to average as they are (not as differences:
                optimizer state such as momentum buffers), identical layout on every rank.
            by_ranks: weight node ``n`` by its rank count ``L_n`` (the mean over ranks, equal
                to synchronous SGD's mean even with uneven nodes); else every node weighs 1.
            outer: take the outer optimizer's step (if there is one); ``False``: the plain
                mean (DASO's blocking warm-up and cool-down, ``local_sgd``'s warm-up steps).
            tag: label for timeout errors.
            window_end: the average closes a window (the :attr:`origin` of the next outer
                step moves to its result).
        """
        buffer = self._buffer_with(extra)
        topo = self.topology
        flat = buffer.pack()
        consistent_until = 0 if self.node_diverged else self.param_numel
        if topo.local_world_size > 1 and consistent_until < buffer.numel:
            average_in_group(flat[consistent_until:], self.groups.node_group)
        model = flat[: self.state.numel]
        model.sub_(self.anchor)
        sum_shards_over_nodes(
            flat,
            self.groups,
            self.cross,
            scale=topo.local_world_size if by_ranks else 1.0,
            divisor=topo.world_size if by_ranks else topo.num_nodes,
            tag=tag,
        )
        model.copy_(self._advance_anchor(model.add_(self.anchor), outer, window_end))
        buffer.unpack()
        self.node_diverged = False

    def reserve(self, numel: int) -> None:
        """Make room for buffers of ``numel`` elements on the cross-node wire."""
        if self.cross is not None:
            self.cross.reserve(numel)
        if self.sends is not None and self.sends is not self.cross:
            self.sends.reserve(numel)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Sender rotation, the anchor (float32 ``[P]``, CPU), the outer optimizer's state and
        the window's origin (if kept)."""
        state: dict[str, Any] = {"sender": self.sender, "anchor": self.anchor.cpu().clone()}
        if self.outer is not None:
            state["outer"] = self.outer.state_dict()
        if self.origin is not None:
            state["origin"] = self.origin.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.sender = int(state["sender"])
        self.anchor.copy_(state["anchor"])
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
        if self.origin is not None:
            self.origin.copy_(state.get("origin", state["anchor"]))
