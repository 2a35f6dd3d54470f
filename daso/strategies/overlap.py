"""Overlapped two-level gradient allreduce: a DDP communication hook per gradient bucket.

Horovod and DDP hide the gradient transfer behind the backward pass: a bucket of gradients is
sent as soon as it is ready, while autograd computes the next one. This module does the same
across nodes (the hierarchical allreduce of Horovod and NCCL's trees), bucket by bucket:

1. DDP over the node group calls :meth:`OverlappedGradientSum.hook` when a bucket's gradients
   are ready; the hook starts the node-local sum of the bucket (Gloo/NCCL, asynchronous) and
   hands the bucket to a communication thread, returning a future at once;
2. on that thread, once the node-local sum is done, the bucket is cut into ``K = min_n L_n``
   shards; local rank ``i < K`` sums shard ``i`` over its cross-node MPI group ``C_i``
   (:class:`~daso.comm.CrossNodeSum`, in the wire dtype) and divides by the world size, then
   every shard owner broadcasts its shard inside the node (a node-local allgather, on a Gloo
   group of its own, so it never interleaves with DDP's collectives);
3. the thread completes the bucket's future; DDP copies the averaged bucket into ``p.grad``
   and, at the end of ``backward()``, waits for the last bucket.

Node ``n`` contributes the sum over its ``L_n`` ranks and the total is divided by the world
size, so the result is the mean over *ranks* (``ddp``'s gradient) on uneven nodes too.
Buckets are processed in DDP's order, which is the same on every rank.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from daso.comm import CrossNodeSum, broadcast, shard_bounds
from daso.strategies.averaging import CrossNodeLink
from daso.topology import ProcessGroups, extra_node_group


class OverlappedGradientSum(CrossNodeLink):
    """The communication hook of an overlapped two-level gradient mean (module docstring).

    Args:
        groups: this rank's process groups.
        wire_dtype: dtype of the gradient shards on the MPI wire (float32, bfloat16, float16).
        timeout: seconds a cross-node shard sum may take before
            :class:`~daso.errors.CommTimeoutError` (raised from ``backward()``).
        cross_node: start with buckets summed across nodes (``True``) or only inside the node
            (the plain DDP average; DASO switches per window, :attr:`cross_node`).
        poll_interval: how the MPI thread waits for a shard sum (seconds; see
            :class:`~daso.comm.CrossNodeSum`): 0 inside MPI's blocking call, which spins on
            MPICH's progress engine and takes a core from the backward pass it overlaps; > 0:
            ``MPI_Test`` and sleeps of at most that long.

    Memory: this rank's largest shard of a bucket, in the wire dtype (and a float32 copy).
    Every rank must construct it at the same point (it creates a node-local Gloo group).

    Attributes:
        cross_node: whether the next buckets go across nodes.
        cross: this rank's :class:`~daso.comm.CrossNodeSum`, ``None`` on ranks without a
            cross-node group (they only receive the shards) and on one node.
        buckets: buckets summed across nodes since construction.
    """

    def __init__(
        self,
        groups: ProcessGroups,
        wire_dtype: torch.dtype,
        timeout: float,
        cross_node: bool = True,
        poll_interval: float = 0.0,
    ) -> None:
        self.groups = groups
        self.topology = groups.topology
        self.cross_node = cross_node
        self.buckets = 0
        self.spread_group = extra_node_group(groups)
        self.cross: CrossNodeSum | None = None
        if groups.cross_comm is not None:
            self.cross = CrossNodeSum(
                groups.cross_comm,
                1,
                wire_dtype,
                groups.device,
                timeout=timeout,
                poll_interval=poll_interval,
                cuda_aware_mpi=groups.cuda_aware_mpi,
            )
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daso-buckets")

    # DDP rejects a hook whose ``bucket`` annotation is not the class ``dist.GradBucket``
    # itself, and postponed annotations are strings: left unannotated on purpose.
    def hook(self, state, bucket):  # noqa: ANN001, ANN201
        """DDP communication hook: start the bucket's node-local sum; return a future of its
        mean over the node (``cross_node`` off) or over every rank (on)."""
        buffer = bucket.buffer()
        work = dist.all_reduce(buffer, group=self.groups.node_group, async_op=True)
        if not self.cross_node or self.topology.num_nodes == 1:
            size = self.topology.local_world_size
            return work.get_future().then(lambda fut: fut.value()[0].div_(size))
        result: torch.futures.Future = torch.futures.Future()
        self._thread.submit(self._finish, work, buffer, result, bucket.index())
        return result

    def _finish(self, work: Any, buffer: torch.Tensor, result: torch.futures.Future, index: int):
        """On the communication thread: cross-node shard sum, then the node-local spread."""
        try:
            work.wait()
            topo = self.topology
            bounds = shard_bounds(buffer.numel(), topo.num_cross_groups)
            if self.cross is not None:
                start, stop = bounds[topo.local_rank]
                shard = buffer[start:stop]
                self.cross.reserve(shard.numel())
                shard.copy_(self.cross.allreduce(shard, tag=f"gradient bucket {index}"))
                shard.div_(topo.world_size)
            for owner, (start, stop) in enumerate(bounds):
                src = topo.global_rank(topo.node_rank, owner)
                broadcast(buffer[start:stop], src, self.spread_group)
            self.buckets += 1
            result.set_result(buffer)
        except BaseException as err:  # handed to backward(), which raises it
            result.set_exception(err)

    def close(self) -> None:
        """Stop the communication threads."""
        self._thread.shutdown(wait=True)
        super().close()
