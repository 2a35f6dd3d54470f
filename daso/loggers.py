"""Metric writers (``trainer.loggers``): JSON lines, CSV, TensorBoard, Weights & Biases, MLflow.

Rank 0 writes. Two kinds of rows reach every logger: an *epoch row* per epoch (the dict
:meth:`daso.Trainer.fit` returns for it) and a *step row* every ``trainer.log_every_steps``
optimizer steps (``step``, ``epoch``, ``loss``, ``lr``, ``samples_per_second``,
``cross_node_bytes`` and the strategy's sync ``events``). Every row carries the run id.

=============  ==========================================================================
``jsonl``      ``metrics.jsonl`` (epoch rows) and ``steps.jsonl`` (step rows), one JSON
               object a line
``csv``        ``metrics.csv`` and ``steps.csv``: the scalar columns (a column that appears
               later rewrites the file with it)
``tensorboard`` ``tensorboard/``: :class:`torch.utils.tensorboard.SummaryWriter` scalars
               ``epoch/<key>`` at the epoch and ``step/<key>`` at the step (the
               ``tensorboard`` package: ``pip install 'daso[tensorboard]'``)
``wandb``      ``wandb/``: offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads)
``mlflow``     ``mlruns/`` (a file store) unless ``MLFLOW_TRACKING_URI`` names a server
=============  ==========================================================================
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from daso.errors import ConfigError

#: The import each optional logger needs, and the extra that installs it.
OPTIONAL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class MetricLogger(Protocol):
    """What every logger implements (rank 0 only)."""

    def log_epoch(self, row: dict[str, Any]) -> None: ...

    def log_step(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_loggers(names: Iterable[str]) -> None:
    """Check that the packages of the loggers ``names`` are installed.

    Raises:
        ConfigError: one is missing, naming the extra that installs it.
    """
    for name in names:
        module = OPTIONAL.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"trainer.loggers lists {name!r} but the {module} package is not installed; "
                f"pip install 'daso[{name}]' (or {module}), or remove it from trainer.loggers"
            )


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers (bools as 0/1; strings, lists and ``None`` left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and v is not None}


def flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"trainer": {"epochs": 3}}`` -> ``trainer.epochs``)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class JsonlLogger:
    """``metrics.jsonl`` and ``steps.jsonl`` in ``folder``."""

    def __init__(self, folder: Path, history: Sequence[dict[str, Any]], resume_step: int) -> None:
        self.epochs, self.steps = folder / "metrics.jsonl", folder / "steps.jsonl"
        # a resume rewrites both with what the checkpoint knows happened (a new run starts
        # in a folder without them; the first row creates each)
        if history or self.epochs.exists():
            self.epochs.write_text("".join(json.dumps(r) + "\n" for r in history))
        if self.steps.exists():
            kept = [r for r in read_jsonl(self.steps) if r.get("step", 0) < resume_step]
            self.steps.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log_epoch(self, row: dict[str, Any]) -> None:
        _append(self.epochs, json.dumps(row))

    def log_step(self, row: dict[str, Any]) -> None:
        _append(self.steps, json.dumps(row))

    def close(self) -> None:
        pass


def _append(path: Path, line: str) -> None:
    with path.open("a") as handle:
        handle.write(line + "\n")


def read_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[int]]:
    """The rows of a JSON-lines file with their line numbers (1-based), and the numbers of the
    lines that are not a JSON object: cut by a crash, not UTF-8, or another JSON value. Blank
    lines are neither; a missing file has no rows."""
    if not path.is_file():
        return [], []
    rows, skipped = [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            row = None
        if isinstance(row, dict):
            rows.append((number, row))
        else:
            skipped.append(number)
    return rows, skipped


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object rows of a JSON-lines file (see :func:`read_rows`; other lines are left
    out)."""
    return [row for _, row in read_rows(path)[0]]


class _CsvTable:
    """One CSV file whose columns are every scalar key seen so far, in first-seen order."""

    def __init__(self, path: Path, rows: Sequence[dict[str, Any]]) -> None:
        self.path, self.rows, self.columns = path, [], []
        for row in rows:
            self.add(row, write=False)
        self._rewrite()

    def add(self, row: dict[str, Any], write: bool = True) -> None:
        values = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        new = [k for k in values if k not in self.columns]
        self.columns += new
        self.rows.append(values)
        if not write:
            return
        if new:
            self._rewrite()
        else:
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, self.columns).writerow(values)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


class CsvLogger:
    """``metrics.csv`` and ``steps.csv`` in ``folder`` (scalar columns only)."""

    def __init__(self, folder: Path, history: Sequence[dict[str, Any]], resume_step: int) -> None:
        self.epochs = _CsvTable(folder / "metrics.csv", history)
        old = _read_csv(folder / "steps.csv")
        self.steps = _CsvTable(
            folder / "steps.csv", [r for r in old if float(r.get("step") or 0) < resume_step]
        )

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.epochs.add(row)

    def log_step(self, row: dict[str, Any]) -> None:
        self.steps.add(row)

    def close(self) -> None:
        pass


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class TensorBoardLogger:
    """Scalars in ``folder/tensorboard``: ``epoch/<key>`` at step ``epoch`` and
    ``step/<key>`` at the optimizer step; a resume purges events after its step."""

    def __init__(self, folder: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(folder / "tensorboard"), purge_step=resume_step if resume_step else None
        )

    def log_epoch(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, int(row["epoch"]))
        self.writer.flush()

    def log_step(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            if key != "step":
                self.writer.add_scalar(f"step/{key}", value, int(row["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run with the daso run id (offline unless ``WANDB_MODE`` is set)."""

    def __init__(self, folder: Path, run_id: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "daso"),
            id=run_id,
            name=run_id,
            dir=str(folder),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            resume="allow",
        )
        self.run.define_metric("epoch/*", step_metric="epoch/epoch")

    def log_epoch(self, row: dict[str, Any]) -> None:
        values = {f"epoch/{k}": v for k, v in scalars(row).items()}
        self.run.log(values)

    def log_step(self, row: dict[str, Any]) -> None:
        self.run.log({f"step/{k}": v for k, v in scalars(row).items()})

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """An MLflow run named by the daso run id, in ``folder/mlruns`` unless
    ``MLFLOW_TRACKING_URI`` is set; the config as parameters."""

    def __init__(self, folder: Path, run_id: str, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # the file store needs no server or database; MLflow 3 asks for this opt-in to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((folder / "mlruns").absolute().as_uri())
        self.run = mlflow.start_run(run_name=run_id, tags={"daso.run_id": run_id})
        params = {k: v for k, v in flat(config).items() if v is not None}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_epoch(self, row: dict[str, Any]) -> None:
        values = {f"epoch.{k}": v for k, v in scalars(row).items() if k != "epoch"}
        self.mlflow.log_metrics(values, step=int(row["epoch"]))

    def log_step(self, row: dict[str, Any]) -> None:
        values = {f"step.{k}": v for k, v in scalars(row).items() if k != "step"}
        self.mlflow.log_metrics(values, step=int(row["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


def build_loggers(
    names: Sequence[str],
    folder: Path,
    run_id: str,
    config: dict[str, Any],
    history: Sequence[dict[str, Any]] = (),
    resume_step: int = 0,
) -> list[MetricLogger]:
    """The loggers ``names`` (``trainer.loggers``) writing into ``folder``.

    Args:
        history: the epoch rows so far (a resume: the checkpoint's; the files are rewritten
            with them, so rows of a run past its checkpoint do not stay).
        resume_step: the optimizer step the run continues from (0: a new run).

    Raises:
        ConfigError: an optional logger's package is missing.
    """
    check_loggers(names)
    folder.mkdir(parents=True, exist_ok=True)
    built: list[MetricLogger] = []
    for name in names:
        if name == "jsonl":
            built.append(JsonlLogger(folder, history, resume_step))
        elif name == "csv":
            built.append(CsvLogger(folder, history, resume_step))
        elif name == "tensorboard":
            built.append(TensorBoardLogger(folder, resume_step))
        elif name == "wandb":
            built.append(WandbLogger(folder, run_id, config))
        elif name == "mlflow":
            built.append(MlflowLogger(folder, run_id, config))
        else:
            raise ConfigError(f"trainer.loggers: unknown logger {name!r}")
    return built
