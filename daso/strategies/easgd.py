"""``easgd`` and ``eamsgd``: synchronous Elastic Averaging SGD across nodes.

Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NIPS 2015, arXiv
1412.6651. The p workers of the paper are the nodes (inside a node, DDP averages gradients
every step as in every strategy here). Every ``tau`` steps each worker ``i`` and the center
variable ``x~`` move towards each other, both from the same pre-update values (eqs. 3-6 with
the elastic force ``alpha (x^i - x~)``, ``alpha = eta * rho``):

    x^i <- x^i - alpha (x^i - x~)
    x~  <- x~  + alpha * sum_i (x^i - x~)

There is no parameter server: every rank keeps a copy of ``x~`` and the sum is one cross-node
allreduce of the elastic differences (sharded over the node's cross-node groups), so the
centers stay identical; every ``center_resync_period`` elastic steps the center is re-broadcast
from rank 0 to remove floating-point drift. ``beta = p * alpha`` defaults to 0.9 (the paper's
choice), i.e. ``alpha = 0.9 / p``, unless ``moving_rate`` gives ``alpha``.

``eamsgd`` is the momentum variant (Algorithm 2): the local step uses Nesterov momentum
``delta`` (default 0.99, as in the paper). As in Algorithm 2 (and the authors'
``optim-eamsgd.lua``), the elastic exchange comes first, before the gradient is taken, and
the elastic difference is formed at the worker's point ``x``, not at the look-ahead point:
PyTorch's ``nesterov=True`` keeps the look-ahead ``x + delta v`` in the parameters, so ``x``
is recovered as ``p + lr * delta * b`` from its momentum buffer ``b`` (:func:`nesterov_point`).

Validation evaluates the center ``x~`` (the paper's choice) unless ``evaluate: worker``.
BatchNorm statistics (floating-point buffers) are treated like parameters: the elastic rule
moves them and the center holds elastic averages of them, which validation of the center uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from daso.comm import (
    WIRE_DTYPES,
    CrossNodeSum,
    FlatBuffer,
    broadcast,
    broadcast_tensors,
)
from daso.options import StrategyOptions, WireDtype
from daso.strategies.averaging import shard_sum_link, sum_shards_over_nodes
from daso.strategies.base import EpochCounters, Strategy
from daso.topology import ProcessGroups


def nesterov_point(state: FlatBuffer, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The worker's point ``x`` of Nesterov momentum (Sutskever's form), float32 ``[P]``.

    PyTorch's SGD with ``nesterov=True`` (dampening 0) stores the look-ahead point: its
    parameter ``p`` is Sutskever's ``x + delta v``, with velocity ``v = -lr * b`` for its
    momentum buffer ``b`` (EASGD paper, Algorithm 2, ``x_a = x + delta v``; Sutskever et al.
    2013, eq. 3-4). So ``x = p + lr * delta * b``, exactly while the learning rate is constant
    (under an LR schedule ``v`` mixes past rates and this uses the current one). Tensors without
    a momentum buffer (buffers, a first step, plain SGD) give ``p`` itself.

    Args:
        state: the flat mirror of the worker's parameters and buffers.
        optimizer: the worker's optimizer (SGD).

    Returns:
        A new float32 ``[P]`` tensor in ``state``'s layout.
    """
    point = state.pack().clone()
    rates = {
        id(param): group["lr"] * group["momentum"]
        for group in optimizer.param_groups
        if group.get("nesterov") and group.get("momentum", 0) > 0
        for param in group["params"]
    }
    views = point.split([t.numel() for t in state.tensors])
    for view, tensor in zip(views, state.tensors):
        buf = (
            optimizer.state.get(tensor, {}).get("momentum_buffer") if id(tensor) in rates else None
        )
        if buf is not None:
            view.add_(buf.reshape(-1), alpha=rates[id(tensor)])
    return point


def elastic_difference(local: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``x^i - x~`` from the pre-step values (float32 ``[P]`` each); a new tensor."""
    return local - center


def apply_elastic(
    local: torch.Tensor,
    center: torch.Tensor,
    difference: torch.Tensor,
    difference_sum: torch.Tensor,
    alpha: float,
) -> None:
    """The elastic part of one synchronous EASGD step, in place (paper, eqs. 5-6).

    With ``local`` already moved by the optimizer (``x^i_t - eta g``), this completes

        x^i_{t+1} = x^i_t - eta g - alpha (x^i_t - x~_t)
        x~_{t+1}  = x~_t + alpha * sum_i (x^i_t - x~_t)

    Args:
        local: float32 ``[P]``, the worker's parameters after its optimizer step.
        center: float32 ``[P]``, the center ``x~_t``.
        difference: float32 ``[P]``, this worker's ``x^i_t - x~_t`` (pre-step).
        difference_sum: float32 ``[P]``, the same summed over all p workers.
        alpha: the moving rate ``eta * rho``.
    """
    local.sub_(difference, alpha=alpha)
    center.add_(difference_sum, alpha=alpha)


@contextlib.contextmanager
def swapped_in(state: FlatBuffer, center: torch.Tensor) -> Iterator[None]:
    """Context in which the model holds ``center`` (float32 ``[P]``, the layout of ``state``)
    instead of its own parameters and floating-point buffers, restored bit for bit after.

    Validation of a center variable (the paper evaluates ``x~``): BatchNorm statistics are part
    of ``state``, so the center's own elastic averages of them are used."""
    worker = state.pack().clone()
    state.unpack(center)
    try:
        yield
    finally:
        state.unpack(worker)


class EASGDOptions(StrategyOptions):
    period: int = Field(1, ge=1, description="tau: steps between elastic exchanges.")
    moving_rate: float | None = Field(
        None, gt=0, lt=1, description="alpha; empty = 0.9 / number of nodes (beta = 0.9)."
    )
    center_resync_period: int = Field(
        100, ge=1, description="Elastic steps between center re-broadcasts (float drift)."
    )
    evaluate: Literal["center", "worker"] = Field(
        "center", description="Validate the center x~ or this worker's x^i."
    )
    wire_dtype: WireDtype = Field("float32", description="Wire dtype of elastic differences.")


class EAMSGDOptions(EASGDOptions):
    momentum: float = Field(0.99, ge=0, lt=1, description="delta: Nesterov momentum.")


class EASGDStrategy(Strategy):
    """Synchronous EASGD across nodes (see the module docstring).

    Options (:class:`EASGDOptions`):
        period: tau, steps between elastic exchanges, >= 1.
        moving_rate: alpha; default ``beta / p`` with ``beta = 0.9``.
        center_resync_period: elastic steps between re-broadcasts of the center from rank 0.
        evaluate: ``"center"`` (default) or ``"worker"``: which parameters validation sees.
        wire_dtype: dtype of the elastic differences on the MPI wire.

    Raises:
        ConfigError: an option out of range.
    """

    name = "easgd"
    summary = "Synchronous EASGD (Zhang et al. 2015)."
    Options = EASGDOptions
    #: Nesterov momentum forced on the optimizer (``eamsgd``); ``None`` leaves it alone.
    momentum: float | None = None

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        opts = self.options
        moving_rate = opts.moving_rate
        self.period = opts.period
        self.alpha = 0.9 / self.topology.num_nodes if moving_rate is None else moving_rate
        self.center_resync_period = opts.center_resync_period
        self.evaluate = opts.evaluate
        self.wire_dtype = WIRE_DTYPES[opts.wire_dtype]
        self.step = self.elastic_steps = 0
        self.difference = self.difference_sum = None
        self.counters = EpochCounters()
        self.cross: CrossNodeSum | None = None

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        if self.momentum is not None:
            for group in optimizer.param_groups:
                group.update(momentum=self.momentum, nesterov=True, dampening=0)
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        tensors = [p for p in model.parameters()] + [
            b for b in model.buffers() if b.is_floating_point()
        ]
        self.state = FlatBuffer(tensors, device=self.groups.device)
        self.center = self.state.pack().clone()  # x~ starts at the (broadcast) initial model
        self.cross = shard_sum_link(self.groups, self.state.numel, self.wire_dtype, self.timeout)
        return self.model

    def is_elastic_step(self) -> bool:
        """Whether the step about to run (1-based ``step + 1``) exchanges with the center."""
        return (self.step + 1) % self.period == 0

    def _exchange(self, point: torch.Tensor) -> None:
        """Keep ``x^i - x~`` (from ``point``, float32 ``[P]``) and its sum over the nodes (local
        rank i sums shard i over C_i, then shares it in the node)."""
        self.difference = elastic_difference(point, self.center)
        self.difference_sum = sum_shards_over_nodes(
            self.difference.clone(), self.groups, self.cross, tag=f"EASGD step {self.step + 1}"
        )

    def _apply_exchange(self) -> None:
        """The elastic moves of the kept exchange, on the model and on the center."""
        local = self.state.pack()
        apply_elastic(local, self.center, self.difference, self.difference_sum, self.alpha)
        self.state.unpack()
        self.difference = self.difference_sum = None
        self.elastic_steps += 1
        if self.elastic_steps % self.center_resync_period == 0:
            broadcast(self.center, 0)

    def after_backward(self, batch: int) -> None:
        """On an elastic step, take ``x^i - x~`` before the optimizer moves ``x^i`` (eqs. 5-6:
        gradient and elastic force from the same ``x^i_t``) and sum it over the nodes."""
        if self.is_elastic_step():
            self._exchange(self.state.pack())

    def after_step(self, batch: int) -> None:
        self.step += 1
        if self.difference is not None:
            self._apply_exchange()

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Swap the center in for validation (``evaluate: center``), the worker back after."""
        if self.evaluate == "worker":
            return contextlib.nullcontext()
        return swapped_in(self.state, self.center)

    def window_metrics(self) -> dict[str, float]:
        totals = (self.cross.bytes_sent, self.cross.wait_seconds) if self.cross else (0, 0.0)
        return {
            "period": self.period,
            "exchanges": self.elastic_steps,  # elastic exchanges so far in the run
            **self.counters.since_last(*totals),
        }

    def end_window(self, epoch: int, loss: float) -> None:
        broadcast_tensors([self.center], src=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elastic_steps": self.elastic_steps,
            "center": self.center.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elastic_steps = int(state["step"]), int(state["elastic_steps"])
        self.center.copy_(state["center"])

    def close(self) -> None:
        if self.cross is not None:
            self.cross.close()


class EAMSGDStrategy(EASGDStrategy):
    """EAMSGD: EASGD with Nesterov momentum ``delta`` on the local step (Algorithm 2).

    Options (:class:`EAMSGDOptions`):
        momentum: delta, Nesterov momentum set on every optimizer parameter group
            (default 0.99, as in the paper); the others as :class:`EASGDStrategy`.
    """

    name = "eamsgd"
    summary = "EASGD with Nesterov momentum."
    Options = EAMSGDOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.momentum = self.options.momentum

    def sync_context(self, batch: int) -> contextlib.AbstractContextManager:
        """Algorithm 2's order: on an elastic step the exchange happens here, before the
        forward pass, with the difference formed at ``x`` (:func:`nesterov_point`); both
        elastic moves are applied at once, so the gradient is taken at the moved look-ahead
        point."""
        if self.is_elastic_step():
            self._exchange(nesterov_point(self.state, self.optimizer))
            self._apply_exchange()
        return contextlib.nullcontext()

    def after_backward(self, batch: int) -> None:
        """Nothing: the exchange ran before the forward pass (:meth:`sync_context`)."""
