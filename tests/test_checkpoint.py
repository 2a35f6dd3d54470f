"""Checkpoint files: atomic and checksummed writes, damage detection, ``--resume auto`` falling
back past a corrupt file, compatibility errors, pruning; and the CLI around them."""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys

import pytest
import torch

from daso import checkpoint as ckpt
from daso.errors import CheckpointError

from mpi_harness import ROOT, mpi_env, train_args


def payload(epoch: int, batch: int = 0, states: int = 1, layout=(2, 2)) -> dict:
    return {
        "meta": {
            "model": "mnist_cnn",
            "strategy": "daso",
            "world_size": sum(layout),
            "layout": list(layout),
            "epoch": epoch,
            "batch": batch,
            "model_signature": [["w", [3]]],
        },
        "shared": {"history": []},
        "states": [
            ckpt.serialize(
                {"model": {"w": torch.full((3,), float(i))}, "optimizer": {}, "strategy": {}}
            )
            for i in range(states)
        ],
        "rank_state": [0] * sum(layout),
        "rank_extra": [ckpt.serialize({"rng": ckpt.capture_rng_state()})] * sum(layout),
    }


def write(folder, epoch, batch=0, **kwargs):
    path = folder / ckpt.checkpoint_name(epoch, batch)
    ckpt.write_atomic(path, ckpt.serialize(payload(epoch, batch, **kwargs)))
    return path


def flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_and_rank_state(tmp_path):
    path = write(tmp_path, 3, states=2)
    loaded = ckpt.read_checkpoint(path)
    assert loaded["meta"]["epoch"] == 3
    state = ckpt.rank_state(loaded, 1, torch.device("cpu"))
    assert torch.equal(state["model"]["w"], torch.zeros(3))
    assert path.read_bytes().startswith(ckpt.MAGIC)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, not left


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = torch.rand(5)
    torch.rand(7)
    ckpt.restore_rng_state(ckpt.deserialize(ckpt.serialize(state)))
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_damage_is_detected(tmp_path, damage):
    path = write(tmp_path, 1)
    if damage == "flip":
        flip_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.write_bytes(b"not a checkpoint" + path.read_bytes())
    with pytest.raises(CheckpointError, match=str(path)):
        ckpt.read_checkpoint(path)


def test_auto_skips_corrupt_newest_with_warning(tmp_path, caplog):
    write(tmp_path, 1)
    write(tmp_path, 2, batch=5)
    newest = write(tmp_path, 3)
    flip_byte(newest)
    (tmp_path / ".ckpt-e00009-b0000000.pt.tmp-123").write_bytes(b"partial")  # a dead writer
    with caplog.at_level(logging.WARNING, logger="daso.checkpoint"):
        path, loaded = ckpt.resolve_resume("auto", tmp_path)
    assert path.name == ckpt.checkpoint_name(2, 5)
    assert (loaded["meta"]["epoch"], loaded["meta"]["batch"]) == (2, 5)
    assert "corrupt" in caplog.text and newest.name in caplog.text
    assert ckpt.resolve_resume("auto", tmp_path / "none") is None
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.resolve_resume(str(newest), tmp_path)


def test_prune_keeps_newest(tmp_path):
    own = [write(tmp_path, epoch).name for epoch in range(1, 6)]
    kept = ckpt.prune(tmp_path, 2, own)
    assert (
        [p.name for p in ckpt.list_checkpoints(tmp_path)]
        == kept
        == [
            ckpt.checkpoint_name(5, 0),
            ckpt.checkpoint_name(4, 0),
        ]
    )


def test_prune_deletes_only_this_runs_files(tmp_path):
    """Another run's newer checkpoints and junk named like a checkpoint are never deleted and
    never push this run's checkpoints out."""
    other = write(tmp_path, 9)
    junk = tmp_path / ckpt.checkpoint_name(99999, 0)
    junk.write_bytes(b"not a checkpoint")
    own = [write(tmp_path, epoch).name for epoch in range(1, 4)]
    assert ckpt.prune(tmp_path, 2, own) == [ckpt.checkpoint_name(3, 0), ckpt.checkpoint_name(2, 0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [other.name, junk.name, ckpt.checkpoint_name(3, 0), ckpt.checkpoint_name(2, 0)]
    )


class Foreign:
    """An object a checkpoint may not hold."""


def test_valid_checksum_but_foreign_content_is_refused_and_auto_falls_back(tmp_path, caplog):
    """A checksummed archive that is not a daso checkpoint (here: a pickled object, then a
    dict without the per-rank states) is a CheckpointError that never advises the unsafe
    ``weights_only=False``; ``--resume auto`` takes the one before it."""
    good = write(tmp_path, 1)
    buffer = io.BytesIO()
    torch.save({"meta": Foreign()}, buffer)  # an object outside plain data
    odd = tmp_path / ckpt.checkpoint_name(2, 0)
    ckpt.write_atomic(odd, buffer.getvalue())
    with pytest.raises(CheckpointError) as err:
        ckpt.read_checkpoint(odd)
    assert "cannot be read" in str(err.value) and "Foreign" in str(err.value)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    shapeless = tmp_path / ckpt.checkpoint_name(3, 0)
    ckpt.write_atomic(shapeless, ckpt.serialize({"meta": {}, "states": []}))
    with pytest.raises(CheckpointError, match="its payload is not daso's: meta"):
        ckpt.read_checkpoint(shapeless)
    with caplog.at_level("WARNING"):
        path, _ = ckpt.resolve_resume("auto", tmp_path)
    assert path == good
    assert sum("skipping" in m for m in caplog.messages) == 2


def test_full_disk_message_gives_the_fix(tmp_path):
    message = ckpt.write_failure(
        tmp_path / "ckpt.pt", OSError(errno.ENOSPC, "No space left on device"), 5_000_000
    )
    assert "No space left on device" in message
    assert "free space there (each checkpoint needs about 5 MB)" in message
    assert "checkpoint.dir" in message and "\n" not in message


def test_write_failure_leaves_old_file(tmp_path, monkeypatch):
    path = write(tmp_path, 1)
    before = path.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        ckpt.write_atomic(path, b"new contents")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_compatibility(tmp_path):
    source = tmp_path / "c.pt"
    same = payload(1)
    assert ckpt.check_compatible(same, source, "mnist_cnn", "daso", [2, 2]) is True
    with pytest.raises(CheckpointError, match="model 'mnist_cnn' with strategy 'daso'"):
        ckpt.check_compatible(same, source, "resnet20", "daso", [2, 2])
    with pytest.raises(CheckpointError, match="strategy 'ddp'"):
        ckpt.check_compatible(same, source, "mnist_cnn", "ddp", [2, 2])
    # one shared state at an epoch boundary can be re-sharded to another world size
    assert ckpt.check_compatible(same, source, "mnist_cnn", "daso", [4]) is False
    per_node = payload(1, states=2)
    with pytest.raises(CheckpointError, match="cannot be re-sharded"):
        ckpt.check_compatible(per_node, source, "mnist_cnn", "daso", [2, 2, 2])
    mid_epoch = payload(1, batch=3)
    with pytest.raises(CheckpointError, match="launch with the checkpoint's layout"):
        ckpt.check_compatible(mid_epoch, source, "mnist_cnn", "daso", [4])


# -- the CLI, one process ----------------------------------------------------------------------
def train(tmp_path, *extra, overrides=()):
    args = train_args(
        "mnist_cnn_ddp.yaml",
        tmp_path / "run",
        "data.train_subset=256",
        "data.val_subset=64",
        "trainer.epochs=3",
        *overrides,
    )
    return subprocess.run(
        [*args, *extra],
        env=mpi_env(None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_resume_auto_falls_back_and_path_fails(tmp_path):
    first = train(tmp_path, "--stop-at-epoch", "2", overrides=["checkpoint.keep=5"])
    assert first.returncode == 75, first.stderr
    folder = tmp_path / "run" / "checkpoints"
    names = [p.name for p in ckpt.list_checkpoints(folder)]
    assert names == [ckpt.checkpoint_name(2, 0), ckpt.checkpoint_name(1, 0)]
    newest = folder / names[0]
    flip_byte(newest)
    bad = train(tmp_path, "--resume", str(newest))
    assert bad.returncode == 2
    assert "is corrupt" in bad.stderr and str(newest) in bad.stderr
    assert "Traceback" not in bad.stderr
    good = train(tmp_path, "--resume", "auto")
    assert good.returncode == 0, good.stderr
    assert "skipping" in good.stderr and "corrupt" in good.stderr
    assert "resumed from" in good.stderr and ckpt.checkpoint_name(1, 0) in good.stderr
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # epoch 0 from the checkpoint's history, epochs 1 and 2 retrained


def test_cli_refuses_checkpoint_of_other_strategy(tmp_path):
    assert train(tmp_path, "--stop-at-epoch", "1").returncode == 75
    other = train(tmp_path, "--resume", "auto", overrides=["strategy.name=no_comm"])
    assert other.returncode == 2
    assert "strategy 'ddp'" in other.stderr and "strategy 'no_comm'" in other.stderr
    # the advice works: a new run in a folder of its own, not one refused for the old run
    assert "--set trainer.output_dir=DIR" in other.stderr


def test_cli_resume_of_missing_path_is_bad_input(tmp_path):
    result = train(tmp_path, "--resume", str(tmp_path / "nope.pt"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_python_api_resume(tmp_path):
    """``Trainer.resume('auto')`` in one process: continues the epoch count and the history."""
    code = f"""
import torch, daso
from daso.data import mnist_datasets
from daso.models import build_model
cfg = daso.load_config(None, ["strategy.name=ddp", "trainer.epochs=2", "trainer.progress=false",
    "trainer.output_dir={tmp_path / "api"}"])
data = mnist_datasets(None, val_size=64)
data = (torch.utils.data.Subset(data[0], range(128)), data[1])
for stop in (1, None):
    torch.manual_seed(0)
    model = build_model("mnist_cnn")
    t = daso.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05),
                     torch.nn.functional.cross_entropy, cfg)
    t.stop_at_epoch = stop
    if stop is None:
        assert t.resume("auto").name == "ckpt-e00001-b0000000.pt"
    history = t.fit(*data)
    t.close()
print(len(history), [row["epoch"] for row in history])
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=mpi_env(None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2 [0, 1]"


def test_cli_unwritable_checkpoint_folder_is_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = train(tmp_path, overrides=[f"checkpoint.dir={blocker / 'ckpt'}"])
    assert result.returncode == 2
    assert "checkpoint.dir: cannot write" in result.stderr and "is not a folder" in result.stderr
    assert not (tmp_path / "run").exists()
