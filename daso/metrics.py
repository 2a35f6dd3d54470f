"""Where a run's per-epoch metrics go: one JSON object a line in ``metrics.jsonl``, and one
summary line a epoch in the log (rank 0 only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("daso.trainer")


def summary_line(row: dict[str, Any]) -> str:
    """The log line of an epoch's row: losses, accuracy where there is one, the strategy's
    knobs where it has them, the cross-node megabytes and the epoch's seconds."""
    val = f"val loss {row['val_loss']:.4f}" if row.get("val_loss") is not None else "no validation"
    if row.get("val_accuracy") is not None:
        val += f" val acc {row['val_accuracy']:.4f}"
    knobs = " ".join(
        f"{key} {row[key]}"
        for key in ("global_skips", "local_skips", "batches_to_wait", "period")
        if key in row
    )
    return (
        f"epoch {row['epoch']} | train loss {row['train_loss']:.4f} | {val} | "
        f"{knobs + ' | ' if knobs else ''}cross-node {row['cross_node_bytes'] / 1e6:.2f} MB | "
        f"{row['epoch_seconds']:.1f} s"
    )


class MetricsLog:
    """Appends epoch rows to ``<folder>/metrics.jsonl`` and logs their summary line; on any rank
    but 0 it does nothing.

    Args:
        path: the JSON-lines file.
        rank: this process's rank.
    """

    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.rank = path, rank

    def write(self, row: dict[str, Any]) -> None:
        """Log ``row``'s summary and append it as one JSON line."""
        if self.rank != 0:
            return
        log.info("%s", summary_line(row))
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file with ``rows`` (after a resume: the history the checkpoint holds)."""
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
