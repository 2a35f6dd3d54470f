"""The ImageFolder layout: where the splits are, and which images a split holds.

Layout: ``root/<split>/<class>/<name>.(jpg|jpeg|png)``, in a folder or in a tarball
(``[<folder>/]<split>/<class>/<name>``). Class names are the sorted class folder names
and become labels ``0..C-1``. A folder and a tarball of it give the same
:class:`Listing`, so a seeded subset picks the same images from either.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from daso.data.archive import extract_tarball, is_tarball, scan_tarball
from daso.data.cache import cache_folder
from daso.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "Listing",
    "list_folder",
    "list_tarball",
    "resolve_imagefolder_root",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
"""File name suffixes (lower-cased) read as images; other files are ignored."""

_SPLIT_NAMES = ("train", "test")


@dataclass
class Listing:
    """The images of one split, ordered by class (sorted) then by file name.

    Attributes:
        classes: class names, ``classes[label]``.
        names: ``"<class>/<file>"`` of each image.
        labels: the label in ``0..C-1`` of each image.
        sources: what to decode for each image: its file, or a tarball member's bytes.
        prefix: the folder inside a tarball that holds the split (``""`` for a folder).
    """

    classes: list[str]
    names: list[str]
    labels: list[int]
    sources: list[Path | bytes]
    prefix: str = ""

    def choose(self, subset: int | None, seed: int, where: str) -> list[int]:
        """Indices kept: all, or the first ``subset`` of a permutation seeded with ``seed``,
        in ascending order (not stratified).

        Raises:
            DataError: ``subset`` is not an integer from 1 to the number of images
                (``where`` names the split in the message).
        """
        n = len(self.names)
        if subset is None:
            return list(range(n))
        if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= n:
            raise DataError(
                f"subset={subset!r} is out of range for the {n} images of {where}; "
                f"pass an integer from 1 to {n}, or None for all"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return sorted(perm[:subset].tolist())


def _listing(
    found: Mapping[str, Mapping[str, Path | bytes]],
    class_where: Callable[[str], str],
    prefix: str = "",
) -> Listing:
    """``found`` (``{class: {file name: source}}``) as a Listing.

    Raises:
        DataError: a class has no image (``class_where(class)`` names it in the message).
    """
    listing = Listing(sorted(found), [], [], [], prefix)
    for label, cls in enumerate(listing.classes):
        if not found[cls]:
            raise DataError(
                f"class folder {class_where(cls)} holds no .jpg/.jpeg/.png image; add images to it "
                "or remove the folder"
            )
        for name in sorted(found[cls]):
            listing.names.append(f"{cls}/{name}")
            listing.labels.append(label)
            listing.sources.append(found[cls][name])
    return listing


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` whose names do not start with a dot, sorted by name."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    return [folder / name for name in sorted(names)]


def _images(folder: Path) -> dict[str, Path]:
    """``{name: path}`` of the visible image files directly in ``folder``."""
    with os.scandir(folder) as entries:
        return {
            e.name: folder / e.name
            for e in entries
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            and e.is_file()
        }


def list_folder(split_dir: Path) -> Listing:
    """The images of the split folder ``split_dir`` (``<class>/<image>`` inside it).

    Raises:
        DataError: ``split_dir`` has no class folders, or a class folder holds no image.
    """
    class_dirs = _visible_dirs(split_dir)
    if not class_dirs:
        raise DataError(
            f"split folder {split_dir} has no class folders; expected "
            f"{split_dir}/<class>/<image>.jpg (did you pass a class folder or a split folder "
            "instead of the folder holding the splits?)"
        )
    return _listing({d.name: _images(d) for d in class_dirs}, lambda c: str(split_dir / c))


def list_tarball(tarball: Path, split: str) -> Listing:
    """The images of ``split`` in ``tarball``, with their encoded bytes.

    Members ``[<folder>/]<split>/<class>/<file>`` are taken, for a single ``<folder>``
    (``"cifar10"`` in ``cifar10-jpeg.tar.gz``), which becomes ``Listing.prefix``.

    Raises:
        DataError: the tarball is damaged, holds no such split or holds it in several
            folders, or a class folder holds no image.
    """
    groups = {
        g: classes
        for g, classes in scan_tarball(tarball, IMAGE_SUFFIXES).items()
        if g.rsplit("/", 1)[-1] == split and any(classes.values())
    }
    if not groups:
        raise DataError(
            f"{tarball} holds no split {split!r}: no members <folder>/{split}/<class>/<image>; "
            "check the split name and the tarball's layout"
        )
    if len(groups) > 1:
        raise DataError(
            f"{tarball} holds split {split!r} in several folders ({', '.join(sorted(groups))}); "
            "keep one data set per tarball"
        )
    group, found = groups.popitem()
    prefix = group.rsplit("/", 1)[0] if "/" in group else ""
    return _listing(found, lambda c: f"{group}/{c} in {tarball}", prefix)


def _split_holder(folder: Path) -> Path:
    """``folder``, or its only sub-folder when that one holds ``train/`` or ``test/``."""
    if any((folder / s).is_dir() for s in _SPLIT_NAMES):
        return folder
    subdirs = _visible_dirs(folder)
    if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in _SPLIT_NAMES):
        return subdirs[0]
    return folder


def resolve_imagefolder_root(path: str | Path, cache_dir: str | Path | None) -> Path:
    """The folder holding the split folders (``train/``, ``test/``, ...) of an image data set.

    Args:
        path: either a folder laid out as ``<split>/<class>/<image>`` (or a folder whose
            only sub-folder is laid out so, e.g. ``data/cifar10/``), or a ``.tar.gz``,
            ``.tgz`` or ``.tar`` file that unpacks to such a layout, such as
            ``cifar10-jpeg.tar.gz`` (``cifar10/{train,test}/<class>/NNNN.jpg``).
        cache_dir: where a tarball is extracted, once: later calls find the
            extracted copy (keyed by the tarball's path, size and mtime) and skip it.
            Unused for a folder; may then be None.
            Members with absolute paths, ``..``, links or special files are refused;
            a half-extracted folder is never used.

    Returns:
        The folder whose sub-folders are the splits.

    Raises:
        DataError: ``path`` is missing or neither a folder nor a tarball, the tarball
            is damaged or unsafe, ``cache_dir`` is None or cannot be created for a tarball,
            a split has no class folders, or a class folder holds no
            ``.jpg``/``.jpeg``/``.png`` image.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"image data path {path} does not exist; pass a folder laid out as "
            "<split>/<class>/<image>.jpg or a .tar.gz of one "
            "(e.g. ../shared/data/cifar10-jpeg.tar.gz)"
        )
    if path.is_dir():
        root = _split_holder(path)
    elif is_tarball(path):
        if cache_dir is None:
            raise DataError(
                f"{path} is a tarball but no cache_dir was given to extract it into; "
                "pass a writable cache_dir"
            )
        root = _split_holder(extract_tarball(path, cache_folder(cache_dir)))
    else:
        raise DataError(
            f"image data path {path} is neither a folder nor a .tar.gz/.tgz/.tar file; pass "
            "a folder laid out as <split>/<class>/<image>.jpg or a tarball of one"
        )
    splits = _visible_dirs(root)
    if not splits:
        raise DataError(
            f"{root} holds no split folders; expected {root}/<split>/<class>/<image>.jpg "
            "with splits such as train/ and test/"
        )
    for split_dir in splits:
        list_folder(split_dir)
    return root
