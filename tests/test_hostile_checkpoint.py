"""Checkpoints are untrusted input: a checkpoint re-wrapped with a valid SHA-256 can claim any
names, types and values. Names it holds never decide what a run deletes; a resume never takes
over a folder of another run; a shared checkpoint folder is locked; a wrongly typed or missing
field is a ``CheckpointError`` (exit 2, one line), never a traceback; a fuzz test checks both
over generated damage."""

from __future__ import annotations

import copy
import fcntl
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from daso import checkpoint as ckpt
from daso.config import load_config
from daso.errors import CheckpointError, ConfigError
from daso.run_record import RunFolder

from mpi_harness import ROOT, mpi_env


def tiny_trainer(out: Path, *overrides: str):
    import daso

    config = load_config(
        None,
        [
            "strategy.name=ddp",
            "trainer.progress=false",
            "data.batch_size=16",
            f"trainer.output_dir={out}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return daso.Trainer(model, optimizer, torch.nn.functional.cross_entropy, config)


def tiny_data() -> torch.utils.data.Dataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def train(out: Path, *overrides: str, resume: Path | None = None) -> Any:
    trainer = tiny_trainer(out, *overrides)
    try:
        if resume is not None:
            trainer.resume(resume)
        trainer.fit(tiny_data())
    finally:
        trainer.close()
    return trainer


def rewrap(source: Path, target: Path, mutate) -> Path:
    """``source``'s payload changed by ``mutate(payload)``, written to ``target`` with a valid
    header and checksum (what anyone can do to a checkpoint file)."""
    payload = ckpt.deserialize(_payload_bytes(source))
    mutate(payload)
    ckpt.write_atomic(target, ckpt.serialize(payload))
    return target


def _payload_bytes(path: Path) -> bytes:
    return path.read_bytes()[len(ckpt.MAGIC) + ckpt.DIGEST_BYTES + 1 :]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The folder of a finished 2-epoch run with one checkpoint per epoch."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(out, "trainer.epochs=2", "checkpoint.keep=3")
    return out


def newest(out: Path) -> Path:
    return ckpt.list_checkpoints(out / "checkpoints")[0]


# -- defect 1: names in a checkpoint never delete anything --------------------------------------
def test_names_a_checkpoint_holds_never_delete_files(tmp_path, finished):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / "sibling.txt").write_text("keep me too")
    claimed = [str(victim), "../sibling.txt", f"../../{victim.name}", ckpt.checkpoint_name(0, 5)]
    hostile = rewrap(newest(finished), tmp_path / "given.pt", _set("shared.checkpoints", claimed))
    train(out, "trainer.epochs=4", "checkpoint.keep=1", resume=hostile)
    assert victim.read_text() == "keep me"
    assert (out / "sibling.txt").read_text() == "keep me too"
    # what the run wrote itself is pruned as checkpoint.keep says
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        ckpt.checkpoint_name(4, 0)
    ]


def test_a_resumed_run_prunes_the_checkpoints_it_recorded(tmp_path):
    out = tmp_path / "run"
    train(out, "trainer.epochs=2", "checkpoint.keep=2", "trainer.seed=1")
    assert len(ckpt.list_checkpoints(out / "checkpoints")) == 2
    train(out, "trainer.epochs=3", "checkpoint.keep=2", "trainer.seed=1", resume="auto")
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        ckpt.checkpoint_name(3, 0),
        ckpt.checkpoint_name(2, 0),
    ]


def test_prune_ignores_names_outside_the_pattern(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    mine = [ckpt.checkpoint_name(e, 0) for e in (1, 2)]
    for name in mine:
        (folder / name).write_bytes(b"")
    kept = ckpt.prune(folder, 1, [str(outside), "../outside.txt", *mine, 7, None])
    assert kept == [mine[1]]
    assert outside.exists() and not (folder / mine[0]).exists()


# -- defect 5: a resume never takes over another run's folder -----------------------------------
def test_resuming_into_a_folder_of_another_run_is_refused(tmp_path, finished):
    third = tmp_path / "third"
    train(third, "trainer.epochs=1")
    before = {p.name: p.read_bytes() for p in third.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds the results of run .* not of run") as err:
        train(third, "trainer.epochs=3", resume=newest(finished))
    message = str(err.value)
    for way in ("trainer.output_dir=DIR", "--resume auto", "trainer.overwrite=true"):
        assert way in message
    after = {p.name: p.read_bytes() for p in third.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k != ".daso.lock"} == {
        k: v for k, v in before.items() if k != ".daso.lock"
    }
    replaced = train(third, "trainer.epochs=3", "trainer.overwrite=true", resume=newest(finished))
    assert [row["epoch"] for row in replaced.history] == [0, 1, 2]


# -- defect 6: a shared checkpoint folder is locked ---------------------------------------------
def test_a_checkpoint_folder_in_use_by_another_run_is_refused(tmp_path):
    shared = tmp_path / "shared-checkpoints"
    first = RunFolder(tmp_path / "a", shared, "run-a")
    first.claim(resumed=False, overwrite=False)
    try:
        second = RunFolder(tmp_path / "b", shared, "run-b")
        with pytest.raises(ConfigError, match="checkpoint.dir .*shared-checkpoints is in use"):
            second.claim(resumed=False, overwrite=False)
        with (tmp_path / "b" / ".daso.lock").open("a+") as handle:  # b's own lock was let go
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        first.release()
    third = RunFolder(tmp_path / "c", shared, "run-c")
    third.claim(resumed=False, overwrite=False)  # free once the first run ended
    third.release()


# -- defect 8: wrongly typed plain data is refused in one line ----------------------------------
def _set(path: str, value: Any):
    def mutate(payload: dict) -> None:
        *parents, leaf = path.split(".")
        node = payload
        for part in parents:
            node = node[part]
        node[leaf] = value

    return mutate


def _wrong_model_keys(payload: dict) -> None:
    states = []
    for blob in payload["states"]:
        state = ckpt.deserialize(blob)
        state["model"] = {f"other.{k}": v for k, v in state["model"].items()}
        states.append(ckpt.serialize(state))
    payload["states"] = states


@pytest.mark.parametrize(
    "mutate",
    [
        _set("meta.layout", 7),
        _set("meta.layout", [2]),
        _set("meta.epoch", "1"),
        _set("shared.history", 5),
        _set("meta.model_signature", 5),
        _set("shared.lr_scheduler", [1]),
        _set("rank_state", [3]),
        _wrong_model_keys,
    ],
    ids=[
        "layout-int",
        "layout-wrong",
        "epoch-str",
        "history",
        "signature",
        "scheduler",
        "index",
        "model-keys",
    ],
)
def test_a_wrongly_typed_checkpoint_is_a_checkpoint_error(tmp_path, finished, mutate):
    bad = rewrap(newest(finished), tmp_path / ckpt.checkpoint_name(9, 0), mutate)
    with pytest.raises(CheckpointError) as err:
        train(tmp_path / "run", "trainer.epochs=3", resume=bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_cli_resume_of_a_wrongly_typed_checkpoint_exits_2_in_one_line(tmp_path, finished):
    bad = rewrap(newest(finished), tmp_path / "bad.pt", _set("meta.layout", 7))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daso.cli",
            "train",
            "--config",
            "configs/mnist_cnn_ddp.yaml",
            "--resume",
            str(bad),
            "--set",
            f"trainer.output_dir={tmp_path / 'run'}",
        ],
        env=mpi_env(None),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "meta.layout" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# -- fuzz: only CheckpointError comes out, nothing outside the folder is touched ----------------
#: Paths into a payload the fuzzer damages (``states.0.<key>`` is inside the first rank state).
FIELDS = [
    "meta",
    "meta.model",
    "meta.strategy",
    "meta.world_size",
    "meta.layout",
    "meta.epoch",
    "meta.batch",
    "meta.model_signature",
    "shared",
    "shared.run_id",
    "shared.history",
    "shared.lr_scheduler",
    "shared.scaler",
    "shared.config",
    "shared.windows",
    "shared.checkpoints",
    "states",
    "rank_state",
    "rank_extra",
    "states.0.model",
    "states.0.optimizer",
    "states.0.strategy",
    "states.0.optimizer.state",
    "states.0.optimizer.param_groups",
    "extra.0.rng",
    "extra.0.rng.torch",
    "extra.0.rng.python",
    "extra.0.partial",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(-3, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.just(torch.zeros(2, 2)),
    st.just(["/etc/passwd", "../x", "ckpt-e00000-b0000009.pt"]),
)


def _damage(payload: dict, field: str, value: Any, delete: bool) -> None:
    parts = field.split(".")
    if parts[0] in ("states", "extra") and len(parts) > 2:
        key = "states" if parts[0] == "states" else "rank_extra"
        blob = ckpt.deserialize(payload[key][0])
        _damage(blob, ".".join(parts[2:]), value, delete)
        payload[key][0] = ckpt.serialize(blob)
        return
    node = payload
    for part in parts[:-1]:
        node = node[part]
    if delete:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(FIELDS), value=VALUES, delete=st.booleans())
def test_fuzz_damaged_checkpoints_give_only_checkpoint_errors(
    tmp_path_factory, finished, field, value, delete
):
    base = tmp_path_factory.mktemp("fuzz")
    outside = base / "outside.txt"
    outside.write_text("untouched")
    pristine = ckpt.deserialize(_payload_bytes(newest(finished)))
    payload = copy.deepcopy(pristine)
    _damage(payload, field, value, delete)
    out = base / "run"
    path = out / "checkpoints" / ckpt.checkpoint_name(2, 0)
    ckpt.write_atomic(path, ckpt.serialize(payload))
    before = sorted(p.name for p in path.parent.iterdir())
    trainer = tiny_trainer(out, "trainer.epochs=2", "checkpoint.keep=1")
    try:
        trainer.resume(path)
        trainer.save_checkpoint()  # the prune a resumed run does after its next save
    except CheckpointError as err:
        assert str(err) and "\n" not in str(err)
    finally:
        trainer.close()
    assert outside.read_text() == "untouched"
    assert set(before) <= {p.name for p in path.parent.iterdir()}


# -- minor: the refusal never quotes torch's advice; a folder is named as one -------------------
class _Runs:
    """Unpickling it would run a command (what a hostile pickle does)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_code_in_a_checkpoint_is_refused_without_torchs_advice(tmp_path):
    buffer = io.BytesIO()
    torch.save({"meta": _Runs()}, buffer)
    path = tmp_path / ckpt.checkpoint_name(1, 0)
    ckpt.write_atomic(path, buffer.getvalue())
    with pytest.raises(CheckpointError, match="holds Python objects or code that daso") as err:
        ckpt.read_checkpoint(path)
    text = str(err.value)
    assert "weights_only" not in text and "Re-running" not in text and "\n" not in text


def test_resume_of_a_folder_names_it_as_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; pass a checkpoint file in it"):
        ckpt.resolve_resume(tmp_path, tmp_path)
