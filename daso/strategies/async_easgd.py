"""``async_easgd``: asynchronous Elastic Averaging SGD with the center on parameter servers.

Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NIPS 2015, arXiv
1412.6651, Algorithm 1 (asynchronous EASGD, processing by worker i and the master). The p
workers are the nodes; the center variable ``x~`` lives on p parameter-server threads, one shard
per node (:mod:`daso.strategies.center_server`). Each worker, on its own clock ``t^i``, every
tau of its steps (``period``; here after its steps tau, 2 tau, ...) does, with ``x = x^i``
before the step and the gradient taken at ``x``:

    a) x^i <- x^i - alpha (x - x~)          (the elastic difference pulls the worker)
    b) x~  <- x~  + alpha (x - x~)          (the server moves the center, same x~)
       x^i <- x^i - eta g^i(x)              (the local optimizer step)

Steps a and b use the same ``x~``: the worker sends ``x`` to every server; each server answers
with its shard of ``x~`` and applies b) to it before serving anyone else (an atomic pull and
push, one round trip of ``P`` floats each way). The worker forms the elastic difference
``x - x~`` and, after the optimizer's step, subtracts ``alpha`` times it. Workers never wait
for each other: only for the servers, which answer while their own workers compute.

``moving_rate`` alpha defaults to ``beta / p`` with ``beta = 0.9`` (the paper's choice). With
``momentum`` set, the optimizer's step is Nesterov momentum ``delta`` (asynchronous EAMSGD,
Algorithm 2), and the worker sends its point ``x``, recovered from PyTorch's look-ahead
parameters as ``p + lr * delta * b`` (:func:`~daso.strategies.easgd.nesterov_point`), not the
look-ahead itself. Validation evaluates the center unless ``evaluate: worker``; BatchNorm statistics
follow the elastic rule like parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from daso.comm.param_server import Op
from daso.strategies.center_server import CenterServerOptions, CenterServerStrategy
from daso.strategies.easgd import nesterov_point
from daso.topology import ProcessGroups


class AsyncEASGDOptions(CenterServerOptions):
    moving_rate: float | None = Field(
        None, gt=0, lt=1, description="alpha; empty = 0.9 / number of nodes (beta = 0.9)."
    )
    momentum: float | None = Field(
        None, ge=0, lt=1, description="delta: Nesterov momentum (async EAMSGD); empty = optim's."
    )


class AsyncEASGDStrategy(CenterServerStrategy):
    """Asynchronous EASGD (Algorithm 1), optionally EAMSGD (Algorithm 2); see the module doc.

    Options (:class:`AsyncEASGDOptions`):
        period: tau, steps of a node between its elastic exchanges, >= 1.
        moving_rate: alpha, in (0, 1); default ``0.9 / p`` (beta = 0.9).
        momentum: delta, Nesterov momentum set on the optimizer (EAMSGD), or ``None`` to
            leave the optimizer as configured.
        evaluate: ``"center"`` (default) or ``"worker"``.

    Raises:
        ConfigError: out-of-range ``period``, ``moving_rate``, ``momentum`` or ``evaluate``.
    """

    name = "async_easgd"
    summary = (
        "Asynchronous EASGD (Zhang et al. 2015, Algorithm 1): center on sharded parameter "
        "servers, one per node."
    )
    Options = AsyncEASGDOptions

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        alpha, momentum = self.options.moving_rate, self.options.momentum
        self.moving_rate = 0.9 / self.topology.num_nodes if alpha is None else alpha
        self.momentum = momentum
        self.difference: torch.Tensor | None = None

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        if self.momentum is not None:
            for group in optimizer.param_groups:
                group.update(momentum=self.momentum, nesterov=True, dampening=0)
        return super().wrap(model, optimizer)

    def after_backward(self, batch: int) -> None:
        """On an exchange step: send ``x`` (pre-step), get ``x~``, keep ``x - x~`` (float32
        ``[P]``) for :meth:`after_step`; the servers have already applied step b)."""
        if not self.is_exchange_step():
            return
        x = nesterov_point(self.state, self.optimizer)  # p itself without Nesterov momentum
        self.difference = x - self.exchange(Op.ELASTIC, x)

    def after_step(self, batch: int) -> None:
        """Advance the clock; on an exchange step apply a): ``x^i -= alpha (x - x~)``."""
        self.step += 1
        if self.difference is None:
            return
        self.state.pack().sub_(self.difference, alpha=self.moving_rate)
        self.state.unpack()
        self.difference = None
