"""Decoding the images of a listed split with Pillow into the arrays of a cache file."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from daso.data.layout import Listing
from daso.errors import DataError

__all__ = ["decode_split"]


def decode_split(listing: Listing, chosen: Sequence[int], where: Path) -> dict[str, np.ndarray]:
    """Decode the images ``chosen`` (indices into ``listing``) of the split at ``where``.

    Returns the arrays of a cache file (see :mod:`daso.data.cache`): ``images`` uint8
    ``[N, H, W, 3]`` RGB, ``targets`` int64 ``[N]``, ``classes`` str ``[C]``, ``names``
    str ``[N]`` and ``prefix`` (str scalar) of ``listing``.

    Raises:
        DataError: an image cannot be decoded or differs in size from the first one
            (``<where>/<class>/<file>`` names it).
    """
    images = _decode_all(
        [listing.sources[i] for i in chosen], [f"{where}/{listing.names[i]}" for i in chosen]
    )
    return {
        "images": images,
        "targets": np.asarray([listing.labels[i] for i in chosen], dtype=np.int64),
        "classes": np.asarray(listing.classes, dtype=str),
        "names": np.asarray([listing.names[i] for i in chosen], dtype=str),
        "prefix": np.asarray(listing.prefix, dtype=str),
    }


def _decode(source: Path | bytes, where: str) -> np.ndarray:
    """One image (a file, or encoded bytes) as uint8 ``[H, W, 3]`` RGB; DataError if undecodable."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}; replace or remove the file") from exc


def _decode_all(sources: Sequence[Path | bytes], wheres: Sequence[str]) -> np.ndarray:
    """Decode ``sources`` into one uint8 ``[N, H, W, 3]`` array; DataError unless all share
    one size."""
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
