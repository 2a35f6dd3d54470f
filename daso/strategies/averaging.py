"""Cross-node averaging of a model's state, shared by the strategies that average parameters.

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

from daso.comm import CrossNodeSum, FlatBuffer, broadcast, shard_bounds
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
    return CrossNodeSum(groups.cross_comm, stop - start, wire_dtype, groups.device, timeout=timeout)


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


class CrossNodeAverager:
    """Sums or averages ``tensors`` across nodes, then makes every node consistent.

    Args:
        groups: this rank's process groups.
        tensors: the state to sync (parameters and floating-point buffers), shapes any.
        wire_dtype: dtype on the MPI wire (bfloat16, float16 or float32).
        timeout: seconds before a cross-node wait fails with ``CommTimeoutError``.
        poll_interval: progress mode of the communication thread (see ``CrossNodeSum``).

    Attributes:
        state: the :class:`~daso.comm.FlatBuffer` mirroring ``tensors`` (float32 ``[P]``).
        cross: the :class:`~daso.comm.CrossNodeSum`, or ``None`` on ranks without a
            cross-node group (and on a single node).
        sender: local rank whose group talks on the next sync.
    """

    def __init__(
        self,
        groups: ProcessGroups,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype,
        timeout: float,
        poll_interval: float = 0.0,
    ) -> None:
        self.groups = groups
        self.topology = groups.topology
        self.state = FlatBuffer(tensors, device=groups.device)
        self.cross: CrossNodeSum | None = None
        if groups.cross_comm is not None:
            self.cross = CrossNodeSum(
                groups.cross_comm,
                self.state.numel,
                wire_dtype,
                groups.device,
                timeout=timeout,
                poll_interval=poll_interval,
            )
        self.sender = 0

    def next_sender(self) -> int:
        """Local rank whose cross-node group takes this sync; advances the rotation."""
        sender = self.sender
        self.sender = (sender + 1) % self.topology.num_cross_groups
        return sender

    def is_sender(self, sender: int) -> bool:
        """Whether this rank talks across nodes for ``sender``'s sync."""
        return self.topology.local_rank == sender

    def broadcast_from(self, sender: int, buffer: FlatBuffer | None = None) -> None:
        """Node-local broadcast of ``buffer.flat`` from local rank ``sender``, then unpack."""
        buffer = buffer or self.state
        src = self.topology.global_rank(self.topology.node_rank, sender)
        broadcast(buffer.flat, src, self.groups.node_group)
        buffer.unpack()

    def average(
        self, buffer: FlatBuffer | None = None, by_ranks: bool = False, tag: Any = None
    ) -> None:
        """Blocking average of ``buffer`` (default :attr:`state`) over all nodes.

        The buffer is cut into ``K = min_n L_n`` shards and local rank ``i < K`` averages
        shard ``i`` over its cross-node group ``C_i``, so all of a node's ranks use the link at
        once, each for ``1/K`` of the bytes; each owner then broadcasts its shard in the node.
        The node's ranks must hold the same values (they do after node-local gradient
        averaging from a common start).

        Args:
            buffer: the state to average; must fit the communication buffers
                (see :meth:`reserve`).
            by_ranks: weight node ``n`` by its rank count ``L_n`` (the mean over ranks, equal
                to synchronous SGD's mean even with uneven nodes); else every node weighs 1.
            tag: label for timeout errors.
        """
        buffer = buffer or self.state
        topo = self.topology
        sum_shards_over_nodes(
            buffer.pack(),
            self.groups,
            self.cross,
            scale=topo.local_world_size if by_ranks else 1.0,
            divisor=topo.world_size if by_ranks else topo.num_nodes,
            tag=tag,
        )
        buffer.unpack()

    def reserve(self, numel: int) -> None:
        """Make room for buffers of ``numel`` elements on the cross-node wire."""
        if self.cross is not None:
            self.cross.reserve(numel)

    def counters(self) -> tuple[int, float]:
        """``(bytes handed to MPI, seconds waited)`` since construction, this rank."""
        if self.cross is None:
            return 0, 0.0
        return self.cross.bytes_sent, self.cross.wait_seconds

    def close(self) -> None:
        """Stop the communication thread."""
        if self.cross is not None:
            self.cross.close()
