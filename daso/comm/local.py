"""Collectives over ``torch.distributed`` groups: node-local gradient averaging and broadcasts.

Node-local gradient averaging is PyTorch's own ``DistributedDataParallel`` restricted to the
node's process group, so it is bucketed and overlaps the backward pass; a batch skips it
through DDP's public ``no_sync()`` context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from daso.comm.flat import FlatBuffer


class ByteCounter:
    """Bytes a rank has handed to a collective; reset per epoch by the caller.

    Attributes:
        bytes_sent: running total, in bytes.
    """

    def __init__(self) -> None:
        self.bytes_sent = 0

    def allreduce_hook(self, process_group, bucket):  # noqa: ANN001, ANN201
        """DDP communication hook: count the bucket's bytes, then average it as DDP does.

        Left unannotated on purpose: DDP rejects a hook whose ``bucket`` annotation is not
        the class ``dist.GradBucket`` itself, and postponed annotations are strings.
        """
        buffer = bucket.buffer()
        self.bytes_sent += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(process_group, bucket)


def wrap_data_parallel(
    module: torch.nn.Module,
    group: Any,
    group_size: int,
    device: torch.device,
    counter: ByteCounter | None = None,
    fixed_buckets: bool = False,
    comm_hook: Any = None,
    bucket_cap_mb: float | None = None,
) -> torch.nn.Module:
    """Wrap ``module`` so gradients are averaged over ``group`` during ``backward()``.

    Args:
        module: the model, already on ``device``; its parameters are not changed.
        group: the ``torch.distributed`` group to average over.
        group_size: number of ranks in ``group``; with 1 the module is returned unwrapped.
        device: the module's device (CUDA: one device id per process).
        counter: when given, counts the gradient bytes each rank hands to the allreduce.
        fixed_buckets: keep the initial gradient bucket layout for the wrapper's life, so every
            step sums in the same order (bitwise-reproducible resumes; ``trainer.deterministic``).
        comm_hook: a DDP communication hook ``hook(state, bucket) -> Future`` that replaces
            the bucket allreduce (then the module is wrapped even for a group of one).
        bucket_cap_mb: DDP's gradient bucket size in MiB (``None``: DDP's default, 25).

    Returns:
        A ``DistributedDataParallel`` (or ``module`` itself for a group of one and no hook).
    """
    if group_size <= 1 and comm_hook is None:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # DDP's default: buffers (BatchNorm statistics) are broadcast from the group's first rank
    # at every forward, so a node holds one set of statistics.
    # fixed_buckets: DDP re-buckets gradients in their arrival order after its first step, so a
    # new wrapper (a resumed run) sums in another order for one step; with more than two ranks
    # that changes the last bits. DDP skips the re-bucketing when it looks for unused
    # parameters, at the price of one walk over the autograd graph per step.
    extra = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    ddp = DistributedDataParallel(
        module,
        device_ids=device_ids,
        process_group=group,
        find_unused_parameters=fixed_buckets,
        **extra,
    )
    if comm_hook is not None:
        ddp.register_comm_hook(None, comm_hook)
    elif counter is not None:
        ddp.register_comm_hook(group, counter.allreduce_hook)
    return ddp


def no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync()`` for a wrapped model (skip the gradient allreduce), else a no-op."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast(tensor: torch.Tensor, src: int, group: Any = None) -> None:
    """In-place broadcast of ``tensor`` from global rank ``src`` to every rank of ``group``."""
    if dist.get_world_size(group) > 1:
        dist.broadcast(tensor, src=src, group=group)


def average_in_group(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """In-place mean of ``tensor`` (float32, any shape) over the ranks of ``group``; every rank
    ends with the same values (a no-op for a group of one). Returns ``tensor``."""
    size = dist.get_world_size(group)
    if size > 1:
        dist.all_reduce(tensor, group=group)
        tensor.div_(size)
    return tensor


def allreduce_sum(values: Sequence[float], device: torch.device, group: Any = None) -> list[float]:
    """Sum a few Python floats over ``group`` in one float64 allreduce.

    Args:
        values: the numbers this rank contributes (losses, counts, bytes).
        device: where the temporary tensor lives (CUDA for NCCL).

    Returns:
        The sums over all ranks, same order.
    """
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, group: Any = None) -> None:
    """Overwrite ``tensors`` on every rank of ``group`` with global rank ``src``'s values.

    Packs them into one flat float32 buffer first, so it is one broadcast, not one per tensor.
    """
    if not tensors or dist.get_world_size(group) <= 1:
        return
    buffer = FlatBuffer(tensors)
    buffer.pack()
    dist.broadcast(buffer.flat, src=src, group=group)
    buffer.unpack()
