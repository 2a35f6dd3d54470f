"""Logging with the rank in every record; rank 0 speaks at INFO, the others at WARNING."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"


#: ``extra=ONCE`` on a log call: only rank 0 prints it (a warning about the config or a file
#: that every rank would repeat word for word).
ONCE = {"once": True}


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or not getattr(record, "once", False)


def configure_logging(rank: int, level: int | None = None) -> None:
    """Send the ``daso`` loggers to stderr with the rank in each line.

    Does nothing if the application already gave the ``daso`` logger a handler.

    Args:
        rank: global rank shown in every record.
        level: threshold; default INFO on rank 0 and WARNING elsewhere.
    """
    logger = logging.getLogger("daso")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(
        level if level is not None else (logging.INFO if rank == 0 else logging.WARNING)
    )
    logger.propagate = False
