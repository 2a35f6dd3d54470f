"""Batches of any structure: moving them to a device, counting their samples, sharding a stream.

A batch is whatever a ``DataLoader`` yields: a tensor, or tuples, lists and dicts of them
(nested), with other leaves (strings, numbers) left alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (non-blocking), structure kept:
    tensors, tuples (named tuples too), lists and mappings, recursively."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the first dimension of its first tensor (1 if it has none)."""
    size = _first_dimension(batch)
    return 1 if size is None else size


def _first_dimension(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            size = _first_dimension(value)
            if size is not None:
                return size
    return None


def split_pair(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch that is a pair.

    Raises:
        TypeError: ``batch`` is not a tuple or list of two (a dict batch needs a ``step_fn``).
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"loss_fn(output, target) needs (inputs, target) batches, got {type(batch).__name__}; "
        "pass step_fn(model, batch) -> loss for batches of another structure"
    )


class RankShard(IterableDataset):
    """Every ``world_size``-th item of an iterable dataset, from item ``rank``: this rank's
    disjoint share of a stream (the stream must yield the same sequence on every rank).

    ``set_epoch(epoch)`` is passed on to the dataset if it has one (to reshuffle a stream).
    """

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.dataset), self.rank, None, self.world_size)
