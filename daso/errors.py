"""Exception types shared by every layer of :mod:`daso`.

Each error names the problem and the fix; callers catch :class:`DasoError` to
tell the project's own failures from bugs.
"""

from __future__ import annotations

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
