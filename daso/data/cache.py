"""The on-disk cache of decoded image splits, and building a file once across processes.

A split is cached as one ``.npz`` holding

- ``images``: uint8 ``[N, H, W, 3]`` (RGB),
- ``targets``: int64 ``[N]`` labels,
- ``classes``: str ``[C]`` class names, ``classes[label]``,
- ``names``: str ``[N]``, ``"<class>/<file>"`` of each image,
- ``prefix``: str scalar, the tarball folder holding the split (``""`` for a folder).

Its name ``<stem>-<split>-<count>-<key[:20]>.npz`` carries a hash (see :func:`folder_key`
and :func:`tarball_key`), so changed inputs get a new file rather than a stale one.
A file is written to a temporary name and renamed into place; processes on one host
that need the same file at once wait on a POSIX advisory lock beside it
(:func:`build_once`), and only the first builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from daso.errors import DataError

try:  # POSIX advisory locks let concurrent ranks on one host share one cache build.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "build_once",
    "cache_file",
    "cache_folder",
    "folder_key",
    "read_cache",
    "tarball_key",
    "write_cache",
]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1
"""Version in every cache key: bump it when a cache file's content changes meaning."""
_ARRAY_KEYS = ("images", "targets", "classes", "names", "prefix")
"""The arrays of a cache file (see the module docstring)."""

T = TypeVar("T")


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


def build_once(target: Path, find: Callable[[], T | None], build: Callable[[], T]) -> T:
    """``find()``, or else ``build()`` while holding the lock ``.<target name>.lock`` beside it.

    ``find`` is asked again once the lock is held: another process may have built
    ``target`` while this one waited, and then ``build`` is not called.
    """
    found = find()
    if found is not None:
        return found
    with _file_lock(target.parent / f".{target.name}.lock"):
        found = find()
        return found if found is not None else build()


def cache_folder(cache_dir: str | Path) -> Path:
    """``cache_dir`` as a Path, created if needed.

    Raises:
        DataError: the folder cannot be created.
    """
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create cache folder {folder}: {exc}; pass a writable cache_dir"
        ) from exc
    return folder


def cache_file(cache_dir: str | Path, stem: str, split: str, count: int | str, key: str) -> Path:
    """``<cache_dir>/<stem>-<split>-<count>-<key[:20]>.npz``, creating ``cache_dir``.

    Characters of ``stem`` other than letters, digits, ``-`` and ``_`` become ``_``.

    Raises:
        DataError: ``cache_dir`` cannot be created.
    """
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "images"
    return cache_folder(cache_dir) / f"{stem}-{split}-{count}-{key[:20]}.npz"


def folder_key(
    split_dir: Path, names: Sequence[str], chosen: Sequence[int], subset: int | None, seed: int
) -> str:
    """Cache key of ``split_dir``: its path, all ``names``, ``subset``/``seed`` and the
    sizes and mtimes of the ``chosen`` files (the whole list decides what a subset picks)."""
    h = hashlib.sha256()
    header = f"v{_CACHE_FORMAT}|dir|{split_dir.resolve()}|{subset}|{seed}|{len(names)}\n"
    h.update(header.encode())
    for name in names:
        h.update(f"{name}\n".encode())
    for i in chosen:
        st = (split_dir / names[i]).stat()
        h.update(f"{i}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def tarball_key(identity: str, split: str, subset: int | None, seed: int) -> str:
    """Cache key of a tarball split: the tarball's ``identity`` (path, size, mtime), the
    split, ``subset`` and ``seed``."""
    text = f"v{_CACHE_FORMAT}|tar|{identity}|{split}|{subset}|{seed}"
    return hashlib.sha256(text.encode()).hexdigest()


def read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of ``path``, or None when it is absent, unreadable or malformed (so the
    split is decoded again; a warning is logged for a bad file)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in _ARRAY_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable image cache %s (%s); decoding again", path, exc)
        return None
    images, targets = arrays["images"], arrays["targets"]
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[3] != 3
        or targets.shape != (images.shape[0],)
        or arrays["names"].shape != (images.shape[0],)
    ):
        log.warning("ignoring malformed image cache %s; decoding again", path)
        return None
    return arrays


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file, fsync, os.replace).

    A failed write is logged as a warning and otherwise ignored: training goes on
    without the cache.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp_name, path)
    except OSError as exc:
        log.warning("cannot write image cache %s (%s); continuing without it", path, exc)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
