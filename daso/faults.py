"""Faults a long run meets: pre-emption signals, NaN/Inf losses and gradients, dead peers.

* :class:`PreemptionSignals` turns SIGTERM/SIGUSR1 (what Slurm sends before a time limit or on
  ``scancel``) into a flag the trainer votes on, so every rank stops after the same batch.
* :class:`NonFiniteGuard` checks each step's loss and gradient norm on the device; on a CPU it
  reads the flag every step (free), on a GPU in ``stop`` mode only at the epoch's end and before
  a checkpoint (no extra host synchronisation per step; meanwhile non-finite gradient entries
  are zeroed on the device, so no NaN reaches the parameters or a cross-node sync). ``skip``
  mode must decide before the optimizer step, so it reads one scalar per step, the same read
  ``torch.amp.GradScaler`` makes.
* :func:`describe_peer_failure` turns a failed collective into an error naming the operation
  and the ranks whose heartbeats stopped.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from daso.errors import CommTimeoutError, DasoError, NumericalError, PeerFailureError

log = logging.getLogger(__name__)

#: Signals that ask for a checkpoint and a clean stop.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


#: Why a training run in this process stopped early with a checkpoint (a signal's name, or
#: ``stop_at_epoch=N``), or ``None``; :func:`daso.run` turns it into exit code 75.
_preempted: str | None = None


def record_preemption(reason: str) -> None:
    """Note that a run stopped early after writing a checkpoint (see :func:`preempted`)."""
    global _preempted
    _preempted = reason


def preempted() -> str | None:
    """Why a run in this process stopped early with a checkpoint, or ``None``."""
    return _preempted


#: The output folder of the run in this process (where an expected failure's traceback goes).
_run_folder: Path | None = None


def note_run_folder(folder: Path) -> None:
    """Note the folder of the run in this process (see :func:`run_folder`)."""
    global _run_folder
    _run_folder = folder


def run_folder() -> Path | None:
    """The output folder of the run in this process, once its training started."""
    return _run_folder


class PreemptionSignals:
    """While installed, SIGTERM and SIGUSR1 set :attr:`received` instead of killing the process.

    Use as a context manager in the main thread; the previous handlers come back on exit.

    Attributes:
        received: the signal number received, or 0.
    """

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.received:
            log.warning(
                "received %s: finishing the current batch, then checkpoint and exit (unless "
                "it is the launcher's notice of a failed rank)",
                signal.Signals(signum).name,
            )
        self.received = signum

    def __enter__(self) -> PreemptionSignals:
        for signum in PREEMPTION_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; use the default
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


class NonFiniteGuard:
    """Detects NaN/Inf in the loss or the gradients after gradient communication.

    Args:
        policy: ``"stop"`` (raise :class:`~daso.errors.NumericalError`) or ``"skip"`` (the
            trainer skips the optimizer step and counts it).
        device: the training device; on CUDA, ``stop`` mode defers its reads.
        rank: this rank, for the error message.
        max_skipped_steps: ``skip`` mode: raise :class:`~daso.errors.NumericalError` when this
            many steps in a row are non-finite (a run whose every step is skipped must not
            "succeed").

    The check runs on the gradients after the strategy's gradient reduction, so every rank
    that shares that reduction (all ranks for ``ddp``/``hierarchical``/``horovod``, the node's
    ranks otherwise) sees the same values and takes the same decision.
    """

    def __init__(
        self, policy: str, device: torch.device, rank: int, max_skipped_steps: int = 10
    ) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.rank = rank
        self.max_skipped_steps = max_skipped_steps
        self.in_a_row = 0  # non-finite steps in a row (skip mode)
        self._warned_epoch = -1
        self.deferred = policy == "stop" and device.type == "cuda"
        self._first_bad = torch.full((2,), -1, dtype=torch.int64, device=device)
        self.skipped_steps = 0

    def nonfinite(
        self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], norm: Any = None
    ) -> torch.Tensor:
        """Device bool tensor: is ``loss`` or the gradient 2-norm (``norm`` if the caller has
        it, e.g. from clipping) NaN or Inf? A norm that overflows float32 (entries beyond about
        1e19) counts as Inf. Costs one fused norm; no host synchronisation."""
        if norm is None:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        return torch.logical_not(torch.isfinite(loss.detach()) & torch.isfinite(norm))

    def should_skip(self, bad: torch.Tensor, epoch: int, batch: int) -> bool:
        """Decide this step: ``True`` to skip it (``skip`` mode). In ``stop`` mode raises, or on
        CUDA records the first bad (epoch, batch) for :meth:`check`.

        Raises:
            NumericalError: ``stop`` mode and the step is non-finite (read now on CPU), or
                ``skip`` mode and ``max_skipped_steps`` steps in a row were non-finite.
        """
        if self.deferred:
            marker = torch.tensor([epoch, batch], device=bad.device)
            unset = self._first_bad[0] < 0
            self._first_bad.copy_(torch.where(bad & unset, marker, self._first_bad))
            return False  # the caller zeroes non-finite gradients (see sanitize)
        if not bool(bad):
            self.in_a_row = 0
            return False
        if self.policy == "stop":
            self._raise(epoch, batch)
        self.skipped_steps += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skipped_steps:
            raise NumericalError(
                f"rank {self.rank}: {self.in_a_row} non-finite steps in a row, the last at "
                f"epoch {epoch} batch {batch} (trainer.max_skipped_steps is "
                f"{self.max_skipped_steps}): the run is not training. Lower optim.lr, set "
                "trainer.grad_clip_norm or check the input data"
            )
        if self._warned_epoch != epoch:  # once per epoch; the epoch row counts every skip
            self._warned_epoch = epoch
            log.warning(
                "rank %d: non-finite loss/gradient at epoch %d batch %d: step skipped (further "
                "skips this epoch are counted in skipped_steps, not logged)",
                self.rank,
                epoch,
                batch,
            )
        return True

    def sanitize(self, params: Iterable[torch.nn.Parameter]) -> None:
        """CUDA ``stop`` mode: replace NaN/Inf gradient entries by 0 on the device, so a bad
        step cannot put a NaN into the parameters (or a cross-node sync) before the deferred
        :meth:`check` stops the run."""
        if self.deferred:
            for p in params:
                if p.grad is not None:
                    p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def check(self) -> None:
        """Read the deferred flag (CUDA ``stop`` mode): raise if any step was non-finite.

        Raises:
            NumericalError: naming the first bad epoch and batch on this rank.
        """
        if self.deferred:
            epoch, batch = (int(v) for v in self._first_bad.tolist())
            if epoch >= 0:
                self._raise(epoch, batch)

    def _raise(self, epoch: int, batch: int) -> None:
        raise NumericalError(
            f"rank {self.rank}: NaN or Inf loss or gradient at epoch {epoch}, batch {batch}. "
            "Lower optim.lr, set trainer.grad_clip_norm, check the input data, or set "
            "trainer.nan_policy=skip to skip such steps"
        )


def describe_peer_failure(
    rank: int, operation: str, error: BaseException, silent: list[int] | None
) -> str:
    """Message for a collective that failed or timed out: this rank, the operation, the ranks
    whose heartbeats stopped (``silent``, from :meth:`~daso.comm.control.Heartbeat.silent_ranks`;
    ``None`` if the store did not answer), and the error."""
    if silent is None:
        who = "rank 0, which hosts the rendezvous store, stopped answering (or no heartbeats)"
    elif silent:
        who = f"rank(s) {silent} stopped answering (no heartbeat)"
    else:
        who = "every rank still has a heartbeat; one may be stuck in another operation"
    return f"rank {rank}: {operation} failed: {who}. Cause: {type(error).__name__}: {error}"


def _is_mpi_error(err: BaseException) -> bool:
    """Whether ``err`` is an error MPI returned (``mpi4py.MPI.Exception``: the job's MPI
    communicators return errors instead of aborting, see :func:`daso.init_distributed`)."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(err, mpi.Exception)


def peer_failure(
    err: BaseException, control: Any, rank: int, operation: str
) -> PeerFailureError | None:
    """What a failed operation means for the job, decided after asking the heartbeats.

    Args:
        err: the exception the operation raised.
        control: the run's :class:`~daso.comm.control.ControlPlane` (``None``: no heartbeats).
        rank: this rank.
        operation: what the ranks were doing (for the message).

    Returns:
        A :class:`~daso.errors.PeerFailureError` naming the ranks whose heartbeats stopped
        (those that stopped on purpose after the same failure left out) for a communication
        error (``torch.distributed``, MPI, a time-out), or for any other runtime error while
        some rank is silent (e.g. DDP's reducer reporting a reset connection); ``None`` when
        ``err`` is none of these (it is re-raised as it is).
    """
    if isinstance(err, DasoError) and not isinstance(err, CommTimeoutError):
        return None
    comm_error = isinstance(err, (dist.DistError, CommTimeoutError)) or _is_mpi_error(err)
    silent = control.silent_ranks() if control is not None else None
    if comm_error or silent:
        return PeerFailureError(describe_peer_failure(rank, operation, err, silent))
    return None
