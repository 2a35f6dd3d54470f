"""Batches of any structure, the text data set and the character transformer (one process)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import math

import pytest
import torch

from daso.data.batches import RankShard, batch_size, move_to, split_pair
from daso.data.text import TINY_SHAKESPEARE_SHA256, CharSequences, char_datasets, read_text
from daso.errors import DataError
from daso.models import build_model
from daso.models.charlm import CharTransformer, lm_loss, lm_step

Pair = collections.namedtuple("Pair", "x y")


def test_move_to_keeps_the_structure_and_moves_every_tensor():
    batch = {"a": torch.ones(2), "b": [torch.zeros(2, 3), ("text", 3)], "c": Pair(1, torch.ones(1))}
    moved = move_to(batch, torch.device("meta"))
    assert moved["a"].device.type == "meta" and moved["b"][0].device.type == "meta"
    assert moved["b"][1] == ("text", 3) and isinstance(moved["c"], Pair)
    assert moved["c"].y.device.type == "meta" and moved["c"].x == 1


def test_batch_size_is_the_first_tensors_first_dimension():
    assert batch_size(torch.zeros(5, 2)) == 5
    assert batch_size({"ids": torch.zeros(7, 3), "n": torch.zeros(7)}) == 7
    assert batch_size(("meta", [torch.zeros(4)])) == 4
    assert batch_size(torch.tensor(1.0)) == 1 and batch_size("x") == 1


def test_split_pair_names_the_fix_for_other_structures():
    assert split_pair((1, 2)) == (1, 2)
    with pytest.raises(TypeError, match="step_fn"):
        split_pair({"x": 1})


def test_rank_shards_of_a_stream_are_disjoint_and_cover_it():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10))

    shards = [list(RankShard(Stream(), rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_embedded_tiny_shakespeare_is_the_shared_file():
    text = read_text()
    assert len(text) == 1_115_394
    assert hashlib.sha256(text.encode()).hexdigest() == TINY_SHAKESPEARE_SHA256
    train, val, vocab = char_datasets(context=128)
    assert len(vocab) == 65 and len(train) == 7842 and len(val) == 871
    sample = train[3]
    assert sample["input_ids"].dtype == torch.int64 and sample["input_ids"].shape == (128,)
    assert torch.equal(sample["input_ids"][1:], sample["labels"][:-1])
    assert vocab.decode(train[0]["input_ids"][:9]) == text[:9]


def test_text_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"\xff\xfe\xfa"))
    with pytest.raises(DataError, match="UTF-8"):
        read_text(bad)
    with pytest.raises(DataError, match="too short"):
        CharSequences(torch.zeros(5, dtype=torch.int64), context=8)


def test_char_transformer_shapes_causality_and_size():
    torch.manual_seed(0)
    model = build_model("char_transformer", num_classes=65, context=16)
    assert isinstance(model, CharTransformer)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.2e6
    ids = torch.randint(0, 65, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 65)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 65  # the future does not change the past
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-6)
    labels = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        loss, out = lm_step(model, {"input_ids": ids, "labels": labels})
        assert out is not None and abs(float(loss) - float(lm_loss(logits, labels))) < 1e-6
    assert abs(float(loss) - math.log(65)) < 0.5  # near uniform at init
    with pytest.raises(ValueError, match="exceeds context"):
        model(torch.zeros(1, 17, dtype=torch.int64))
