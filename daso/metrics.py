"""Where a run's metrics go: every logger of ``trainer.loggers`` (see :mod:`daso.loggers`), and
one summary line an epoch in the log; rank 0 only."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daso.loggers import MetricLogger, build_loggers

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
    train = row.get("train_loss")
    train_text = f"train loss {train:.4f}" if train is not None else "every step skipped"
    return (
        f"epoch {row['epoch']} | {train_text} | {val} | "
        f"{knobs + ' | ' if knobs else ''}cross-node {row['cross_node_bytes'] / 1e6:.2f} MB | "
        f"{row['epoch_seconds']:.1f} s"
    )


class MetricsLog:
    """Rank 0's metric writers; on any other rank it does nothing.

    A logger that fails (a full disk, a read-only folder, a logging service gone) is dropped
    with one warning naming it and the error; training and the other loggers go on. The
    ``jsonl`` logger is the run's record: when it fails, :attr:`failure` says why and the
    trainer stops the run at the epoch's end with a checkpoint.

    Args:
        folder: the run's output folder.
        rank: this process's rank.
        names: ``trainer.loggers``.

    Attributes:
        failure: why the run's record (``metrics.jsonl``) could not be written, or ``None``.
    """

    #: The logger whose failure stops the run (the run's record).
    RECORD = "jsonl"

    def __init__(self, folder: Path, rank: int, names: Sequence[str]) -> None:
        self.folder, self.rank, self.names = folder, rank, list(names)
        self.loggers: dict[str, MetricLogger] = {}
        self.run_id = ""
        self.failure: str | None = None

    def open(
        self,
        run_id: str,
        config: dict[str, Any],
        history: Sequence[dict[str, Any]],
        resume_step: int,
    ) -> None:
        """Start the loggers (at the start of ``fit``, after the folder is claimed); a resume
        rewrites the files with the checkpoint's ``history``."""
        self.run_id = run_id
        if self.rank == 0 and not self.loggers:
            built = build_loggers(self.names, self.folder, run_id, config, history, resume_step)
            self.loggers = dict(zip(self.names, built, strict=True))

    def _each(self, call: str, row: dict[str, Any] | None = None) -> None:
        """``logger.<call>(row)`` for every logger, dropping the ones that fail."""
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, call)(*(() if row is None else (row,)))
            except Exception as err:  # noqa: BLE001 - any logger's failure must not end the run
                del self.loggers[name]
                reason = f"{type(err).__name__}: {str(err).strip()[:200]}"
                if name == self.RECORD:
                    self.failure = (
                        f"the run's record (metrics.jsonl, steps.jsonl in {self.folder}) could "
                        f"not be written ({reason}); free space or make the folder writable, "
                        "then continue with --resume auto"
                    )
                    log.error("%s: the run stops at the end of this epoch", self.failure)
                else:
                    log.warning(
                        "logger %r failed (%s): dropped; training and the other loggers go on",
                        name,
                        reason,
                    )

    def write(self, row: dict[str, Any]) -> None:
        """Log ``row``'s summary and hand the epoch row to every logger."""
        if self.rank != 0:
            return
        log.info("%s", summary_line(row))
        self._each("log_epoch", row)

    def write_step(self, row: dict[str, Any]) -> None:
        """Hand a step row to every logger."""
        if self.rank == 0:
            self._each("log_step", row)

    def close(self) -> None:
        """Flush and close every logger."""
        self._each("close")
        self.loggers = {}


class StepLog:
    """Step rows for the loggers every ``every`` optimizer steps (0: none), from rank 0's view.

    A row: ``run_id``, ``step`` (optimizer steps done in the run), ``epoch``, ``loss`` (rank 0's
    last step, mean over its micro-batches), ``lr`` (of that step), ``samples_per_second``
    (rank 0's rate since the previous row times the world size: data parallelism feeds every
    rank the same batch size), ``cross_node_bytes`` (rank 0's sync events since the previous
    row) and ``events`` (those sync events, e.g. DASO's ``send``/``merge``/``average``).
    """

    def __init__(self, every: int, metrics: MetricsLog, run_id: str, epoch: int) -> None:
        self.every, self.metrics, self.run_id, self.epoch = every, metrics, run_id, epoch
        self._reset()

    def _reset(self) -> None:
        self.since = time.perf_counter()
        self.samples = 0.0
        self.events: list[dict[str, Any]] = []

    def step(self, dist: Any, lr: float, samples: float, rank0: bool) -> None:
        """After :meth:`daso.Distributed.step`: count the step; write a row when one is due.

        Args:
            dist: the :class:`~daso.distributed.Distributed` just stepped.
            lr: the LR the step used.
            samples: samples this rank trained in the step (all micro-batches).
            rank0: this is rank 0 (the only one that writes).
        """
        if not self.every or not rank0:
            return
        self.samples += samples
        self.events.extend(dist.step_events)
        if dist.step_count % self.every:
            return
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        row = {
            "run_id": self.run_id,
            "step": dist.step_count,
            "epoch": self.epoch,
            "loss": dist.last_step_loss,
            "lr": lr,
            "samples_per_second": self.samples * dist.topology.world_size / elapsed,
            "cross_node_bytes": sum(int(e.get("bytes", 0)) for e in self.events),
            "events": self.events,
        }
        self.metrics.write_step(row)
        self._reset()
