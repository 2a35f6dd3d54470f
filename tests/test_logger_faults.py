"""A logger that fails mid-run is dropped with one warning and training goes on; the run's
record (``metrics.jsonl``) failing stops the run at the epoch's end with a checkpoint and one
clear error; ``daso plot`` skips bad lines of ``metrics.jsonl`` and names them in one warning."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from test_hostile_checkpoint import tiny_data, tiny_trainer

from daso import checkpoint as ckpt
from daso import loggers
from daso.errors import RecordError


@pytest.fixture
def daso_log(caplog):
    """The distinct records of daso's loggers (``.messages``), however they propagate."""
    logger = logging.getLogger("daso")  # may have its own handler, not reaching the root's
    logger.addHandler(caplog.handler)

    class Records:
        @property
        def messages(self) -> list[str]:
            return [r.getMessage() for r in {id(r): r for r in caplog.records}.values()]

    yield Records()
    logger.removeHandler(caplog.handler)


def test_a_logger_failing_mid_run_is_dropped_with_one_warning(tmp_path, monkeypatch, daso_log):
    real = loggers.CsvLogger.log_epoch

    def fails_from_epoch_1(self, row):
        if row["epoch"] >= 1:
            raise OSError(30, "Read-only file system")
        real(self, row)

    monkeypatch.setattr(loggers.CsvLogger, "log_epoch", fails_from_epoch_1)
    out = tmp_path / "run"
    trainer = tiny_trainer(out, "trainer.epochs=3", "trainer.loggers=[jsonl,csv]")
    history = trainer.fit(tiny_data())
    trainer.close()
    assert [row["epoch"] for row in history] == [0, 1, 2]
    warnings = [m for m in daso_log.messages if "logger 'csv' failed" in m]
    assert len(warnings) == 1 and "Read-only file system" in warnings[0]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # the others go on
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header and epoch 0


def test_the_run_record_failing_stops_with_a_checkpoint_and_one_line(tmp_path, monkeypatch):
    real = loggers.JsonlLogger.log_epoch

    def folder_in_its_place(self, row):
        if row["epoch"] == 1:  # something replaced the file by a folder: writes fail
            self.epochs.unlink()
            self.epochs.mkdir()
        real(self, row)

    monkeypatch.setattr(loggers.JsonlLogger, "log_epoch", folder_in_its_place)
    out = tmp_path / "run"
    trainer = tiny_trainer(out, "trainer.epochs=4")
    with pytest.raises(RecordError, match="the run's record .* could not be written") as err:
        trainer.fit(tiny_data())
    trainer.close()
    assert "IsADirectoryError" in str(err.value) and "--resume auto" in str(err.value)
    newest = ckpt.list_checkpoints(out / "checkpoints")[0]
    assert newest.name == ckpt.checkpoint_name(2, 0)  # after the epoch whose row failed
    assert [r["epoch"] for r in ckpt.read_checkpoint(newest)["shared"]["history"]] == [0, 1]
    shutil.rmtree(out / "metrics.jsonl")
    monkeypatch.setattr(loggers.JsonlLogger, "log_epoch", real)
    resumed = tiny_trainer(out, "trainer.epochs=4")
    resumed.resume("auto")
    resumed.fit(tiny_data())
    resumed.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]


# -- daso plot on bad lines ---------------------------------------------------------------------
def test_plot_skips_bad_lines_and_names_them_in_one_warning(tmp_path, daso_log):
    pytest.importorskip("matplotlib")
    from daso.plot import plot_runs

    run = tmp_path / "run"
    run.mkdir()
    good = {"epoch": 0, "val_accuracy": 0.5, "wall_seconds": 3.0, "cross_node_bytes": 10}
    lines = [
        json.dumps(good).encode(),
        b"[1, 2, 3]",
        json.dumps({"val_accuracy": 0.6}).encode(),  # no epoch
        b"\xff\xfe not utf-8",
        json.dumps({"epoch": "one"}).encode(),
        b'{"epoch": 1, "val_accuracy": 0.7, "wall_s',  # cut by a crash
        json.dumps({**good, "epoch": 1, "wall_seconds": "soon"}).encode(),
    ]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = plot_runs([run], tmp_path / "plots")
    assert out == tmp_path / "plots.png" and out.is_file()
    warnings = [m for m in daso_log.messages if "skipped" in m]
    assert len(warnings) == 1
    assert "5 line(s)" in warnings[0] and "lines 2, 3, 4, 5, 6" in warnings[0]
    folder = tmp_path / "figures"
    folder.mkdir()
    assert plot_runs([run], folder) == folder / "runs.png"


def test_plot_of_a_folder_with_only_bad_lines_is_a_config_error(tmp_path):
    pytest.importorskip("matplotlib")
    from daso.errors import ConfigError
    from daso.plot import plot_runs

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"[1]\n\xff\n")
    with pytest.raises(ConfigError, match="has no epoch rows"):
        plot_runs([run], tmp_path / "p.png")
