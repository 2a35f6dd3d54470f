"""Exception types shared by every layer of :mod:`daso`.

Each error names the problem and the fix; callers catch :class:`DasoError` to
tell the project's own failures from bugs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

#: Process exit codes of ``daso train`` and :func:`daso.run`: success, a failure during the run,
#: bad input, stopped early after a checkpoint (sysexits' EX_TEMPFAIL: requeue the job).
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 75


class DasoError(Exception):
    """Base class of every error raised on purpose by daso."""


class ConfigError(DasoError, ValueError):
    """A configuration file, key or value is invalid (raised before any process group exists)."""


class TopologyError(DasoError, RuntimeError):
    """The launcher's environment describes a cluster layout that cannot work."""


class DataError(DasoError, ValueError):
    """A data path is missing, empty or malformed."""


class CommTimeoutError(DasoError, TimeoutError):
    """A collective did not complete within its configured timeout (a peer rank died or hangs)."""


class CheckpointError(DasoError, ValueError):
    """A checkpoint is missing, corrupt, or does not fit this run (model, strategy, world size)."""


class NumericalError(DasoError, FloatingPointError):
    """A loss or gradient became NaN or Inf and the config says to stop (``nan_policy: stop``)."""


class PeerFailureError(DasoError, RuntimeError):
    """A collective failed or timed out because a peer rank died or hangs; the message names
    the operation and the ranks whose heartbeats stopped."""


class RecordError(DasoError, RuntimeError):
    """The run's record (``metrics.jsonl``) could not be written; the run stopped at the
    epoch's end after a checkpoint."""


def reported_elsewhere(err: DasoError) -> DasoError:
    """Mark ``err`` as already reported by another rank (the rank that found the problem
    printed it) and raised on every rank: :func:`daso.run` then exits with its code without
    printing it again or aborting the job."""
    err.reported_elsewhere = True  # type: ignore[attr-defined]
    return agreed(err)


def agreed(err: DasoError) -> DasoError:
    """Mark ``err`` as raised on every rank at the same point (after an agreement), so
    :func:`daso.run` need not abort the MPI job to stop the others."""
    err.agreed = True  # type: ignore[attr-defined]
    return err


def raise_agreed(error: BaseException | None, messages: Sequence[str | None], rank: int) -> None:
    """After every rank shared its error message (``None``: no error) as ``messages``: raise
    on every rank if any rank failed, each distinct message logged once, by the lowest rank
    that has it (naming the others that found the same); nothing if no rank failed.

    Raises:
        DasoError: this rank's ``error`` marked :func:`reported_elsewhere` (it is logged
            here, once), or on a rank without an error a :class:`ConfigError` so marked.
    """
    if not any(messages):
        return
    if error is None:
        failed = [r for r, m in enumerate(messages) if m]
        raise reported_elsewhere(ConfigError(f"bad input on rank(s) {failed}"))
    same = [r for r, m in enumerate(messages) if m == str(error)]
    if same[0] == rank:
        others = f" (rank(s) {same[1:]} found the same)" if len(same) > 1 else ""
        logging.getLogger("daso.cli").error("rank %d: %s%s", rank, error, others)
    raise reported_elsewhere(error) from None  # type: ignore[arg-type]
