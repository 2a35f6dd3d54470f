"""``daso plot RUN [RUN ...]``: one PNG comparing runs from their output folders.

Four panels, one line per run: the validation score (accuracy where every epoch has one, else
the loss) against wall time and against epoch, the cross-node megabytes of each epoch, and the
schedule's knobs (DASO's ``global_skips`` and ``batches_to_wait``, local SGD's ``period``, ...;
the LR where a strategy has none). Reads ``metrics.jsonl`` (written by the ``jsonl`` logger,
the default) and ``run.json``; needs matplotlib (``pip install 'daso[plot]'``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daso.errors import ConfigError
from daso.loggers import read_jsonl

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


def load_run(folder: str | Path) -> Run:
    """The epoch rows of the run in ``folder`` (its ``metrics.jsonl``).

    Raises:
        ConfigError: no such folder, or no metrics rows in it.
    """
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"{folder} holds no metrics.jsonl; give the output folder of a run (its "
            "trainer.output_dir) that kept the jsonl logger"
        )
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"{path} has no epoch rows yet; plot it after its first epoch")
    record: dict[str, Any] = {}
    try:
        record = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        pass
    return Run(folder, rows, record)


def _score(runs: Sequence[Run]) -> tuple[str, str]:
    """The key and axis label plotted: accuracy where every row of every run has one."""
    if all(r.get("val_accuracy") is not None for run in runs for r in run.rows):
        return "val_accuracy", "validation accuracy"
    return "val_loss", "validation loss"


def plot_runs(folders: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Render the runs in ``folders`` side by side into the PNG ``out``.

    Returns:
        The PNG's path.

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
        epochs = [r["epoch"] for r in run.rows]
        score = [r.get(key) for r in run.rows]
        minutes = [r.get("wall_seconds", 0.0) / 60 for r in run.rows]
        by_time.plot(minutes, score, marker="o", label=run.label)
        by_epoch.plot(epochs, score, marker="o", label=run.label)
        traffic.plot(epochs, [r.get("cross_node_bytes", 0) / 1e6 for r in run.rows], marker="o")
        for knob in knob_keys or ["lr"]:
            values = [r.get(knob) for r in run.rows]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
