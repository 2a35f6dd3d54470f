"""MNIST (LeCun et al. 1998, "Gradient-based learning applied to document recognition").

Reads the IDX files of the MNIST release and turns them into normalised
:class:`~torch.utils.data.TensorDataset` pairs for training and validation.

The package embeds the 10,000-image MNIST *test* split (``daso/data/mnist/``), so
quick real-data runs need no download; :func:`mnist_datasets` splits it into a
training and a validation part with a seeded permutation.

Example::

    >>> from daso.data import mnist_datasets
    >>> train, val = mnist_datasets(val_size=2000, seed=0)
    >>> len(train), len(val)
    (8000, 2000)
    >>> image, label = train[0]
    >>> image.shape, image.dtype, label.dtype
    (torch.Size([1, 28, 28]), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from daso.errors import DataError

__all__ = [
    "EMBEDDED_MNIST_DIR",
    "MNIST_MEAN",
    "MNIST_STD",
    "find_mnist_files",
    "mnist_datasets",
    "read_idx",
]

EMBEDDED_MNIST_DIR: Path = Path(__file__).resolve().parent / "mnist"
"""Folder holding the embedded MNIST test split (``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``)."""

MNIST_MEAN: float = 0.1307
"""Mean pixel value of MNIST after scaling to [0, 1]."""
MNIST_STD: float = 0.3081
"""Standard deviation of MNIST pixel values after scaling to [0, 1]."""

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",  # unsigned byte
    0x09: "i1",  # signed byte
    0x0B: ">i2",  # short
    0x0C: ">i4",  # int
    0x0D: ">f4",  # float
    0x0E: ">f8",  # double
}
_IDX_IMAGES_MAGIC = 2051  # uint8, 3 dimensions: [N, rows, cols]
_IDX_LABELS_MAGIC = 2049  # uint8, 1 dimension: [N]


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``, plain otherwise).

    The header is a 4-byte magic number ``0x00 0x00 <type> <ndim>`` followed by
    ``ndim`` big-endian uint32 sizes. MNIST images have magic 2051 (uint8, 3 dims)
    and labels magic 2049 (uint8, 1 dim); other element types and ranks of the IDX
    format are read too.

    Args:
        path: the IDX file.

    Returns:
        An array with the dims from the header, in native byte order: uint8
        ``[N, 28, 28]`` for MNIST images, uint8 ``[N]`` for MNIST labels.

    Raises:
        DataError: the file is missing, is not gzip although named ``.gz``, has a
            bad magic number, or holds fewer or more bytes than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"IDX file {path} does not exist or is not a file; "
            "pass the path of an MNIST file such as t10k-images-idx3-ubyte.gz"
        )
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read IDX file {path}: {exc}; the file is damaged "
            "(re-copy it, or gunzip it and pass the unzipped file)"
        ) from exc

    if len(raw) < 4:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, fewer than the 4-byte magic number; "
            "re-copy the file"
        )
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {magic} (0x{magic:08x}); expected "
            f"{_IDX_IMAGES_MAGIC} for images or {_IDX_LABELS_MAGIC} for labels. "
            "Pass an MNIST file such as t10k-images-idx3-ubyte(.gz)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"IDX file {path} is truncated: its header needs {header_len} bytes for {ndim} "
            f"dimensions but the file has {len(raw)}; re-copy the file"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got < expected:
        raise DataError(
            f"IDX file {path} is truncated: header says dims {dims} ({expected} data bytes) "
            f"but only {got} bytes follow; re-copy the file"
        )
    if got > expected:
        raise DataError(
            f"IDX file {path} has {got - expected} bytes beyond the {expected} its header "
            f"(dims {dims}) describes; the file is damaged, re-copy it"
        )
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # Native byte order and a writable copy, so torch.from_numpy works without warnings.
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def _pick(directory: Path, kind: str) -> Path:
    """The single ``*<kind>-idx?-ubyte[.gz]`` file in ``directory`` (see find_mnist_files)."""
    pattern = f"*{kind}*-ubyte*"
    found = sorted(
        p for p in directory.glob(pattern) if p.is_file() and p.name.endswith(("-ubyte", ".gz"))
    )
    if not found:
        raise DataError(
            f"no MNIST {kind} file (*{kind}-idx?-ubyte or *{kind}-idx?-ubyte.gz) in {directory}; "
            "put t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (or the train-* "
            "files) there, or leave data.root unset for the embedded test split"
        )
    if len(found) > 1:
        train = [p for p in found if p.name.startswith("train-")]
        if train:
            found = train
    if len(found) > 1:
        # The same file both gzipped and unzipped (gunzip -k): use the unzipped one.
        plain = [p for p in found if not p.name.endswith(".gz")]
        if len(plain) == 1 and all(p.name in (plain[0].name, plain[0].name + ".gz") for p in found):
            found = plain
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(
            f"ambiguous MNIST {kind} files in {directory}: {names}; "
            "keep one images file and one labels file there"
        )
    return found[0]


def find_mnist_files(root: str | Path | None = None) -> tuple[Path, Path]:
    """Locate the images and labels IDX files of one MNIST split.

    Args:
        root: a folder holding ``*images-idx3-ubyte[.gz]`` and ``*labels-idx1-ubyte[.gz]``;
            ``None`` means :data:`EMBEDDED_MNIST_DIR`. When both ``train-*`` and ``t10k-*``
            files are present the ``train-*`` ones are used; when a file is there both
            gzipped and unzipped, the unzipped one.

    Returns:
        ``(images_path, labels_path)``.

    Raises:
        DataError: ``root`` is not a folder, a file is missing, or the choice is ambiguous.
    """
    directory = EMBEDDED_MNIST_DIR if root is None else Path(root)
    if not directory.is_dir():
        raise DataError(
            f"MNIST root {directory} is not a folder; pass a folder holding "
            "*images-idx3-ubyte[.gz] and *labels-idx1-ubyte[.gz] as data.root, or leave "
            "data.root unset for the embedded test split"
        )
    images = _pick(directory, "images-idx3")
    labels = _pick(directory, "labels-idx1")
    if images.name.split("-")[0] != labels.name.split("-")[0]:
        raise DataError(
            f"MNIST images {images.name} and labels {labels.name} in {directory} come from "
            "different splits; keep one matching pair there"
        )
    return images, labels


def mnist_datasets(
    root: str | Path | None = None, val_size: int = 2000, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """MNIST as a (train, validation) pair of tensor datasets.

    All images of the split found in ``root`` are shuffled with a seeded
    :class:`torch.Generator`; the first ``val_size`` go to validation, the rest to
    training. The split depends only on ``seed`` and the file contents, so every
    rank of a distributed job gets the same split.

    Args:
        root: folder with the IDX files (see :func:`find_mnist_files`); ``None`` uses
            the embedded 10,000-image test split.
        val_size: number of validation images, ``1 <= val_size < N``.
        seed: seed of the split permutation.

    Returns:
        ``(train, val)``; each item is ``(image, label)`` with ``image`` float32
        ``[1, 28, 28]`` normalised as ``(pixel / 255 - 0.1307) / 0.3081`` and ``label``
        an int64 scalar in ``0..9``. ``train.tensors`` is ``(float32 [N - val_size, 1, 28, 28],
        int64 [N - val_size])``, ``val.tensors`` likewise with ``val_size`` rows.

    Raises:
        DataError: files missing or malformed, images and labels of different counts,
            labels outside ``0..9``, or ``val_size`` out of range.
    """
    images_path, labels_path = find_mnist_files(root)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}; "
            "expected uint8 [N, rows, cols] (IDX magic 2051)"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}; "
            "expected uint8 [N] (IDX magic 2049)"
        )
    n = images.shape[0]
    if labels.shape[0] != n:
        raise DataError(
            f"{images_path} has {n} images but {labels_path} has {labels.shape[0]} labels; "
            "use the images and labels files of the same split"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path} holds label {int(labels.max())}; MNIST labels are 0..9")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 1 <= val_size < n:
        raise DataError(
            f"val_size={val_size!r} is out of range for {n} images; "
            f"pass an integer from 1 to {n - 1}"
        )

    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    x.sub_(MNIST_MEAN).div_(MNIST_STD)
    y = torch.from_numpy(labels).to(torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])
