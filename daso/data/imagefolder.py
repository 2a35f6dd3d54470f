"""Image classification data in the ImageFolder layout, decoded once and cached.

Layout: ``root/<split>/<class>/<name>.(jpg|jpeg|png)``, in a folder or in a tarball.
Class names are the sorted sub-folder names of the split and become labels
``0..C-1``. All images of a split are decoded with Pillow to RGB and kept in memory
as one uint8 tensor ``[N, H, W, 3]``; the decoded array is cached to ``cache_dir``
so that later runs (and the other ranks of a job) load it instead of decoding again.

A tarball can be extracted once with :func:`resolve_imagefolder_root`, or read
directly by :class:`ImageFolderDataset` and :func:`cifar10_datasets` in one
streaming pass (much faster than writing out 60,000 small files, and nothing but
the decoded cache lands on disk).

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

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from daso.errors import DataError

try:  # POSIX advisory locks let concurrent ranks on one host share one cache build.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGE_SUFFIXES",
    "ImageFolderDataset",
    "cifar10_datasets",
    "resolve_imagefolder_root",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
"""File name suffixes (lower-cased) read as images; other files are ignored."""

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel (R, G, B) mean of the CIFAR-10 training images scaled to [0, 1]."""
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel (R, G, B) standard deviation of the CIFAR-10 training images in [0, 1]."""

_CACHE_FORMAT = 1  # bump when the cache file's content changes meaning
_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_SPLIT_NAMES = ("train", "test")


# --------------------------------------------------------------------------- helpers


def _visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` whose names do not start with a dot, sorted by name."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    return [folder / name for name in sorted(names)]


def _is_image(entry: os.DirEntry[str]) -> bool:
    """True for a visible regular file with an image suffix."""
    name = entry.name
    return (
        not name.startswith(".")
        and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        and entry.is_file()
    )


def _image_names(folder: Path) -> list[str]:
    """Names of the image files directly in ``folder``, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _is_image(e))


def _has_image(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one image file (stops at the first)."""
    with os.scandir(folder) as entries:
        return any(_is_image(e) for e in entries)


def _check_split(split_dir: Path) -> list[Path]:
    """The class folders of ``split_dir``; DataError if there are none or one has no image."""
    classes = _visible_dirs(split_dir)
    if not classes:
        raise DataError(
            f"split folder {split_dir} has no class folders; expected "
            f"{split_dir}/<class>/<image>.jpg (did you pass a class folder or a split folder "
            "instead of the folder holding the splits?)"
        )
    for class_dir in classes:
        if not _has_image(class_dir):
            raise DataError(
                f"class folder {class_dir} holds no .jpg/.jpeg/.png image; add images to it "
                "or remove the folder"
            )
    return classes


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (no-op where locks are unsupported)."""
    if fcntl is None:
        yield
        return
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:  # some network file systems refuse flock: go on without it
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _cache_folder(cache_dir: str | Path) -> Path:
    """``cache_dir`` as a Path, created if needed; DataError if it cannot be."""
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create cache folder {folder}: {exc}; pass a writable cache_dir"
        ) from exc
    return folder


# --------------------------------------------------------------------------- root resolution


def _is_tarball(path: Path) -> bool:
    return path.name.lower().endswith(_TARBALL_SUFFIXES)


def _extract_members(tar: tarfile.TarFile, tarball: Path, dest: Path) -> None:
    """Stream the regular files and folders of ``tar`` into ``dest``.

    Only plain files and folders are written, each at a checked relative path inside
    ``dest``: members with absolute paths, ``..``, links or special files are refused
    (a hand-written equivalent of tarfile's ``"data"`` filter, and far faster than
    ``extractall`` on tens of thousands of small files).
    """
    made: set[Path] = {dest}
    for member in tar:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise DataError(
                f"refusing to extract {tarball}: member {member.name!r} has an absolute path "
                "or '..'; use a tarball whose members lie inside one folder"
            )
        parts = [p for p in name.parts if p not in ("", ".")]
        if not parts:
            continue
        target = dest.joinpath(*parts)
        if member.isdir():
            if target not in made:
                target.mkdir(parents=True, exist_ok=True)
                made.add(target)
        elif member.isfile():
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - isfile() members always have data
                continue
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
        else:
            raise DataError(
                f"refusing to extract {tarball}: member {member.name!r} is a link or special "
                "file; image tarballs may hold only regular files and folders"
            )


def _extract_tarball(tarball: Path, cache_dir: Path) -> Path:
    """Extract ``tarball`` once into ``cache_dir``; returns the extraction folder.

    The folder's name carries a hash of the tarball's path, size and mtime, so a
    replaced tarball is extracted afresh. Extraction goes to a temporary folder that
    is renamed into place only when complete.
    """
    stat = tarball.stat()
    key = hashlib.sha256(
        f"{tarball.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    stem = tarball.name
    for suffix in _TARBALL_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    target = cache_dir / f"{stem}-{key}"
    if target.is_dir():
        return target
    with _file_lock(cache_dir / f".{target.name}.lock"):
        if target.is_dir():  # another process finished it while we waited
            return target
        log.info("extracting %s into %s", tarball, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
        try:
            try:
                with tarfile.open(tarball, "r:*") as tar:
                    _extract_members(tar, tarball, tmp)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DataError(
                    f"cannot extract {tarball}: {exc}; the tarball is damaged, re-copy it"
                ) from exc
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
                # Lost a race with a process that does not honour the lock: use its copy.
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


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
            is damaged or unsafe, a split has no class folders, or a class folder
            holds no ``.jpg``/``.jpeg``/``.png`` image.
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
    elif path.is_file() and _is_tarball(path):
        if cache_dir is None:
            raise DataError(
                f"{path} is a tarball but no cache_dir was given to extract it into; "
                "pass a writable cache_dir"
            )
        root = _split_holder(_extract_tarball(path, _cache_folder(cache_dir)))
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
        _check_split(split_dir)
    return root


# --------------------------------------------------------------------------- listing


class _Listing:
    """The images of one split: class names, sorted relative names and their labels.

    ``names[i]`` is ``"<class>/<file>"``; files are ordered by class (sorted) then by
    file name, the same for a folder and a tarball, so a seeded subset picks the same
    images from either. ``blobs`` holds the encoded bytes of tarball members.
    """

    def __init__(self, classes: list[str], names: list[str], labels: list[int]) -> None:
        self.classes = classes
        self.names = names
        self.labels = labels
        self.blobs: dict[str, bytes] = {}


def _list_folder(split_dir: Path) -> _Listing:
    class_dirs = _check_split(split_dir)
    names: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        for name in _image_names(class_dir):
            names.append(f"{class_dir.name}/{name}")
            labels.append(label)
    return _Listing([d.name for d in class_dirs], names, labels)


# Within ``_shared_tarball_scans()``, scans are kept here so that the splits of one
# tarball are read in a single pass; None outside (nothing held in memory).
_scan_memo: dict[tuple[str, int, int], dict[str, dict[str, dict[str, bytes]]]] | None = None


@contextlib.contextmanager
def _shared_tarball_scans() -> Iterator[None]:
    """Read each tarball at most once inside this block (for building several splits)."""
    global _scan_memo
    outer = _scan_memo
    _scan_memo = {} if outer is None else outer
    try:
        yield
    finally:
        _scan_memo = outer


def _scan_tarball(tarball: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """All images of ``tarball`` in one streaming pass.

    Returns ``{"<folder>/<split>": {class: {file name: encoded bytes}}}``: every image
    member ``<folder>/<split>/<class>/<file>`` (``<folder>`` may be empty or nested),
    plus empty class entries for folder members, so empty classes can be reported.
    """
    st = tarball.stat()
    key = (str(tarball.resolve()), st.st_size, st.st_mtime_ns)
    if _scan_memo is not None and key in _scan_memo:
        return _scan_memo[key]
    groups: dict[str, dict[str, dict[str, bytes]]] = {}
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                parts = [p for p in PurePosixPath(member.name).parts if p not in ("", ".")]
                if any(p.startswith(".") for p in parts):
                    continue
                if member.isdir():
                    if len(parts) >= 2:  # maybe <folder>/<split>/<class>/
                        groups.setdefault("/".join(parts[:-1]), {}).setdefault(parts[-1], {})
                    continue
                if (
                    not member.isfile()
                    or len(parts) < 3
                    or os.path.splitext(parts[-1])[1].lower() not in IMAGE_SUFFIXES
                ):
                    continue
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    continue
                group = groups.setdefault("/".join(parts[:-2]), {})
                group.setdefault(parts[-2], {})[parts[-1]] = source.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"cannot read {tarball}: {exc}; the tarball is damaged, re-copy it"
        ) from exc
    if _scan_memo is not None:
        _scan_memo[key] = groups
    return groups


def _list_tarball(tarball: Path, split: str) -> tuple[_Listing, str]:
    """The images of ``split`` in ``tarball``, with their bytes; returns (listing, folder).

    Members ``[<folder>/]<split>/<class>/<file>`` are taken, for a single ``<folder>``
    (``"cifar10"`` in ``cifar10-jpeg.tar.gz``).
    """
    groups = {
        g: classes
        for g, classes in _scan_tarball(tarball).items()
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
    classes = sorted(found)
    listing = _Listing(classes, [], [])
    for label, cls in enumerate(classes):
        if not found[cls]:
            raise DataError(
                f"class folder {group}/{cls} in {tarball} holds no .jpg/.jpeg/.png "
                "image; add images to it or remove it"
            )
        for name in sorted(found[cls]):
            key = f"{cls}/{name}"
            listing.names.append(key)
            listing.labels.append(label)
            listing.blobs[key] = found[cls][name]
    return listing, prefix


def _choose(n: int, subset: int | None, seed: int, where: str) -> list[int]:
    """Indices kept: all, or the first ``subset`` of a seeded permutation, in ascending order."""
    if subset is None:
        return list(range(n))
    if isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= n:
        raise DataError(
            f"subset={subset!r} is out of range for the {n} images of {where}; "
            f"pass an integer from 1 to {n}, or None for all"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:subset].tolist())


# --------------------------------------------------------------------------- decoding


def _decode(source: Path | bytes, where: str) -> np.ndarray:
    """One image (a file, or encoded bytes) as uint8 ``[H, W, 3]`` RGB."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}; replace or remove the file") from exc


def _decode_all(sources: Sequence[Path | bytes], wheres: Sequence[str]) -> np.ndarray:
    """Decode ``sources`` into one uint8 ``[N, H, W, 3]`` array; all must share one size."""
    first = _decode(sources[0], wheres[0])
    out = np.empty((len(sources), *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, len(sources)):
        img = _decode(sources[i], wheres[i])
        if img.shape != first.shape:
            raise DataError(
                f"image {wheres[i]} is {img.shape[1]}x{img.shape[0]} (WxH) but {wheres[0]} is "
                f"{first.shape[1]}x{first.shape[0]}; all images of a split must share one "
                "size, resize the odd ones"
            )
        out[i] = img
    return out


def _as_channel_tensor(values: Sequence[float], what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what}={values!r} is not a sequence of 3 numbers (R, G, B)") from exc
    if t.numel() != 3:
        raise DataError(f"{what}={values!r} has {t.numel()} values; pass 3 (R, G, B)")
    return t.view(3, 1, 1)


# --------------------------------------------------------------------------- cache


def _read_cache(cache_file: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unreadable (then the split is decoded again)."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("images", "targets", "classes", "names", "prefix")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable image cache %s (%s); decoding again", cache_file, exc)
        return None
    images, targets = arrays["images"], arrays["targets"]
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[3] != 3
        or targets.shape != (images.shape[0],)
        or arrays["names"].shape != (images.shape[0],)
    ):
        log.warning("ignoring malformed image cache %s; decoding again", cache_file)
        return None
    return arrays


def _write_cache(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``cache_file`` atomically (temporary file + os.replace)."""
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{cache_file.name}-", suffix=".tmp", dir=cache_file.parent
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp_name, cache_file)
    except OSError as exc:
        log.warning("cannot write image cache %s (%s); continuing without it", cache_file, exc)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


# --------------------------------------------------------------------------- dataset


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
            entry), ``subset`` is out of range, or ``cache_dir`` cannot be created.

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

        if self.root.is_dir():
            arrays = self._from_folder(cache_dir, subset, seed)
        elif self.root.is_file() and _is_tarball(self.root):
            arrays = self._from_tarball(cache_dir, subset, seed)
        else:
            raise DataError(
                f"image data root {self.root} is neither a folder nor a .tar.gz/.tgz/.tar "
                f"file; pass the folder holding {split}/<class>/<image>.jpg, or a tarball of it"
            )
        self.classes: list[str] = [str(c) for c in arrays["classes"]]
        self.names: list[str] = [str(n) for n in arrays["names"]]
        self.images: torch.Tensor = torch.from_numpy(arrays["images"])
        self.targets: torch.Tensor = torch.from_numpy(arrays["targets"]).to(torch.int64)

    # ----------------------------------------------------------------- sources

    def _from_folder(
        self, cache_dir: str | Path | None, subset: int | None, seed: int
    ) -> dict[str, np.ndarray]:
        split_dir = self.root / self.split
        if not split_dir.is_dir():
            raise DataError(
                f"split folder {split_dir} does not exist; expected "
                f"{self.root}/{self.split}/<class>/<image>.jpg (call resolve_imagefolder_root "
                "on a parent folder first)"
            )
        listing = _list_folder(split_dir)
        chosen = _choose(len(listing.names), subset, seed, str(split_dir))
        paths = [split_dir / listing.names[i] for i in chosen]
        self.files: list[str] = [str(p) for p in paths]

        def decode() -> dict[str, np.ndarray]:
            return self._arrays(_decode_all(paths, self.files), listing, chosen)

        if cache_dir is None:
            return decode()
        h = hashlib.sha256()
        n_all = len(listing.names)
        h.update(f"v{_CACHE_FORMAT}|dir|{split_dir.resolve()}|{subset}|{seed}|{n_all}\n".encode())
        for name in listing.names:  # the whole list: it decides which files a subset picks
            h.update(f"{name}\n".encode())
        for i, path in zip(chosen, paths):  # sizes and mtimes of the decoded files
            st = path.stat()
            h.update(f"{i}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return self._cached(cache_dir, split_dir.parent.name, len(chosen), h.hexdigest(), decode)

    def _from_tarball(
        self, cache_dir: str | Path | None, subset: int | None, seed: int
    ) -> dict[str, np.ndarray]:
        tarball = self.root

        def decode() -> dict[str, np.ndarray]:
            listing, prefix = _list_tarball(tarball, self.split)
            where = f"{tarball}/{prefix + '/' if prefix else ''}{self.split}"
            chosen = _choose(len(listing.names), subset, seed, where)
            blobs = [listing.blobs[listing.names[i]] for i in chosen]
            wheres = [f"{where}/{listing.names[i]}" for i in chosen]
            return self._arrays(_decode_all(blobs, wheres), listing, chosen, prefix)

        if cache_dir is None:
            arrays = decode()
        else:
            st = tarball.stat()
            key = hashlib.sha256(
                f"v{_CACHE_FORMAT}|tar|{tarball.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                f"{self.split}|{subset}|{seed}".encode()
            ).hexdigest()
            n = "all" if subset is None else str(subset)
            stem = tarball.name.split(".")[0]
            arrays = self._cached(cache_dir, stem, n, key, decode)
        prefix = str(arrays["prefix"])
        base = f"{tarball}/{prefix + '/' if prefix else ''}{self.split}"
        self.files = [f"{base}/{n}" for n in arrays["names"]]
        return arrays

    def _arrays(
        self, images: np.ndarray, listing: _Listing, chosen: list[int], prefix: str = ""
    ) -> dict[str, np.ndarray]:
        return {
            "images": images,
            "targets": np.asarray([listing.labels[i] for i in chosen], dtype=np.int64),
            "classes": np.asarray(listing.classes, dtype=str),
            "names": np.asarray([listing.names[i] for i in chosen], dtype=str),
            "prefix": np.asarray(prefix, dtype=str),
        }

    def _cached(
        self,
        cache_dir: str | Path,
        stem: str,
        count: int | str,
        key: str,
        decode: Callable[[], dict[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """Load the cache named by ``key``, or ``decode()`` under a lock and write it."""
        folder = _cache_folder(cache_dir)
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "images"
        cache_file = folder / f"{stem}-{self.split}-{count}-{key[:20]}.npz"
        self.cache_file = cache_file
        arrays = _read_cache(cache_file)
        if arrays is not None:
            return arrays
        with _file_lock(folder / f".{cache_file.name}.lock"):
            arrays = _read_cache(cache_file)  # built by another process while we waited?
            if arrays is not None:
                return arrays
            log.info("decoding split %r of %s into %s", self.split, self.root, cache_file)
            arrays = decode()
            _write_cache(cache_file, arrays)
        return arrays

    # ----------------------------------------------------------------- access

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
    if path.is_file() and _is_tarball(path):
        source = path  # read in one streaming pass per split, no extraction
    else:
        source = resolve_imagefolder_root(path, cache_dir)
    with _shared_tarball_scans():  # a tarball is read once for both splits
        train = ImageFolderDataset(
            source, "train", cache_dir, CIFAR10_MEAN, CIFAR10_STD,
            augment=augment, subset=train_subset, seed=seed,
        )
        test = ImageFolderDataset(
            source, "test", cache_dir, CIFAR10_MEAN, CIFAR10_STD,
            augment=False, subset=val_subset, seed=seed,
        )
    if train.classes != test.classes:
        raise DataError(
            f"{source} has classes {train.classes} in train/ but {test.classes} in test/; "
            "both splits need the same class folders"
        )
    return train, test
