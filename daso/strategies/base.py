"""The interface every training strategy implements.

The trainer owns the loop; a strategy only answers a few calls, in this order per epoch::

    model = strategy.wrap(model, optimizer)          # once, before the first epoch
    strategy.begin_epoch(epoch, num_batches)
    for batch in range(num_batches):
        with strategy.sync_context(batch):           # node-local gradient averaging on/off
            forward, backward
        strategy.after_backward(batch)               # gradient communication beyond DDP
        with strategy.step_context():
            strategy.optimizer.step()
        strategy.after_step(batch)                   # cross-node communication
    metrics = strategy.epoch_metrics()               # knobs and counters of the epoch
    strategy.end_epoch(epoch, global_mean_loss)      # controller input

A new strategy is one module with one subclass of :class:`Strategy`, registered in
:mod:`daso.strategies`.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, ClassVar

import torch

from daso.comm import wrap_data_parallel
from daso.topology import ProcessGroups


def synchronous_metrics(cross_node_bytes: int, comm_wait_seconds: float = 0.0) -> dict[str, float]:
    """Epoch metrics of a strategy that syncs every batch, in DASO's terms: ``global_skips``
    0 (blocking every batch), ``local_skips`` 1, ``batches_to_wait`` 0."""
    return {
        "global_skips": 0,
        "local_skips": 1,
        "batches_to_wait": 0,
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
        epochs: total epochs of the run (strategies with a schedule need it).
        timeout_seconds: longest wait for a cross-node collective before
            :class:`~daso.errors.CommTimeoutError`.

    Attributes:
        model: the wrapped model (after :meth:`wrap`).
        optimizer: the user's optimizer (after :meth:`wrap`).
        deterministic: set before :meth:`wrap` for bitwise-reproducible steps (fixed DDP
            gradient buckets); ``trainer.deterministic`` in the config.
    """

    name: ClassVar[str] = ""
    #: ``False`` for strategies whose nodes run on their own clocks (``async_easgd``,
    #: ``downpour``): the trainer then puts no per-batch collective across nodes (its stop vote
    #: goes through the rendezvous store) and checkpoints only at epoch ends.
    lockstep: ClassVar[bool] = True

    def __init__(self, groups: ProcessGroups, epochs: int, timeout_seconds: float = 300.0) -> None:
        self.groups = groups
        self.timeout = timeout_seconds
        self.topology = groups.topology
        self.epochs = epochs
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.num_batches = 0
        self.deterministic = False

    def wrap_in_node(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` under DDP over this rank's node group (gradients averaged inside the node
        every step), honouring :attr:`deterministic`; ``model`` itself on a node of one rank."""
        return wrap_data_parallel(
            model,
            self.groups.node_group,
            self.topology.local_world_size,
            self.groups.device,
            fixed_buckets=self.deterministic,
        )

    @abc.abstractmethod
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """Return the module to run forward/backward on (e.g. a DDP wrapper of ``model``).

        ``model`` is already on the device and identical on all ranks; it must not be
        re-initialised. Sets :attr:`optimizer`, the optimizer the trainer steps (``optimizer``
        itself, or a wrapper of it).
        """

    def begin_epoch(self, epoch: int, num_batches: int) -> None:
        """Called before the first batch of ``epoch``; ``num_batches`` is equal on all ranks."""
        self.num_batches = num_batches

    def sync_context(self, batch: int) -> contextlib.AbstractContextManager:
        """Context for forward+backward of ``batch``: decides node-local gradient averaging."""
        return contextlib.nullcontext()

    def after_backward(self, batch: int) -> None:
        """Called on every rank after ``backward()`` and before gradient clipping and
        ``optimizer.step()`` of ``batch``: the place for gradient communication."""

    def step_context(self) -> contextlib.AbstractContextManager:
        """Context around ``optimizer.step()`` (e.g. to skip a sync already done)."""
        return contextlib.nullcontext()

    def after_step(self, batch: int) -> None:
        """Called on every rank after ``optimizer.step()`` of ``batch`` (0-based in its epoch)."""

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Context around validation (e.g. to evaluate a center variable instead)."""
        return contextlib.nullcontext()

    def epoch_metrics(self) -> dict[str, float]:
        """Numbers of the epoch just run, then reset: at least ``cross_node_bytes`` (this rank's
        bytes handed to cross-node collectives) and ``comm_wait_seconds``; schedule knobs where
        the strategy has them."""
        return {"cross_node_bytes": 0, "comm_wait_seconds": 0.0}

    def end_epoch(self, epoch: int, loss: float) -> None:
        """Called after ``epoch`` with the training loss averaged over all ranks."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the strategy keeps that a resumed run needs (no pending requests)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""

    def close(self) -> None:
        """Release threads and buffers."""
