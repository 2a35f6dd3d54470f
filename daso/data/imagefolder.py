"""Image classification data in the ImageFolder layout, decoded once and cached.

All images of a split (see :mod:`daso.data.layout`) are decoded with Pillow to RGB and
kept in memory as one uint8 tensor ``[N, H, W, 3]``; the decoded array is cached to
``cache_dir`` (see :mod:`daso.data.cache`) so that later runs (and the other ranks of a
job) load it instead of decoding again. A tarball can be extracted once with
:func:`resolve_imagefolder_root`, or read directly by :class:`ImageFolderDataset` and
:func:`cifar10_datasets` in one streaming pass (see :mod:`daso.data.archive`).

CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images")
is read through :func:`cifar10_datasets`, with the augmentation of He et al. 2016
("Deep Residual Learning for Image Recognition", section 4.2): 4-pixel zero padding,
a random 32x32 crop and a random horizontal flip.

Example::

    >>> from daso.data import cifar10_datasets
    >>> train, test = cifar10_datasets("../shared/data/cifar10-jpeg.tar.gz", "/tmp/daso-cache")
    >>> image, label = train[0]
    >>> image.shape, image.dtype, label.dtype
    (torch.Size([3, 32, 32]), torch.float32, torch.int64)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from daso.data.archive import is_tarball, shared_tarball_scans, tarball_identity
from daso.data.cache import build_once, cache_file, folder_key, read_cache, tarball_key, write_cache
from daso.data.decode import decode_split
from daso.data.layout import (
    IMAGE_SUFFIXES,
    Listing,
    list_folder,
    list_tarball,
    resolve_imagefolder_root,
)
from daso.errors import DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_SUFFIXES",
    "ImageFolderDataset",
    "cifar10_datasets",
    "resolve_imagefolder_root",
]

log = logging.getLogger(__name__)

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel (R, G, B) mean of the CIFAR-10 training images scaled to [0, 1]."""
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel (R, G, B) standard deviation of the CIFAR-10 training images in [0, 1]."""


def _as_channel_tensor(values: Sequence[float], what: str) -> torch.Tensor:
    """``values`` as float32 ``[3, 1, 1]``; DataError unless they are 3 numbers."""
    try:
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}={values!r} is not a sequence of 3 numbers (R, G, B)") from exc
    if t.numel() != 3:
        raise DataError(f"{what}={values!r} has {t.numel()} values; pass 3 (R, G, B)")
    return t.view(3, 1, 1)


class ImageFolderDataset(Dataset):
    """One split of an ImageFolder-layout data set, decoded into memory and cached.

    Reads ``root/<split>/<class>/*.(jpg|jpeg|png)`` from a folder, or the members
    ``[<folder>/]<split>/<class>/<image>`` straight from a ``.tar.gz``/``.tgz``/``.tar``
    (one streaming pass, no extraction: writing tens of thousands of small files is
    far slower than reading them from the archive). Classes are the sorted class
    folder names (labels ``0..C-1``); within a class, files are sorted by name.

    The decoded images are one uint8 tensor ``[N, H, W, 3]`` (RGB), cached in
    ``cache_dir`` as an ``.npz`` whose name carries a hash of

    - for a folder: the split path, the whole file list, ``subset``/``seed`` and the
      sizes and mtimes of the chosen files;
    - for a tarball: its path, size and mtime, the split, ``subset`` and ``seed``;

    so a changed folder or tarball is decoded afresh. The cache is written to a
    temporary file and renamed into place; processes on one host that build the same
    cache at once wait on a file lock, and only the first decodes.

    Args:
        root: the folder holding the split folders (see :func:`resolve_imagefolder_root`),
            or a tarball of such a folder.
        split: split folder name, e.g. ``"train"``.
        cache_dir: folder for the decoded cache; ``None`` decodes on every construction.
        mean: per-channel (R, G, B) mean subtracted from pixels scaled to [0, 1].
        std: per-channel (R, G, B) standard deviation the centred pixels are divided by.
        augment: apply the CIFAR augmentation of He et al. 2016: pad ``pad`` zero
            (black) pixels on each side, crop a random ``H x W`` window, flip horizontally
            with probability 0.5. Uses torch's global RNG, so ``torch.manual_seed`` makes
            it repeatable (DataLoader workers get their own seeds from torch).
        subset: keep only this many images: the first ``subset`` of a permutation of all
            files seeded with ``seed`` (not stratified), kept in file order. Only those
            images are decoded.
        seed: seed of the ``subset`` permutation.
        pad: zero padding (pixels per side) of the random crop; CIFAR uses 4.

    Attributes:
        classes: class names, ``classes[label]``.
        names: ``"<class>/<file>"`` of each item.
        files: where each item came from: a file path, or ``<tarball>/<member>``.
        images: uint8 tensor ``[N, H, W, 3]``.
        targets: int64 tensor ``[N]`` of labels in ``0..C-1``.
        cache_file: the ``.npz`` cache, or None without ``cache_dir``.

    Items are ``(image, label)``: ``image`` float32 ``[3, H, W]`` equal to
    ``(pixel / 255 - mean) / std`` (after augmentation), ``label`` an int64 scalar tensor.

    Raises:
        DataError: ``root`` or the split is missing, a split has no class folders, a
            class folder is empty, an image cannot be decoded or differs in size from the
            others, ``mean``/``std`` are not 3 numbers (or ``std`` has a non-positive
            entry), ``pad`` is negative, ``subset`` is out of range, or ``cache_dir``
            cannot be created.

    Example::

        >>> ds = ImageFolderDataset("/tmp/cifar10", "test", "/tmp/cache",
        ...                         mean=CIFAR10_MEAN, std=CIFAR10_STD, subset=100)
        >>> ds[0][0].shape, len(ds), len(ds.classes)
        (torch.Size([3, 32, 32]), 100, 10)
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        cache_dir: str | Path | None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        *,
        augment: bool = False,
        subset: int | None = None,
        seed: int = 0,
        pad: int = 4,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.augment = bool(augment)
        self.pad = int(pad)
        self.cache_file: Path | None = None
        self._mean = _as_channel_tensor(mean, "mean")
        self._std = _as_channel_tensor(std, "std")
        if not bool((self._std > 0).all()):
            raise DataError(f"std={tuple(std)!r} has a non-positive entry; pass positive values")
        if self.pad < 0:
            raise DataError(f"pad={pad!r} is negative; pass 0 or more pixels")
        arrays = self._load(cache_dir, subset, seed)
        where = self.root / str(arrays["prefix"]) / split
        self.classes: list[str] = [str(c) for c in arrays["classes"]]
        self.names: list[str] = [str(n) for n in arrays["names"]]
        self.files: list[str] = [f"{where}/{n}" for n in self.names]
        self.images: torch.Tensor = torch.from_numpy(arrays["images"])
        self.targets: torch.Tensor = torch.from_numpy(arrays["targets"]).to(torch.int64)

    def _load(
        self, cache_dir: str | Path | None, subset: int | None, seed: int
    ) -> dict[str, np.ndarray]:
        """The split's arrays (as in a cache file): from the cache, or listed and decoded."""
        listing: Listing | None = None  # a tarball is listed only when decoding
        if self.root.is_dir():  # list now: the cache key covers the file list
            split_dir = self.root / self.split
            if not split_dir.is_dir():
                raise DataError(
                    f"split folder {split_dir} does not exist; expected "
                    f"{self.root}/{self.split}/<class>/<image>.jpg (call resolve_imagefolder_root "
                    "on a parent folder first)"
                )
            listing = list_folder(split_dir)
            chosen = listing.choose(subset, seed, str(split_dir))
            stem, count = split_dir.parent.name, str(len(chosen))
            key = folder_key(split_dir, listing.names, chosen, subset, seed) if cache_dir else ""
        elif is_tarball(self.root):
            stem, count = self.root.name.split(".")[0], "all" if subset is None else str(subset)
            key = tarball_key(tarball_identity(self.root), self.split, subset, seed)
        else:
            raise DataError(
                f"image data root {self.root} is neither a folder nor a .tar.gz/.tgz/.tar file; "
                f"pass the folder holding {self.split}/<class>/<image>.jpg, or a tarball of it"
            )

        def decode() -> dict[str, np.ndarray]:
            found = listing if listing is not None else list_tarball(self.root, self.split)
            where = self.root / found.prefix / self.split
            return decode_split(found, found.choose(subset, seed, str(where)), where)

        if cache_dir is None:
            return decode()
        path = self.cache_file = cache_file(cache_dir, stem, self.split, count, key)

        def build() -> dict[str, np.ndarray]:
            log.info("decoding split %r of %s into %s", self.split, self.root, path)
            arrays = decode()
            write_cache(path, arrays)
            return arrays

        return build_once(path, lambda: read_cache(path), build)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float32 [3, H, W], int64 scalar)`` for image ``index``."""
        img = self.images[index].permute(2, 0, 1).to(torch.float32).div_(255.0)
        if self.augment:
            img = self._random_crop_flip(img)
        img = img.sub_(self._mean).div_(self._std)
        return img, self.targets[index]

    def _random_crop_flip(self, img: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``img [3, H, W]`` by ``pad``, crop a random ``H x W`` window, maybe flip."""
        _, h, w = img.shape
        if self.pad:
            offsets = torch.randint(0, 2 * self.pad + 1, (2,))
            top, left = int(offsets[0]), int(offsets[1])
            padded = F.pad(img, (self.pad, self.pad, self.pad, self.pad))
            img = padded[:, top : top + h, left : left + w]
        if bool(torch.rand(()) < 0.5):
            img = img.flip(2)
        return img.contiguous()

    def __repr__(self) -> str:
        h, w = (self.images.shape[1], self.images.shape[2]) if len(self) else (0, 0)
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, size={h}x{w}, augment={self.augment})"
        )


def cifar10_datasets(
    root: str | Path,
    cache_dir: str | Path | None,
    augment: bool = True,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """CIFAR-10 (Krizhevsky 2009) as a (train, validation) pair from the ``train``/``test`` splits.

    Args:
        root: a folder accepted by :func:`resolve_imagefolder_root`, or a tarball such
            as ``../shared/data/cifar10-jpeg.tar.gz``, read directly without extracting it.
        cache_dir: where decoded images are cached (the full decoded set takes 184 MB);
            None decodes on every call.
        augment: random crop (zero padding 4) and horizontal flip on the training split;
            the test split is never augmented.
        train_subset: keep this many training images (seeded, see ImageFolderDataset).
        val_subset: keep this many test images.
        seed: seed of both subset permutations.

    Returns:
        ``(train, test)``; items are ``(float32 [3, 32, 32], int64)`` normalised with
        :data:`CIFAR10_MEAN` and :data:`CIFAR10_STD`; ``classes`` are the sorted class
        folder names (airplane, automobile, ..., truck for CIFAR-10).

    Raises:
        DataError: as :func:`resolve_imagefolder_root` and :class:`ImageFolderDataset`, or
            when the two splits have different class folders.
    """
    path = Path(root).expanduser()
    if is_tarball(path):
        source = path  # read in one streaming pass per split, no extraction
    else:
        source = resolve_imagefolder_root(path, cache_dir)
    with shared_tarball_scans():  # a tarball is read once for both splits
        train = ImageFolderDataset(
            source,
            "train",
            cache_dir,
            CIFAR10_MEAN,
            CIFAR10_STD,
            augment=augment,
            subset=train_subset,
            seed=seed,
        )
        test = ImageFolderDataset(
            source,
            "test",
            cache_dir,
            CIFAR10_MEAN,
            CIFAR10_STD,
            augment=False,
            subset=val_subset,
            seed=seed,
        )
    if train.classes != test.classes:
        raise DataError(
            f"{source} has classes {train.classes} in train/ but {test.classes} in test/; "
            "both splits need the same class folders"
        )
    return train, test
