"""Progress inside an epoch on rank 0: a tqdm bar on a terminal, and where stderr is a file
(a Slurm log, ``2> log.txt``) a plain log line every few seconds instead, since a redrawn bar
ends up there as one huge line of carriage returns."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

log = logging.getLogger("daso.progress")


class Progress:
    """Steps done in an epoch, shown as a bar or as periodic lines.

    Args:
        total: optimizer steps in the epoch.
        initial: steps already done (a mid-epoch resume).
        desc: what counts (``"epoch 3"``).
        enabled: show anything at all (rank 0 and ``trainer.progress``).
        interval: seconds between lines when stderr is not a terminal.
        terminal: override the terminal check (``None``: ``sys.stderr.isatty()``).
        last_line: when the previous line was logged (``time.monotonic()``; from the epoch
            before, so that short epochs still get a line every ``interval`` seconds).

    Attributes:
        last: when the last line was logged (pass it on as the next epoch's ``last_line``).
    """

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        enabled: bool,
        interval: float = 10.0,
        terminal: bool | None = None,
        last_line: float | None = None,
    ) -> None:
        self.total, self.done, self.desc = total, initial, desc
        self.interval = interval
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar: Any = None
        if enabled and self.terminal:
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True
            )
        self.start = time.monotonic()
        self.last = self.start if last_line is None else last_line
        self.start_done = initial

    def update(self, loss: Callable[[], float | None] | None = None) -> None:
        """One more step; ``loss``: returns the step's loss on this rank for the line, called
        only when a line is due (reading a loss synchronises with the device)."""
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            return
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        value = loss() if loss is not None else None
        loss_text = f", loss {value:.4f}" if value is not None else ""
        log.info(
            "%s: step %d/%d (%.0f%%), %.2f steps/s%s, %.0f s left in the epoch",
            self.desc,
            self.done,
            self.total,
            100.0 * self.done / max(self.total, 1),
            rate,
            loss_text,
            left,
        )

    def close(self) -> None:
        """Remove the bar (lines need no closing)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
