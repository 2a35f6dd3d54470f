"""The interface every training strategy implements.

The loop belongs to :class:`daso.Distributed` (the step-level API, which :class:`daso.Trainer`
drives); a strategy only answers a few calls. A run is cut into *windows* of optimizer steps
(one epoch each by default, ``window_steps`` otherwise), and per window::

    model = strategy.wrap(model, optimizer)          # once, before the first window
    strategy.begin_window(window, num_steps)
    for step in range(num_steps):
        with strategy.sync_context(step):            # node-local gradient averaging on/off
            forward, backward                        # (the last micro-batch of the step)
        strategy.after_backward(step)                # gradient communication beyond DDP
        with strategy.step_context():
            strategy.optimizer.step()
        strategy.after_step(step)                    # cross-node communication
    metrics = strategy.window_metrics()              # knobs and counters of the window
    strategy.end_window(window, global_mean_loss)    # controller input

Whether a window ends with one model everywhere is the strategy's: DASO and the synchronous
ones do; elastic and local-SGD strategies keep one model per node (and a center or anchor);
strategies whose nodes run on their own clocks say so in :attr:`Strategy.lockstep`.

A new strategy is one module in :mod:`daso.strategies` with one subclass of :class:`Strategy`
that sets :attr:`Strategy.name`, :attr:`Strategy.summary` and :attr:`Strategy.Options` (a
:class:`~daso.options.StrategyOptions` model of its options, with defaults and help text):
defining the class registers it, and the ``strategy`` config section, the CLI and the README's
config table are built from the registry.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, ClassVar

import torch
from pydantic import ValidationError

from daso.comm import wrap_data_parallel
from daso.errors import ConfigError
from daso.options import StrategyOptions
from daso.topology import ProcessGroups

#: Every strategy class defined so far, by :attr:`Strategy.name` (filled by subclassing).
REGISTRY: dict[str, type[Strategy]] = {}


def parse_options(cls: type[Strategy], options: dict[str, Any]) -> StrategyOptions:
    """``options`` validated by ``cls.Options``.

    Raises:
        ConfigError: an unknown option or a value out of range (one line: option, problem).
    """
    try:
        return cls.Options.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise ConfigError(
            f"strategy {cls.name!r}: option {where}: {first['msg']} (got {first.get('input')!r})"
        ) from None


def synchronous_metrics(cross_node_bytes: int, comm_wait_seconds: float = 0.0) -> dict[str, float]:
    """Window metrics of a strategy that averages gradients over all ranks every step: its
    bytes and wait only (it has no schedule to report)."""
    return {
        "cross_node_bytes": cross_node_bytes,
        "comm_wait_seconds": comm_wait_seconds,
    }


class EpochCounters:
    """Turns running totals (bytes sent, seconds waited) into per-epoch amounts."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.wait_seconds = 0.0

    def since_last(self, bytes_sent: int, wait_seconds: float) -> dict[str, float]:
        """``cross_node_bytes`` and ``comm_wait_seconds`` since the previous call."""
        delta = {
            "cross_node_bytes": bytes_sent - self.bytes_sent,
            "comm_wait_seconds": wait_seconds - self.wait_seconds,
        }
        self.bytes_sent, self.wait_seconds = bytes_sent, wait_seconds
        return delta


class Strategy(abc.ABC):
    """Base class of the training strategies.

    Args:
        groups: this rank's :class:`~daso.topology.ProcessGroups`.
        epochs: total windows of the run (strategies with a schedule need it): epochs by
            default, or the windows of ``window_steps`` steps the run is cut into.
        timeout_seconds: longest wait for a cross-node collective before
            :class:`~daso.errors.CommTimeoutError`.
        **options: the strategy's options, validated by :attr:`Options` (its defaults fill
            the rest).

    Raises:
        ConfigError: an unknown option or an out-of-range value.

    Attributes:
        options: the validated :attr:`Options` instance.
        model: the wrapped model (after :meth:`wrap`).
        optimizer: the user's optimizer (after :meth:`wrap`).
        deterministic: set before :meth:`wrap` for bitwise-reproducible steps (fixed DDP
            gradient buckets); ``trainer.deterministic`` in the config.
    """

    name: ClassVar[str] = ""
    #: One line for the config reference: what the strategy does, and its source.
    summary: ClassVar[str] = ""
    #: The typed options of the strategy (its ``strategy`` config section sans ``name``).
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: ``False`` for strategies whose nodes run on their own clocks (``async_easgd``,
    #: ``downpour``): the trainer then puts no per-batch collective across nodes (its stop vote
    #: goes through the rendezvous store) and checkpoints only at epoch ends.
    lockstep: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(
        self,
        groups: ProcessGroups,
        epochs: int | None,
        timeout_seconds: float = 300.0,
        **options: Any,
    ) -> None:
        self.options = parse_options(type(self), options)
        self.groups = groups
        self.timeout = timeout_seconds
        self.topology = groups.topology
        self.epochs = epochs  # windows of the run
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.window_length = 0
        self.deterministic = False
        self.accumulate_steps = 1  # micro-batches per step (set before wrap)
        self.events: list[dict[str, Any]] = []  # this step's sync events (see record_event)

    def record_event(self, event: str, **fields: Any) -> None:
        """Note a sync event of this step for the step logs, e.g. DASO's ``send`` (``bytes``)
        and ``merge`` (``staleness`` in steps, ``wait_seconds``); :class:`daso.Distributed`
        collects them after every step (:meth:`drain_events`)."""
        self.events.append({"event": event, **fields})

    def drain_events(self) -> list[dict[str, Any]]:
        """The events recorded since the last call (then forgotten)."""
        events, self.events = self.events, []
        return events

    def set_run_length(self, windows: int) -> None:
        """The run's number of windows, once known (before the first step).

        Raises:
            ConfigError: the strategy's schedule does not fit into ``windows``.
        """
        self.epochs = windows

    def wrap_in_node(
        self, model: torch.nn.Module, comm_hook: Any = None, bucket_cap_mb: float | None = None
    ) -> torch.nn.Module:
        """``model`` under DDP over this rank's node group (gradients averaged inside the node
        every step), honouring :attr:`deterministic`; ``model`` itself on a node of one rank
        unless ``comm_hook`` (a DDP communication hook replacing the bucket allreduce, e.g.
        :meth:`~daso.strategies.overlap.OverlappedGradientSum.hook`) is given."""
        return wrap_data_parallel(
            model,
            self.groups.node_group,
            self.topology.local_world_size,
            self.groups.device,
            fixed_buckets=self.deterministic,
            comm_hook=comm_hook,
            bucket_cap_mb=bucket_cap_mb,
        )

    @abc.abstractmethod
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """Return the module to run forward/backward on (e.g. a DDP wrapper of ``model``).

        ``model`` is already on the device and identical on all ranks; it must not be
        re-initialised. Sets :attr:`optimizer`, the optimizer the trainer steps (``optimizer``
        itself, or a wrapper of it).
        """

    def begin_window(self, window: int, num_steps: int) -> None:
        """Called before the first step of ``window`` (0-based over the run); ``num_steps``
        (its length in optimizer steps) is equal on all ranks."""
        self.window_length = num_steps

    def sync_context(self, batch: int) -> contextlib.AbstractContextManager:
        """Context for forward+backward of step ``batch`` (0-based in its window; with gradient
        accumulation, of its last micro-batch): decides node-local gradient averaging."""
        return contextlib.nullcontext()

    def after_backward(self, batch: int) -> None:
        """Called on every rank after ``backward()`` and before gradient clipping and
        ``optimizer.step()`` of ``batch``: the place for gradient communication."""

    def step_context(self) -> contextlib.AbstractContextManager:
        """Context around ``optimizer.step()`` (e.g. to skip a sync already done)."""
        return contextlib.nullcontext()

    def after_step(self, batch: int) -> None:
        """Called on every rank after ``optimizer.step()`` of step ``batch`` (0-based in its
        window)."""

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Context around validation (e.g. to evaluate a center variable instead)."""
        return contextlib.nullcontext()

    def window_metrics(self) -> dict[str, float]:
        """Numbers of the window just run, then reset: at least ``cross_node_bytes`` (this rank's
        bytes handed to cross-node collectives) and ``comm_wait_seconds``; schedule knobs where
        the strategy has them."""
        return {"cross_node_bytes": 0, "comm_wait_seconds": 0.0}

    def end_window(self, window: int, loss: float | None) -> None:
        """Called after ``window`` with its training loss averaged over all ranks (``None``
        when every step of the window was skipped as non-finite)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the strategy keeps that a resumed run needs (no pending requests)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""

    def close(self) -> None:
        """Release threads and buffers."""
