"""This rank's share of the data: loaders for training (resumable mid-epoch) and validation,
for sized data sets and for streams (``IterableDataset``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    Subset,
)

from daso.data.batches import RankShard
from daso.errors import ConfigError


class ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler`'s order for the epoch, optionally from ``start`` samples in
    (a mid-epoch resume skips the samples already trained on without loading them)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


def train_loader(
    dataset: Dataset, rank: int, world_size: int, data: Any, trainer: Any, device: torch.device
) -> tuple[DataLoader, int]:
    """This rank's training loader and the epoch's length in optimizer steps.

    A sized data set is shuffled by a :class:`DistributedSampler` (seed ``trainer.seed``, the
    remainder dropped); an epoch is its batches (the last may be short) divided by
    ``trainer.accumulate_steps``, capped at ``trainer.steps_per_epoch``. A stream gives this
    rank every ``world_size``-th item; its epoch is ``trainer.steps_per_epoch`` steps.

    Args:
        data, trainer: the ``data`` and ``trainer`` config sections.

    Raises:
        ConfigError: a stream without ``trainer.steps_per_epoch``, or an epoch shorter than one
            optimizer step.
        ValueError: fewer samples than ranks.
    """
    workers = {"num_workers": data.num_workers, "pin_memory": device.type == "cuda"}
    if isinstance(dataset, IterableDataset):
        if trainer.steps_per_epoch is None:
            raise ConfigError(
                "the training set is an IterableDataset without a length; set "
                "trainer.steps_per_epoch to the optimizer steps of an epoch"
            )
        shard = RankShard(dataset, rank, world_size)
        return DataLoader(shard, batch_size=data.batch_size, **workers), trainer.steps_per_epoch
    if len(dataset) < world_size:
        raise ValueError(
            f"the training set has {len(dataset)} samples, fewer than the {world_size} ranks; "
            "use more data or fewer ranks"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=trainer.seed,
        drop_last=True,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_size=data.batch_size, sampler=ResumableSampler(sampler), **workers
    )
    steps = math.ceil(len(sampler) / data.batch_size) // trainer.accumulate_steps
    if trainer.steps_per_epoch is not None:
        steps = min(steps, trainer.steps_per_epoch)
    if steps < 1:
        raise ConfigError(
            f"an epoch has fewer batches per rank than trainer.accumulate_steps "
            f"({trainer.accumulate_steps}); lower it or data.batch_size"
        )
    return loader, steps


def val_loader(dataset: Dataset, rank: int, world_size: int, data: Any) -> DataLoader:
    """This rank's validation loader: every ``world_size``-th sample from ``rank`` on."""
    if isinstance(dataset, IterableDataset):
        shard: Dataset = RankShard(dataset, rank, world_size)
    else:
        shard = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=data.val_batch_size, num_workers=data.num_workers)


def epoch_batches(loader: DataLoader, epoch: int, start: int, batch_size: int) -> Iterator[Any]:
    """The batches of ``epoch`` from batch ``start`` on; a stream restarts when it ends."""
    if isinstance(loader.dataset, IterableDataset):
        loader.dataset.set_epoch(epoch)
        stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
        return itertools.islice(stream, start, None)
    loader.sampler.set_epoch(epoch, start=start * batch_size)
    return iter(loader)
