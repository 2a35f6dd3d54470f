"""The CLI's exit codes for a user's own training script: ``daso.run(main)``.

A batch system tells a pre-empted job from a failed one by its exit code, so a script of one's
own should end the way ``daso train`` does::

    0   success
    1   a failure during the run; every other rank of the MPI job is aborted (no rank waits
        for a dead peer)
    2   bad input (config, data, checkpoint, topology), reported before training starts
    75  stopped early after writing a checkpoint (SIGTERM/SIGUSR1, or ``stop_at_epoch``;
        sysexits' EX_TEMPFAIL): ``launch/slurm.sbatch`` requeues the job on it

Example::

    import daso

    def main():
        trainer = daso.Trainer(model, optimizer, loss_fn, daso.load_config("my.yaml"))
        trainer.fit(train_set, val_set)      # a signal makes it checkpoint and return early
        trainer.close()

    if __name__ == "__main__":
        daso.run(main)                       # exits 75 if fit() stopped early

A loop of one's own raises :class:`Preempted` after saving its checkpoint (see
:meth:`daso.Distributed.should_stop`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from daso.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    DataError,
    TopologyError,
)
from daso.log import configure_logging

log = logging.getLogger("daso.cli")


class Preempted(Exception):  # noqa: N818 - named for what happened, like KeyboardInterrupt
    """Raised by a user's loop after it wrote its checkpoint on a stop request:
    :func:`run` exits with 75."""


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit code 2)."""
    from daso.emulate import EmulationUnavailable

    return (ConfigError, DataError, TopologyError, CheckpointError, EmulationUnavailable)


def launcher_rank() -> int:
    """This process's rank as the launcher's environment says (0 without one)."""
    from daso.errors import DasoError
    from daso.topology import read_launcher_env

    try:
        return read_launcher_env().rank
    except DasoError:
        return 0


#: Seconds a failing rank waits between logging its error and aborting the MPI job, so the
#: launcher forwards every failing rank's message before the abort kills the others.
ABORT_GRACE_SECONDS = 1.0


def abort_world(code: int) -> None:
    """Take every other rank down with this one, so none waits forever on a dead peer (after
    :data:`ABORT_GRACE_SECONDS`, with this rank's output flushed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            time.sleep(ABORT_GRACE_SECONDS)
            MPI.COMM_WORLD.Abort(code)


def exit_code(main: Callable[[], Any]) -> int:
    """Run ``main()`` and map its outcome to the exit codes of the module docstring.

    An ``int`` that ``main`` returns is the exit code; otherwise 75 if a trainer in this
    process stopped early with a checkpoint, else 0. Bad input is logged once (by rank 0,
    since every rank reads the same input); any other exception is logged with its traceback
    on the rank that raised it, and the MPI job is aborted.
    """
    rank = launcher_rank()
    configure_logging(rank)
    try:
        result = main()
    except Preempted:
        return EXIT_PREEMPTED
    except bad_input_errors() as err:
        if rank == 0:
            log.error("%s", err)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - report it, then stop every rank
        log.error("rank %d failed: %s: %s", rank, type(err).__name__, err, exc_info=True)
        abort_world(EXIT_FAILURE)
        return EXIT_FAILURE
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    from daso.faults import preempted

    return EXIT_PREEMPTED if preempted() else EXIT_OK


def run(main: Callable[..., Any], *args: Any, **kwargs: Any) -> NoReturn:
    """Call ``main(*args, **kwargs)`` and exit the process with :func:`exit_code`'s code."""
    sys.exit(exit_code(lambda: main(*args, **kwargs)))
