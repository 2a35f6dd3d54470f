"""Tarballs of an ImageFolder tree: safe one-time extraction, and a one-pass in-memory scan.

:func:`extract_tarball` writes a tarball out once into a cache folder (used by
:func:`daso.data.resolve_imagefolder_root`); :func:`scan_tarball` reads the encoded
images of every split in a single streaming pass instead (used when an
:class:`daso.data.ImageFolderDataset` is given the tarball itself), which is much faster
than writing out tens of thousands of small files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from daso.data.cache import build_once
from daso.errors import DataError

__all__ = [
    "TARBALL_SUFFIXES",
    "extract_members",
    "extract_tarball",
    "is_tarball",
    "scan_tarball",
    "shared_tarball_scans",
    "tarball_identity",
]

log = logging.getLogger(__name__)

TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
"""File name endings (lower-cased) read as tarballs."""

Scan = dict[str, dict[str, dict[str, bytes]]]
"""``{"<folder>/<split>": {class: {file name: encoded bytes}}}``, see :func:`scan_tarball`."""


def is_tarball(path: Path) -> bool:
    """True when ``path`` is a file whose name ends in one of :data:`TARBALL_SUFFIXES`."""
    return path.is_file() and path.name.lower().endswith(TARBALL_SUFFIXES)


def tarball_identity(tarball: Path) -> str:
    """``"<resolved path>|<size in bytes>|<mtime in ns>"``: changes when the tarball is replaced."""
    st = tarball.stat()
    return f"{tarball.resolve()}|{st.st_size}|{st.st_mtime_ns}"


@contextlib.contextmanager
def _open(tarball: Path, verb: str) -> Iterator[tarfile.TarFile]:
    """``tarball`` opened for reading; DataError ("cannot <verb> ...") if it is damaged."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            yield tar
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"cannot {verb} {tarball}: {exc}; the tarball is damaged, re-copy it"
        ) from exc


def _parts(member: tarfile.TarInfo) -> list[str]:
    """The path components of ``member``, without empty and ``.`` components."""
    return [p for p in PurePosixPath(member.name).parts if p not in ("", ".")]


# --------------------------------------------------------------------------- extraction


def extract_members(tar: tarfile.TarFile, tarball: Path, dest: Path) -> None:
    """Stream the regular files and folders of ``tar`` into ``dest``.

    Only plain files and folders are written, each at a checked relative path inside
    ``dest`` (a hand-written equivalent of tarfile's ``"data"`` filter, and far faster
    than ``extractall`` on tens of thousands of small files).

    Raises:
        DataError: a member has an absolute path or ``..``, or is a link or special file.
    """
    made: set[Path] = {dest}
    for member in tar:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise DataError(
                f"refusing to extract {tarball}: member {member.name!r} has an absolute path "
                "or '..'; use a tarball whose members lie inside one folder"
            )
        parts = _parts(member)
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


def extract_tarball(tarball: Path, cache_dir: Path) -> Path:
    """Extract ``tarball`` once into ``cache_dir``; returns the extraction folder.

    The folder is ``<cache_dir>/<name without suffix>-<hash>``, the hash taken over
    :func:`tarball_identity`, so a replaced tarball is extracted afresh. Extraction goes
    to a temporary folder renamed into place only when complete, under a file lock, so
    a half-extracted folder is never used.

    Raises:
        DataError: the tarball is damaged or holds an unsafe member (see
            :func:`extract_members`).
    """
    key = hashlib.sha256(tarball_identity(tarball).encode()).hexdigest()[:16]
    name = tarball.name
    stem = next((name[: -len(s)] for s in TARBALL_SUFFIXES if name.lower().endswith(s)), name)
    target = cache_dir / f"{stem}-{key}"
    return build_once(
        target, lambda: target if target.is_dir() else None, lambda: _extract(tarball, target)
    )


def _extract(tarball: Path, target: Path) -> Path:
    log.info("extracting %s into %s", tarball, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _open(tarball, "extract") as tar:
            extract_members(tar, tarball, tmp)
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


# --------------------------------------------------------------------------- in-memory scan

# Within ``shared_tarball_scans()``, scans are kept here so that the splits of one
# tarball are read in a single pass; None outside (nothing held in memory).
_scan_memo: dict[tuple[str, frozenset[str]], Scan] | None = None


@contextlib.contextmanager
def shared_tarball_scans() -> Iterator[None]:
    """Read each tarball at most once inside this block (for building several splits)."""
    global _scan_memo
    outer = _scan_memo
    _scan_memo = {} if outer is None else outer
    try:
        yield
    finally:
        _scan_memo = outer


def scan_tarball(tarball: Path, suffixes: frozenset[str]) -> Scan:
    """All images of ``tarball`` in one streaming pass.

    Returns ``{"<folder>/<split>": {class: {file name: encoded bytes}}}``: every regular
    member ``<folder>/<split>/<class>/<file>`` (``<folder>`` may be empty or nested)
    whose lower-cased suffix is in ``suffixes``, plus empty class entries for folder
    members, so empty classes can be reported. Members with a component starting with
    a dot are skipped.

    Raises:
        DataError: the tarball is damaged.
    """
    key = (tarball_identity(tarball), suffixes)
    if _scan_memo is not None and key in _scan_memo:
        return _scan_memo[key]
    groups: Scan = {}
    with _open(tarball, "read") as tar:
        for member in tar:
            parts = _parts(member)
            if any(p.startswith(".") for p in parts):
                continue
            if member.isdir():
                if len(parts) >= 2:  # maybe <folder>/<split>/<class>/
                    groups.setdefault("/".join(parts[:-1]), {}).setdefault(parts[-1], {})
                continue
            if (
                not member.isfile()
                or len(parts) < 3
                or os.path.splitext(parts[-1])[1].lower() not in suffixes
            ):
                continue
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - isfile() members always have data
                continue
            group = groups.setdefault("/".join(parts[:-2]), {})
            group.setdefault(parts[-2], {})[parts[-1]] = source.read()
    if _scan_memo is not None:
        _scan_memo[key] = groups
    return groups
