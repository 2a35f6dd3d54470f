"""The step-level API: any strategy, driven from the user's own training loop.

:class:`Distributed` is what :class:`daso.Trainer` runs on, and what a script with its own loop
uses instead. It broadcasts rank 0's weights, wraps the model for node-local gradient averaging,
runs the strategy's hooks around backward and ``optimizer.step()``, accumulates gradients over
micro-batches (node-local gradient sync on the last one only), clips gradients, guards against
NaN/Inf, counts steps into *windows* (the unit of DASO's schedule) and feeds each window's
mean loss over all ranks to the strategy. Three calls per optimizer step, checked for order::

    dist = daso.Distributed(model, optimizer, "daso", {"window_steps": 50},
                            steps_per_epoch=200, epochs=2, accumulate_steps=2)
    for batch in batches:                      # 2 micro-batches per optimizer step
        with dist.micro_batch():               # forward and backward inside
            loss = loss_fn(dist.model(batch["x"]), batch["y"])
            dist.backward(loss, samples=len(batch["x"]))
        if dist.ready:                         # the last micro-batch of the step is done
            window = dist.step()               # a dict when the step closed a window
    dist.close()

The same strategies as the trainer, after the anchors: Horovod's ``DistributedOptimizer``
(hooks around backward and ``step()``), PyTorch's ``PeriodicModelAverager`` and torchft's
``LocalSGD`` / ``DiLoCo`` (a model average after ``step()``). Unlike them, the window end (the
blocking average, the controller's input) is the API's job, not the caller's.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from daso.comm import allreduce_sum, broadcast_tensors, model_state_tensors, no_sync, unwrap
from daso.comm.control import ControlPlane
from daso.errors import ConfigError
from daso.faults import NonFiniteGuard, PreemptionSignals, peer_failure
from daso.strategies import build_strategy
from daso.topology import ProcessGroups, init_distributed, shutdown_distributed

F = TypeVar("F", bound=Callable[..., Any])

#: The runs of this process that are not closed yet (a Trainer or a Distributed), by the order
#: they were made in: :func:`close_open` closes what a script left open before the process
#: exits, newest first, in the same order on every rank (its clean close is collective).
_OPEN: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_MADE = itertools.count()


def register_open(run: Any) -> None:
    """Note ``run`` (anything with ``close(clean=...)``) as open, for :func:`close_open`."""
    _OPEN[next(_MADE)] = run


def unregister_open(run: Any) -> None:
    """``run`` closed itself."""
    for key, value in list(_OPEN.items()):
        if value is run:
            del _OPEN[key]


def close_open(clean: bool) -> None:
    """Close every :class:`~daso.Trainer` and :class:`Distributed` of this process still open,
    newest first (what :func:`daso.run` does before the process exits, so that no thread or
    process group outlives the interpreter).

    Args:
        clean: all ranks got here at the same point (success, or an agreed stop): close with
            the collectives that wait for the other ranks; ``False`` after a failure (peers
            may be gone): only what needs no other rank.
    """
    for key in sorted(_OPEN.keys(), reverse=True):
        run = _OPEN.get(key)
        if run is not None:
            run.close(clean=clean)


def _names_lost_peers(method: F) -> F:
    """Turn a communication failure inside ``method`` into :class:`~daso.errors.PeerFailureError`
    naming the ranks whose heartbeats stopped, when this object has a control plane of its own
    (a :class:`~daso.Trainer` gives it none and does this itself)."""

    @functools.wraps(method)
    def wrapper(self: Distributed, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (RuntimeError, TimeoutError) as err:
            failure = None
            if self.control is not None:
                failure = peer_failure(err, self.control, self.topology.rank, self.operation)
            if failure is None:
                raise
            raise failure from err

    return wrapper  # type: ignore[return-value]


#: Window counters summed over ranks when a window closes.
_SUMMED = ("loss_sum", "samples", "cross_node_bytes", "comm_wait_seconds", "skipped_steps")


def _empty_partial() -> dict[str, float]:
    return dict.fromkeys(_SUMMED, 0.0)


class Distributed:
    """A model, its optimizer and a strategy, stepped from the caller's loop.

    Args:
        model: the user's module; rank 0's parameters and buffers are broadcast to every rank
            (pretrained weights survive), nothing is re-initialised. Moved to the device.
        optimizer: an optimizer over ``model``'s parameters.
        strategy: a strategy name (``daso``, ``ddp``, ``local_sgd``, ... see
            :data:`daso.strategies.STRATEGIES`).
        options: the strategy's options (its config section's keys, e.g. ``window_steps``,
            ``warmup_windows``); defaults fill the rest.
        steps_per_epoch: optimizer steps in an epoch, equal on all ranks (>= 1). Windows never
            straddle epochs: an epoch is cut into windows of ``window_steps`` (the last one
            shorter), or is one window. ``None``: set it with :meth:`set_steps_per_epoch`
            before the first step (the trainer does, once it sees the data).
        epochs: epochs of the run (with ``steps_per_epoch``, the run's length, which DASO's
            cool-down needs).
        accumulate_steps: micro-batches per optimizer step (>= 1); the loss is divided by it.
        grad_clip_norm: clip the gradient's 2-norm to this before every step (``None``: off).
        amp: autocast forward passes (bfloat16 on CPU; float16 with a GradScaler on CUDA).
        nan_policy: ``"stop"`` (raise :class:`~daso.errors.NumericalError`) or ``"skip"``
            (skip the step on every rank) on a NaN/Inf loss or gradient.
        max_skipped_steps: with ``"skip"``, raise :class:`~daso.errors.NumericalError` after
            this many non-finite steps in a row.
        deterministic: bitwise-reproducible steps (fixed DDP buckets, deterministic kernels).
        timeout_seconds: longest wait for a cross-node collective.
        groups: process groups from :func:`daso.init_distributed` (default: created here from
            the launcher's environment, and destroyed by :meth:`close`).
        preemption: catch SIGTERM/SIGUSR1 (from the main thread) and vote on them in
            :meth:`should_stop`, over a control plane of its own (heartbeats, Gloo groups);
            ``False`` leaves signals alone (the trainer has its own).

    Attributes:
        model: the module to run forward on (a DDP wrapper of ``model``, or ``model``).
        module: the user's ``model``. ``optimizer``: the optimizer to read (the user's, or
            the strategy's wrapper of it). ``strategy``: the :class:`~daso.strategies.Strategy`.
        step_count: optimizer steps done in the run; ``window``, ``epoch``: the current ones
            (0-based); ``window_steps``: the window length (``None``: one epoch).
        ready: the step's micro-batches are all done: call :meth:`step`.
        step_events: the sync events of the last step (e.g. DASO's ``send``, ``merge`` with
            its ``staleness`` and ``wait_seconds``, ``average``; each with its ``bytes``).

    Raises:
        ConfigError: an unknown strategy option, an out-of-range value, or a run too short for
            the schedule (e.g. DASO's warm-up plus cool-down exceed the run's windows).
        TopologyError: the launcher's environment describes an impossible cluster.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: str = "daso",
        options: Mapping[str, Any] | None = None,
        *,
        steps_per_epoch: int | None,
        epochs: int = 1,
        accumulate_steps: int = 1,
        grad_clip_norm: float | None = None,
        amp: bool = False,
        nan_policy: str = "stop",
        max_skipped_steps: int = 10,
        deterministic: bool = False,
        timeout_seconds: float = 300.0,
        groups: ProcessGroups | None = None,
        preemption: bool = True,
    ) -> None:
        for label, value in (("epochs", epochs), ("accumulate_steps", accumulate_steps)):
            _check_count(label, value)
        self.owns_groups = groups is None
        self.groups = groups or init_distributed("auto", timeout_seconds)
        self.topology = self.groups.topology
        self.device = self.groups.device
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.accumulate_steps = accumulate_steps
        self.grad_clip_norm = grad_clip_norm
        if steps_per_epoch is not None:
            _check_count("steps_per_epoch", steps_per_epoch)
        model.to(self.device)
        broadcast_tensors(model_state_tensors(model), src=0)
        self.module = model
        # the run's length in windows is set once the validated window_steps is known
        self.strategy = build_strategy(
            strategy, self.groups, None, options, timeout_seconds=timeout_seconds
        )
        self.window_steps = self.strategy.options.window_steps
        if steps_per_epoch is not None:
            self.strategy.set_run_length(epochs * self.windows_per_epoch)
        elif self.window_steps is None:
            self.strategy.set_run_length(epochs)  # one window an epoch, whatever its length
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.strategy.deterministic = deterministic
        self.strategy.accumulate_steps = accumulate_steps
        self.model = self.strategy.wrap(model, optimizer)
        self.optimizer = self.strategy.optimizer
        cuda = self.device.type == "cuda"
        self.amp, self.amp_dtype = amp, torch.float16 if cuda else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
        self.step_events: list[dict[str, Any]] = []  # the last step's sync events
        self._last_loss: tuple[torch.Tensor, float] | None = None
        self.guard = NonFiniteGuard(nan_policy, self.device, self.topology.rank, max_skipped_steps)
        self.step_count = 0
        self.micro = 0  # micro-batches of the current step done
        self.partial = _empty_partial()  # this rank's counters of the open window
        self._window_open = False
        self._in_micro = self._backward_done = False
        self._step_loss: torch.Tensor | None = None
        self._step_samples = 0.0
        self.operation = "setup"  # what the ranks are doing, for failure messages
        self.signals = PreemptionSignals().__enter__() if preemption else None
        self.control = (
            ControlPlane(self.groups, self.strategy.lockstep, timeout_seconds)
            if preemption
            else None
        )
        self._closed = False
        register_open(self)

    @_names_lost_peers
    def should_stop(self) -> bool:
        """Collective, after :meth:`step`: whether to checkpoint and stop because some rank got
        SIGTERM or SIGUSR1. Every rank gets the same answer after the same step (the vote is
        read one step late); for strategies whose nodes run on their own clocks
        (``async_easgd``, ``downpour``) the answer can only be yes right after an epoch's last
        step. Save the checkpoint, then ``raise daso.Preempted`` (:func:`daso.run` exits 75).

        Raises:
            RuntimeError: built with ``preemption=False``.
        """
        if self.control is None:
            raise RuntimeError("should_stop() needs Distributed(..., preemption=True)")
        flag = 1 if self.signals.received else 0
        vote = self.control.stop_vote
        self.operation = f"epoch {self.epoch} step {self.step_in_epoch}: stop vote"
        if self.control.lockstep:
            return bool(vote.exchange(flag))
        vote.exchange(flag)
        return self.step_in_epoch == 0 and bool(vote.finish())

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Set the epoch length in optimizer steps (before the first step, or to the value
        already set); the strategy learns the run's number of windows.

        Raises:
            ConfigError: not an integer >= 1, or the schedule does not fit the run.
            RuntimeError: after the first step, to a different value.
        """
        _check_count("steps_per_epoch", steps_per_epoch)
        if steps_per_epoch == self.steps_per_epoch:
            return
        if self.step_count or self.micro:
            raise RuntimeError("set_steps_per_epoch() after the first step")
        self.steps_per_epoch = steps_per_epoch
        self.strategy.set_run_length(self.epochs * self.windows_per_epoch)

    # -- position ------------------------------------------------------------------------------
    @property
    def windows_per_epoch(self) -> int:
        """Windows an epoch is cut into."""
        if self.window_steps is None:
            return 1
        return math.ceil(self.steps_per_epoch / self.window_steps)

    @property
    def epoch(self) -> int:
        return self.step_count // self.steps_per_epoch

    @property
    def step_in_epoch(self) -> int:
        return self.step_count % self.steps_per_epoch

    @property
    def window(self) -> int:
        """The current window, 0-based over the run."""
        return self.epoch * self.windows_per_epoch + self._window_in_epoch

    @property
    def _window_in_epoch(self) -> int:
        return self.step_in_epoch // (self.window_steps or self.steps_per_epoch)

    @property
    def step_in_window(self) -> int:
        """Steps of the current window done (the strategy's ``batch`` argument)."""
        return self.step_in_epoch - self._window_in_epoch * (
            self.window_steps or self.steps_per_epoch
        )

    @property
    def window_length(self) -> int:
        """Steps of the current window (the last window of an epoch may be shorter)."""
        size = self.window_steps or self.steps_per_epoch
        return min(size, self.steps_per_epoch - self._window_in_epoch * size)

    @property
    def ready(self) -> bool:
        return self.micro == self.accumulate_steps

    @property
    def last_step_loss(self) -> float | None:
        """The last step's loss on this rank (mean over its micro-batches, weighted by
        ``samples``); ``None`` before the first step or when it was skipped. Reading it
        synchronises with the device."""
        if self._last_loss is None:
            return None
        loss, samples = self._last_loss
        return float(loss) / max(samples, 1e-12)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    # -- the three calls -----------------------------------------------------------------------
    @contextlib.contextmanager
    def micro_batch(self) -> Iterator[None]:
        """Context for the forward and backward of one micro-batch (call :meth:`backward`
        inside). Node-local gradient averaging runs on the step's last micro-batch only, as
        the strategy decides; forward passes are autocast when ``amp``.

        Raises:
            RuntimeError: nested, after the run's last step, or when the step's micro-batches
                are done and :meth:`step` is due.
        """
        if self._in_micro:
            raise RuntimeError("micro_batch() inside micro_batch(); close the first one")
        if self.ready:
            raise RuntimeError(
                f"all {self.accumulate_steps} micro-batches of the step are done; call step()"
            )
        if self.steps_per_epoch is None:
            raise RuntimeError("the epoch length is unknown; call set_steps_per_epoch() first")
        if self.step_count >= self.total_steps:
            raise RuntimeError(f"the run's {self.total_steps} steps are done")
        if self.micro == 0:
            self._begin_step()
        last = self.micro == self.accumulate_steps - 1
        sync = self.strategy.sync_context(self.step_in_window) if last else no_sync(self.model)
        self.operation = (
            f"epoch {self.epoch} step {self.step_in_epoch}: forward/backward with node-local "
            "gradient averaging"
        )
        self._in_micro, self._backward_done = True, False
        try:
            with sync, torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                yield
        finally:
            self._in_micro = False
        if not self._backward_done:
            raise RuntimeError("micro_batch() closed without backward(loss); call it inside")
        self.micro += 1

    @_names_lost_peers
    def backward(self, loss: torch.Tensor, samples: float | None = None) -> None:
        """Backward of ``loss`` (a scalar, mean over the micro-batch), divided by
        ``accumulate_steps``; ``loss`` counts towards the window's mean loss with weight
        ``samples`` (default 1).

        Raises:
            RuntimeError: outside :meth:`micro_batch`, or twice in one micro-batch.
        """
        if not self._in_micro:
            raise RuntimeError("backward() outside micro_batch(); call it inside the context")
        if self._backward_done:
            raise RuntimeError("backward() twice in one micro-batch")
        scaled = loss / self.accumulate_steps if self.accumulate_steps > 1 else loss
        self.scaler.scale(scaled).backward()
        weight = 1.0 if samples is None else float(samples)
        weighted = loss.detach().double() * weight
        self._step_loss = weighted if self._step_loss is None else self._step_loss + weighted
        self._step_samples += weight
        self._backward_done = True

    @_names_lost_peers
    def step(self) -> dict[str, Any] | None:
        """The optimizer step and the strategy's communication; at the end of a window, the
        window's close (its loss averaged over all ranks goes to the strategy).

        Returns:
            ``None``, or when this step closed a window, its row: ``window``, ``epoch``,
            ``train_loss`` (mean over ranks, weighted by ``samples``), ``loss_sum`` and
            ``samples`` (summed over ranks), ``cross_node_bytes`` (summed over ranks),
            ``comm_wait_seconds`` (mean over ranks), ``skipped_steps`` and the strategy's
            window metrics (e.g. DASO's ``phase``, ``global_skips``, ``sends``).

        Raises:
            RuntimeError: not all micro-batches of the step are done.
            NumericalError: a NaN/Inf loss or gradient with ``nan_policy: stop``.
        """
        if not self.ready:
            raise RuntimeError(
                f"step() after {self.micro} of {self.accumulate_steps} micro-batches; run "
                "the rest under micro_batch() first"
            )
        where = f"epoch {self.epoch} step {self.step_in_epoch}"
        self.operation = f"{where}: gradient communication ({self.strategy.name})"
        self.strategy.after_backward(self.step_in_window)
        norm = None
        params = list(self.module.parameters())
        if self.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        if self.scaler.is_enabled():  # overflowing fp16 gradients are GradScaler's to skip
            norm = self._step_loss.new_zeros(())
        bad = self.guard.nonfinite(self._step_loss, params, norm)
        skip = self.guard.should_skip(bad, self.epoch, self.step_in_epoch)
        self.guard.sanitize(params)
        if skip:
            self.partial["skipped_steps"] += 1
        else:
            with self.strategy.step_context():
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.partial["loss_sum"] = self._loss_sum() + self._step_loss
            self.partial["samples"] += self._step_samples
        self.operation = f"{where}: cross-node synchronisation ({self.strategy.name})"
        self.strategy.after_step(self.step_in_window)
        self.step_events = self.strategy.drain_events()
        self._last_loss = None if skip else (self._step_loss, self._step_samples)
        self.micro = 0
        closes = self.step_in_window + 1 == self.window_length
        window, epoch = self.window, self.epoch
        self.step_count += 1
        if closes:
            return self._close_window(window, epoch)
        return None

    @_names_lost_peers
    def end_epoch_early(self) -> dict[str, Any]:
        """Close the open window now and move to the next epoch's first step: how the nodes of
        a strategy on its own clock (``async_easgd``, ``downpour``) stop together, each after
        its own number of steps. Collective over all ranks.

        Returns:
            The closed window's row (see :meth:`step`).

        Raises:
            RuntimeError: inside a step.
        """
        if self.micro:
            raise RuntimeError("end_epoch_early() inside a step; call it after step()")
        window, epoch = self.window, self.epoch
        self.step_count = (epoch + 1) * self.steps_per_epoch
        return self._close_window(window, epoch)

    # -- windows -------------------------------------------------------------------------------
    def _loss_sum(self) -> torch.Tensor:
        value = self.partial["loss_sum"]
        if isinstance(value, torch.Tensor):
            return value
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def _begin_step(self) -> None:
        if not self._window_open:
            self.strategy.begin_window(self.window, self.window_length)
            self._window_open = True
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's takes no argument
        self._step_loss, self._step_samples = None, 0.0

    def _fold_strategy_metrics(self) -> dict[str, Any]:
        """Move the strategy's counters so far into :attr:`partial` (they reset on read)."""
        metrics = self.strategy.window_metrics()
        self.partial["cross_node_bytes"] += metrics["cross_node_bytes"]
        self.partial["comm_wait_seconds"] += metrics["comm_wait_seconds"]
        return metrics

    def _close_window(self, window: int, epoch: int) -> dict[str, Any]:
        self.operation = f"window {window}: end-of-window metrics allreduce"
        self.guard.check()
        metrics = self._fold_strategy_metrics()
        part = self.partial
        totals = allreduce_sum(
            [float(part["loss_sum"]), *(part[k] for k in _SUMMED[1:])], self.device
        )
        row: dict[str, Any] = {"window": window, "epoch": epoch}
        # None when every step of the window was skipped: no loss of a skipped step is reported
        # or reaches the strategy's controller
        row["train_loss"] = totals[0] / totals[1] if totals[1] else None
        row["loss_sum"], row["samples"] = totals[0], totals[1]
        row.update(metrics)
        row["cross_node_bytes"] = int(totals[2])
        row["comm_wait_seconds"] = totals[3] / self.topology.world_size
        row["skipped_steps"] = int(totals[4])
        self.partial = _empty_partial()
        self.strategy.end_window(window, row["train_loss"])
        self._window_open = False
        return row

    # -- the rest ------------------------------------------------------------------------------
    def evaluation(self) -> contextlib.AbstractContextManager:
        """Context for validation: the user's module in eval mode, without gradients, with
        the parameters the strategy evaluates (e.g. EASGD's center); back to training mode
        after."""
        return _evaluating(self)

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state (schedule, anchors, outer optimizer, a sync in flight), the
        step counter and this rank's counters of the open window; the caller saves the model,
        the optimizer and any LR scheduler. Call between steps.

        Raises:
            RuntimeError: inside a step (some micro-batches done).
        """
        if self.micro:
            raise RuntimeError("state_dict() inside a step; call it after step()")
        self.guard.check()
        if self.steps_per_epoch is not None and self.step_in_window:
            self._fold_strategy_metrics()
        partial = {k: float(v) for k, v in self.partial.items()}
        return {
            "strategy": self.strategy.state_dict(),
            "step": self.step_count,
            "partial": partial,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (after the model and optimizer are restored)."""
        self.strategy.load_state_dict(state["strategy"])
        self.step_count = int(state["step"])
        self.partial = {**_empty_partial(), **state.get("partial", {})}
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._window_open = False
        self.micro = 0

    def close(self, clean: bool = True) -> None:
        """Stop the strategy's threads and the control plane, restore the signal handlers;
        leave ``torch.distributed`` if this object joined it. A second call does nothing.

        Args:
            clean: ``False`` after a failure: skip everything that waits for other ranks (they
                may be gone); the process should then exit (:func:`daso.run` aborts the job).
        """
        if self._closed:
            return
        self._closed = True
        unregister_open(self)
        if self.control is not None:
            self.control.close(clean)
        if self.signals is not None:
            self.signals.__exit__(None, None, None)
        if not clean:
            return
        self.strategy.close()
        if self.owns_groups:
            shutdown_distributed()


def _check_count(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Distributed: {label} must be an integer >= 1, got {value!r}")


@contextlib.contextmanager
def _evaluating(dist: Distributed) -> Iterator[None]:
    module = unwrap(dist.model)
    module.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(dist.device.type, dtype=dist.amp_dtype, enabled=dist.amp),
            dist.strategy.evaluation(),
        ):
            yield
    finally:
        module.train()
