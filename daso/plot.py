"""``daso plot RUN [RUN ...]``: one PNG comparing runs from their output folders.

Four panels, one line per run: the validation score (accuracy where every epoch has one, else
the loss) against wall time and against epoch, the cross-node megabytes of each epoch, and the
schedule's knobs (DASO's ``global_skips`` and ``batches_to_wait``, local SGD's ``period``, ...;
the LR where a strategy has none). Reads ``metrics.jsonl`` (written by the ``jsonl`` logger,
the default) and ``run.json``; needs matplotlib (``pip install 'daso[plot]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daso.errors import ConfigError
from daso.loggers import read_rows
from daso.run_record import read_record

log = logging.getLogger("daso.plot")

#: Schedule knobs plotted where a run reports them.
KNOBS = ("global_skips", "batches_to_wait", "local_skips", "period")


@dataclass
class Run:
    """One run's epoch rows and record, read from its output folder."""

    folder: Path
    rows: list[dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        strategy = self.rows[-1].get("strategy", "?") if self.rows else "?"
        layout = self.record.get("layout")
        where = f", nodes {layout}" if layout else ""
        return f"{self.folder.name} ({strategy}{where})"


def _number(row: dict[str, Any], key: str) -> float | None:
    """``row[key]`` if it is a number (not a bool), else ``None``."""
    value = row.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else None


def load_run(folder: str | Path) -> Run:
    """The epoch rows of the run in ``folder`` (its ``metrics.jsonl``). Lines that are not a
    JSON object with a numeric ``epoch`` are skipped, counted and named in one warning.

    Raises:
        ConfigError: no such folder, or no epoch rows in it.
    """
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{folder} holds no metrics.jsonl; give the output folder of a run (its "
            "trainer.output_dir) that kept the jsonl logger"
        )
    numbered, skipped = read_rows(path)
    rows = [row for _, row in numbered if _number(row, "epoch") is not None]
    skipped = sorted(skipped + [n for n, row in numbered if _number(row, "epoch") is None])
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        log.warning(
            "%s: skipped %d line(s) (lines %s) that are not a JSON object with a numeric 'epoch'",
            path,
            len(skipped),
            shown,
        )
    if not rows:
        raise ConfigError(f"{path} has no epoch rows yet; plot it after its first epoch")
    return Run(folder, rows, read_record(folder) or {})


def _score(runs: Sequence[Run]) -> tuple[str, str]:
    """The key and axis label plotted: accuracy where every row of every run has one."""
    if all(_number(r, "val_accuracy") is not None for run in runs for r in run.rows):
        return "val_accuracy", "validation accuracy"
    return "val_loss", "validation loss"


def plot_runs(folders: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Render the runs in ``folders`` side by side into the PNG ``out``.

    Args:
        out: the PNG to write; a name without a suffix gets ``.png``, and an existing folder
            gets ``runs.png`` inside it.

    Returns:
        The PNG's path (what was written).

    Raises:
        ConfigError: a folder without metrics, or matplotlib missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "daso plot needs matplotlib; pip install 'daso[plot]' (or matplotlib)"
        ) from None
    runs = [load_run(f) for f in folders]
    key, label = _score(runs)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (by_time, by_epoch), (traffic, knobs) = axes
    knob_keys = [k for k in KNOBS if any(k in r for run in runs for r in run.rows)]
    for run in runs:
        epochs = [_number(r, "epoch") for r in run.rows]
        score = [_number(r, key) for r in run.rows]
        minutes = [(_number(r, "wall_seconds") or 0.0) / 60 for r in run.rows]
        by_time.plot(minutes, score, marker="o", label=run.label)
        by_epoch.plot(epochs, score, marker="o", label=run.label)
        megabytes = [(_number(r, "cross_node_bytes") or 0.0) / 1e6 for r in run.rows]
        traffic.plot(epochs, megabytes, marker="o")
        for knob in knob_keys or ["lr"]:
            values = [_number(r, knob) for r in run.rows]
            if any(v is not None for v in values):
                knobs.plot(epochs, values, marker=".", label=f"{run.folder.name}: {knob}")
    by_time.set(xlabel="wall time (minutes)", ylabel=label, title=f"{label} against wall time")
    by_epoch.set(xlabel="epoch", ylabel=label, title=f"{label} against epoch")
    traffic.set(xlabel="epoch", ylabel="MB", title="cross-node bytes per epoch (all ranks)")
    knobs.set(
        xlabel="epoch",
        ylabel="value at the epoch's end",
        title="schedule knobs" if knob_keys else "learning rate",
    )
    by_time.legend(fontsize="small")
    knobs.legend(fontsize="small")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title or " vs ".join(run.folder.name for run in runs))
    fig.tight_layout()
    out = Path(out)
    if out.is_dir():
        out = out / "runs.png"
    elif not out.suffix:
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
