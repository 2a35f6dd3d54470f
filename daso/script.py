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
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from daso.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    DasoError,
    DataError,
    TopologyError,
    raise_agreed,
)
from daso.log import configure_logging

log = logging.getLogger("daso.cli")
T = TypeVar("T")


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


def _launched_ranks() -> int:
    from daso.errors import DasoError
    from daso.topology import read_launcher_env

    try:
        return read_launcher_env().world_size
    except DasoError:
        return 1


#: Seconds a failing rank waits between logging its error and aborting the MPI job, so the
#: launcher forwards every failing rank's message before the abort kills the others.
ABORT_GRACE_SECONDS = 2.5  # more than two heartbeats: every rank names a lost peer first


def abort_world(code: int, start_mpi: bool = False) -> None:
    """Take every other rank down with this one, so none waits forever on a dead peer (after
    :data:`ABORT_GRACE_SECONDS`, with this rank's output flushed).

    Args:
        code: the exit code the launcher reports.
        start_mpi: initialise MPI first if the launcher started several ranks and it is not
            yet (bad input found before MPI started: the other ranks wait in its start-up).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if start_mpi and "mpi4py.MPI" not in sys.modules and _launched_ranks() > 1:
        from mpi4py import MPI  # noqa: F401 - importing it initialises MPI
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            time.sleep(ABORT_GRACE_SECONDS)
            remove_mapped_shared_memory()
            MPI.COMM_WORLD.Abort(code)


#: Shared-memory files MPICH creates for a node's ranks; its ``MPI_Finalize`` removes them,
#: an ``MPI_Abort`` leaves them behind (4 MB each).
MPICH_SHM_PREFIX = "/dev/shm/mpich_shm_"


def remove_mapped_shared_memory(prefix: str = MPICH_SHM_PREFIX) -> list[str]:
    """Remove the MPI library's shared-memory files that this process has mapped (read from
    ``/proc/self/maps``: only files of this job, never another job's), before an abort that
    would leave them in ``/dev/shm``. The job's other ranks on the node are aborted with it.

    Returns:
        The paths removed (none where ``/proc`` is missing or nothing is mapped).
    """
    try:
        with open("/proc/self/maps") as maps:
            mapped = {
                fields[5]
                for fields in (line.split() for line in maps)
                if len(fields) == 6 and fields[5].startswith(prefix)
            }
    except OSError:
        return []
    removed = []
    for path in sorted(mapped):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass  # another rank of the node removed it first
    return removed


def agree_on_input(check: Callable[[], T], timeout: float = 300.0) -> T:
    """Run ``check()`` (loading config, data and checkpoint) on every rank of the MPI job, then
    agree whether any rank found bad input, so that input that is bad on some nodes only (a
    path that exists on one node and not on another) ends the whole job with exit code 2
    instead of leaving the other ranks waiting forever.

    Each distinct message is printed once, by the lowest rank that found it, naming the other
    ranks that found the same; the ranks that found nothing raise an error marked
    :func:`~daso.errors.reported_elsewhere`, so all exit with 2 and no rank prints twice.

    Args:
        check: the per-rank input checks; its result is returned.
        timeout: seconds to wait for every rank to finish its checks; a rank that never
            arrives (it crashed) makes the others abort the job with exit code 2.

    Raises:
        ConfigError, DataError, CheckpointError, TopologyError: on every rank, when any rank
            found bad input.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return check()
    result: Any = None
    error: BaseException | None = None
    try:
        result = check()
    except bad_input_errors() as err:
        error = err
    request = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            log.error(
                "rank %d: some ranks did not finish loading the config and data within %.0f s "
                "(one crashed or hangs; see its output); aborting the job",
                comm.Get_rank(),
                timeout,
            )
            abort_world(EXIT_BAD_INPUT)
            raise SystemExit(EXIT_BAD_INPUT)
        time.sleep(0.01)
    messages = comm.allgather(str(error) if error is not None else None)
    raise_agreed(error, messages, comm.Get_rank())
    return result


def exit_code(main: Callable[[], Any]) -> int:
    """Run ``main()`` and map its outcome to the exit codes of the module docstring.

    An ``int`` that ``main`` returns is the exit code; otherwise 75 if a trainer in this
    process stopped early with a checkpoint, else 0. Bad input is logged by every rank that
    found it, in one line (an error another rank already reported is not repeated). An
    expected failure (a :class:`~daso.errors.DasoError`: NaN with ``nan_policy: stop``, a dead
    peer) is one line on the rank that raised it, its traceback going to the debug log and to
    ``<run folder>/traceback-rank<r>.txt``; any other exception (a bug) is logged with its
    traceback. After a failure the MPI job is aborted, so no rank waits for a dead peer.
    """
    rank = launcher_rank()
    configure_logging(rank)
    try:
        result = _closing(main)
    except Preempted:
        return EXIT_PREEMPTED
    except bad_input_errors() as err:
        if not getattr(err, "reported_elsewhere", False):
            log.error("%s", err)
        if not getattr(err, "agreed", False):  # other ranks may wait for this one: stop them
            abort_world(EXIT_BAD_INPUT, start_mpi=True)
        return EXIT_BAD_INPUT
    except DasoError as err:  # expected: one line, the traceback out of the way
        if not getattr(err, "reported_elsewhere", False):
            log.error("%s%s", err, _save_traceback(rank))
        abort_world(EXIT_FAILURE)
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - report it, then stop every rank
        log.error("rank %d failed: %s: %s", rank, type(err).__name__, err, exc_info=True)
        abort_world(EXIT_FAILURE)
        return EXIT_FAILURE
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    from daso.faults import preempted

    return EXIT_PREEMPTED if preempted() else EXIT_OK


def _closing(main: Callable[[], T]) -> T:
    """``main()``, then close every run it left open (a ``Trainer`` or ``Distributed``):
    cleanly after a return or :class:`Preempted` (every rank is at the same point), without
    waiting for other ranks after any other exception."""
    from daso.distributed import close_open

    try:
        result = main()
    except Preempted:
        close_open(clean=True)
        raise
    except BaseException:
        close_open(clean=False)
        raise
    close_open(clean=True)
    return result


def _save_traceback(rank: int) -> str:
    """Log the exception being handled at debug level and write it to the run folder; the
    text to append to its one-line message (where the traceback went)."""
    log.debug("traceback", exc_info=True)
    from daso.faults import run_folder

    folder = run_folder()
    if folder is None:
        return ""
    path = folder / f"traceback-rank{rank}.txt"
    try:
        path.write_text(traceback.format_exc())
    except OSError:
        return ""
    return f" (traceback in {path})"


def run(main: Callable[..., Any], *args: Any, **kwargs: Any) -> NoReturn:
    """Call ``main(*args, **kwargs)`` and exit the process with :func:`exit_code`'s code."""
    sys.exit(exit_code(lambda: main(*args, **kwargs)))
