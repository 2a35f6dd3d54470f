"""Character-level language-model data: Tiny Shakespeare, or any UTF-8 text file.

The text is split by position: the first ``1 - val_fraction`` of the characters train, the
rest validate (no sequence straddles the two). Samples are dicts of ``int64[T]`` tensors,
``{"input_ids": text[i:i+T], "labels": text[i+1:i+T+1]}``, taken at a stride of ``T``
characters, so an epoch reads every training character once.

The vocabulary is the sorted set of characters of the whole file (65 for Tiny Shakespeare), so
train and validation share one encoding.

Tiny Shakespeare (Karpathy's char-rnn corpus, 1,115,394 characters of Shakespeare, public
domain) is embedded gzipped in the package and verified by its SHA-256; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from daso.errors import DataError

EMBEDDED = Path(__file__).with_name("text") / "tinyshakespeare.txt.gz"
#: SHA-256 of the uncompressed Tiny Shakespeare text (shared/data/README.md).
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def read_text(path: str | os.PathLike[str] | None = None) -> str:
    """The text of ``path`` (plain or ``.gz`` UTF-8), or the embedded Tiny Shakespeare.

    Raises:
        DataError: the file is missing, not UTF-8, empty, or (embedded copy) corrupt.
    """
    source = Path(path) if path else EMBEDDED
    try:
        raw = source.read_bytes()
        if source.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise DataError(
            f"text file {source} not found; set data.root to a UTF-8 text file"
        ) from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read text file {source}: {err}; give a UTF-8 text file") from err
    if path is None and hashlib.sha256(raw).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"the embedded {EMBEDDED.name} is corrupt; reinstall daso")
    if not text:
        raise DataError(f"text file {source} is empty")
    return text


class CharVocab:
    """The sorted characters of a text and their indices.

    Attributes:
        chars: the characters, index order.
    """

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self._index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``int64[len(text)]`` indices of ``text``'s characters.

        Raises:
            KeyError: a character outside the vocabulary.
        """
        return torch.tensor([self._index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of ``ids`` (``int64[T]``)."""
        return "".join(self.chars[int(i)] for i in ids)


class CharSequences(Dataset):
    """Consecutive windows of an encoded text as next-character samples.

    Args:
        ids: ``int64[N]`` encoded text.
        context: ``T``, characters per sample.

    Raises:
        DataError: fewer than ``context + 1`` characters.
    """

    def __init__(self, ids: torch.Tensor, context: int) -> None:
        if len(ids) < context + 1:
            raise DataError(
                f"a text part of {len(ids)} characters is too short for context {context}; "
                "use a smaller data.context or a longer text"
            )
        self.ids = ids
        self.context = context

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.context

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.context
        chunk = self.ids[start : start + self.context + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def char_datasets(
    path: str | os.PathLike[str] | None = None, context: int = 128, val_fraction: float = 0.1
) -> tuple[CharSequences, CharSequences, CharVocab]:
    """Training and validation sequences of a text, and its vocabulary.

    Args:
        path: a UTF-8 text file (``.gz`` allowed); ``None``: the embedded Tiny Shakespeare.
        context: characters per sample.
        val_fraction: the trailing fraction of the text held out, in (0, 1).

    Raises:
        DataError: unreadable text, or a part shorter than one sample.
        ValueError: ``val_fraction`` outside (0, 1).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = read_text(path)
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    split = int(len(ids) * (1 - val_fraction))
    return CharSequences(ids[:split], context), CharSequences(ids[split:], context), vocab
