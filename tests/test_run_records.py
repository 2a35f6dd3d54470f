"""What a run leaves behind: the loggers' files read back by their own readers (JSONL, CSV,
TensorBoard's event reader; W&B and MLflow where installed), ``run.json``, runs that never mix
in one folder, the folder lock, ``daso plot``, progress lines without a terminal, and a
resume that changes ``trainer.epochs`` and ``optim.lr``."""

from __future__ import annotations

import csv
import fcntl
import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from daso import checkpoint as ckpt
from daso.config import load_config
from daso.progress import Progress
from daso.schedule import COOLDOWN, CYCLING, DASOSchedule

from mpi_harness import ROOT, mpi_env, train_args

#: A short single-process MNIST run (8 steps an epoch).
SHORT = ("data.train_subset=512", "data.val_subset=128", "trainer.epochs=2")


def cli(tmp_path: Path, out: Path, *overrides: str, config: str = "mnist_cnn_ddp.yaml"):
    args = train_args(config, out, *SHORT, *overrides)
    return subprocess.run(
        args, cwd=tmp_path, env=mpi_env(None), capture_output=True, text=True, timeout=180
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the loggers on a 2x2 MNIST run -----------------------------------------------------------
def test_jsonl_csv_and_tensorboard_hold_the_same_epochs_of_a_2x2_run(mnist_job):
    rows, folders = mnist_job
    folder = folders["daso"]
    epochs = read_jsonl(folder / "metrics.jsonl")
    assert epochs == rows["daso"]
    with (folder / "metrics.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in table] == [r["epoch"] for r in epochs]
    for row, line in zip(epochs, table):
        assert float(line["val_accuracy"]) == pytest.approx(row["val_accuracy"], rel=1e-12)
        assert int(line["cross_node_bytes"]) == row["cross_node_bytes"]
        assert line["phase"] == row["phase"] and line["run_id"] == row["run_id"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("epoch/val_accuracy")]
    assert [s for s, _ in accuracy] == [r["epoch"] for r in epochs]
    np.testing.assert_allclose([v for _, v in accuracy], [r["val_accuracy"] for r in epochs])
    loss = events.Scalars("step/loss")
    assert [e.step for e in loss][:3] == [5, 10, 15]


def test_step_rows_carry_loss_lr_throughput_and_daso_sync_events(mnist_job):
    rows, folders = mnist_job
    steps = read_jsonl(folders["daso"] / "steps.jsonl")
    assert [r["step"] for r in steps] == list(range(5, 5 * len(steps) + 1, 5))
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["samples_per_second"] > 0 for r in steps)
    events = [e for r in steps for e in r["events"]]
    kinds = {e["event"] for e in events}
    assert {"send", "merge", "average"} <= kinds, kinds
    merges = [e for e in events if e["event"] == "merge"]
    assert all(e["staleness"] >= 1 and e["wait_seconds"] >= 0 for e in merges)
    sent = [e["bytes"] for e in events if e["event"] == "send"]
    assert sent and any(b > 0 for b in sent)  # rank 0 sends when its turn in the rotation comes
    for r in steps:
        assert r["cross_node_bytes"] == sum(e.get("bytes", 0) for e in r["events"])
    # rank 0's sends and merges over the run match its epoch counters' order of magnitude:
    # every send is merged exactly once
    assert len(merges) == len(sent)
    cycling = [r for r in rows["daso"] if r["phase"] == "cycling"]
    assert cycling and sum(r["sends"] for r in cycling) >= len(sent)


def test_run_json_records_the_run(mnist_job):
    rows, folders = mnist_job
    record = json.loads((folders["daso"] / "run.json").read_text())
    assert record["run_id"] == rows["daso"][0]["run_id"]
    assert {r["run_id"] for r in rows["daso"]} == {record["run_id"]}
    assert record["layout"] == [2, 2] and record["world_size"] == 4
    assert len(record["hosts"]) == 4 and all(record["hosts"])
    versions = record["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["torch"] == torch.__version__
    assert versions["mpi4py"] and "MPICH" in versions["mpi"]
    assert record["config"]["strategy"]["name"] == "daso"
    assert record["config"]["trainer"]["loggers"] == ["jsonl", "csv", "tensorboard"]
    assert record["started"].endswith("+00:00")
    inside_git = subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True)
    if inside_git.returncode == 0:
        assert len(record["git_commit"].split("-")[0]) == 40


# -- optional loggers -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_optional_logger_writes_offline(tmp_path, monkeypatch, name):
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install 'daso[{name}]')")
    out = tmp_path / "run"
    result = cli(tmp_path, out, f"trainer.loggers=[jsonl, {name}]", "trainer.log_every_steps=4")
    assert result.returncode == 0, result.stderr
    run_id = read_jsonl(out / "metrics.jsonl")[0]["run_id"]
    if name == "wandb":
        runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
        assert runs and list(runs[0].glob("*.wandb")), sorted((out / "wandb").iterdir())
    else:
        import mlflow

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").absolute().as_uri())
        (run,) = client.search_runs(["0"], filter_string=f"tags.`daso.run_id` = '{run_id}'")
        history = client.get_metric_history(run.info.run_id, "epoch.val_accuracy")
        assert [m.step for m in history] == [0, 1]


def test_missing_optional_logger_is_bad_input(tmp_path, monkeypatch):
    from daso.errors import ConfigError
    from daso.loggers import check_loggers

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'daso\[mlflow\]'"):
        check_loggers(["jsonl", "mlflow"])


# -- runs never mix -----------------------------------------------------------------------------
def test_a_second_run_into_a_used_folder_stops_unless_told_to_overwrite(tmp_path):
    out, data = tmp_path / "run", tiny_data()
    first = tiny_trainer(tmp_path, ["trainer.epochs=2"])
    first.fit(data)
    first.close()
    before = (out / "metrics.jsonl").read_text()
    checkpoints = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(out / "checkpoints")}
    second = cli(tmp_path, out)  # daso train into the same folder, no --resume
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "holds the results of run" in errors[0], second.stderr
    assert "--resume auto" in errors[0] and "trainer.overwrite=true" in errors[0]
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the first run touched
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(out / "checkpoints")} == (
        checkpoints
    )
    third = tiny_trainer(tmp_path, ["trainer.epochs=1", "trainer.overwrite=true"])
    third.fit(data)
    third.close()
    rows = read_jsonl(out / "metrics.jsonl")
    record = json.loads((out / "run.json").read_text())
    assert [r["epoch"] for r in rows] == [0]
    assert {r["run_id"] for r in rows} == {record["run_id"]} == {third.run_id}
    assert third.run_id != first.run_id
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        ckpt.checkpoint_name(1, 0)
    ]


def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    from daso.errors import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    with (out / ".daso.lock").open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in progress holds it
        handle.write("run X, pid 1 on elsewhere\n")
        handle.flush()
        trainer = tiny_trainer(tmp_path, ["trainer.epochs=1"])
        with pytest.raises(ConfigError, match=r"is in use by another run \(run X, pid 1 on"):
            trainer.fit(tiny_data())
        trainer.close()
    assert not (out / "metrics.jsonl").exists() and not (out / "run.json").exists()


def test_resume_keeps_the_run_id_and_records_the_resume(tmp_path):
    out, data = tmp_path / "run", tiny_data()
    first = tiny_trainer(tmp_path, ["trainer.epochs=1"])
    first.fit(data)
    first.close()
    again = tiny_trainer(tmp_path, ["trainer.epochs=2"])
    again.resume("auto")
    again.fit(data)
    again.close()
    rows = read_jsonl(out / "metrics.jsonl")
    record = json.loads((out / "run.json").read_text())
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {r["run_id"] for r in rows} == {record["run_id"]} == {first.run_id}
    assert len(record["resumes"]) == 1 and record["resumes"][0]["layout"] == [1]


# -- daso plot ------------------------------------------------------------------------------------
def test_daso_plot_renders_two_runs(tmp_path, mnist_job):
    from PIL import Image

    _, folders = mnist_job
    png = tmp_path / "runs.png"
    args = [sys.executable, "-m", "daso.cli", "plot", str(folders["ddp"]), str(folders["daso"])]
    result = subprocess.run([*args, "--out", str(png)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # lines, text and axes, not a blank canvas
    missing = subprocess.run([*args[:4], str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "holds no metrics.jsonl" in missing.stderr


# -- progress without a terminal ------------------------------------------------------------------
def test_progress_is_periodic_lines_without_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="daso.progress"):
        bar = Progress(10, 0, "epoch 3", enabled=True, interval=0.0, terminal=False)
        for _ in range(10):
            bar.update(loss=lambda: 0.5)
        bar.close()
    assert len(caplog.messages) == 10
    assert caplog.messages[-1].startswith("epoch 3: step 10/10 (100%)")
    assert "loss 0.5000" in caplog.messages[0]
    quiet = Progress(10, 0, "epoch 3", enabled=True, interval=3600.0, terminal=False)
    with caplog.at_level(logging.INFO, logger="daso.progress"):
        caplog.clear()
        for _ in range(10):
            quiet.update()
    assert caplog.messages == []  # at most one line every interval seconds


def test_local_sh_into_a_log_file_gives_progress_lines_not_carriage_returns(tmp_path):
    sets = [f"trainer.output_dir={tmp_path / 'run'}", *SHORT, "trainer.progress_seconds=0.01"]
    args = [str(ROOT / "launch" / "local.sh"), "--nodes", "1", "--ranks-per-node", "2"]
    args += [str(ROOT / "configs" / "mnist_cnn_ddp.yaml")]
    args += [item for key in sets for item in ("--set", key)]
    log = tmp_path / "log.txt"
    with log.open("w") as stderr:  # launch/local.sh ... 2> log.txt
        result = subprocess.run(args, cwd=tmp_path, stderr=stderr, timeout=180)
    assert result.returncode == 0, log.read_text()
    text = log.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "daso.progress" in line]
    assert len(lines) >= 4 and "epoch 0: step" in lines[0], text


# -- a resume that changes trainer.epochs and optim.lr ------------------------------------------
def tiny_trainer(tmp_path: Path, overrides: list[str]):
    import daso

    config = load_config(
        None,
        [
            "strategy.name=ddp",
            "trainer.progress=false",
            "data.batch_size=8",
            "optim.scheduler=cosine",
            f"trainer.output_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
    return daso.Trainer(model, optimizer, torch.nn.functional.cross_entropy, config)


def tiny_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def cosine(lr: float, epoch: int, epochs: int) -> float:
    return lr * (1 + math.cos(math.pi * epoch / epochs)) / 2


def test_resume_with_more_epochs_and_a_lower_lr_takes_both(tmp_path, caplog):
    """The cosine schedule follows the new length and LR from the step reached (a run with
    the new config from the start has those LRs); other changed keys are listed."""
    data = tiny_data()
    first = tiny_trainer(tmp_path, ["trainer.epochs=2", "optim.lr=0.1"])
    first.fit(data)
    first.close()
    logger = logging.getLogger("daso")  # its own handler: records do not reach the root's
    logger.addHandler(caplog.handler)
    try:
        resumed = tiny_trainer(
            tmp_path, ["trainer.epochs=4", "optim.lr=0.01", "data.val_batch_size=32"]
        )
        resumed.resume("auto")
        history = resumed.fit(data)
        resumed.close()
    finally:
        logger.removeHandler(caplog.handler)
    lrs = [row["lr"] for row in history]
    expected = [cosine(0.1, 0, 2), cosine(0.1, 1, 2), cosine(0.01, 2, 4), cosine(0.01, 3, 4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    text = "\n".join(caplog.messages)
    assert "taking effect: optim.lr 0.1 -> 0.01, trainer.epochs 2 -> 4" in text
    assert "data.val_batch_size 256 -> 32" in text


def test_daso_cooldown_follows_a_longer_run_after_resume():
    """A window that was cool-down in a 4-window run is cycling in an 8-window one."""
    options = {"warmup_windows": 1, "cooldown_windows": 1}
    short = DASOSchedule(4, **options)
    for loss in (3.0, 2.0, 1.5):
        short.end_window(loss)
    assert short.params.phase == COOLDOWN
    longer = DASOSchedule(8, **options)
    longer.load_state_dict(short.state_dict())
    assert longer.params.phase == CYCLING
    for loss in (1.4, 1.3, 1.2, 1.1):
        longer.end_window(loss)
    assert longer.params.phase == COOLDOWN and longer.window == 7
