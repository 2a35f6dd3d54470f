"""``downpour``: DOWNPOUR SGD, the asynchronous parameter-server baseline of the EASGD paper.

Dean et al., "Large scale distributed deep networks", NIPS 2012, as used for comparison by
Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NIPS 2015, arXiv
1412.6651, section 6 (DOWNPOUR with communication period tau). The p workers are the nodes; the
center ``x~`` lives on p parameter-server threads, one shard per node
(:mod:`daso.strategies.center_server`). Each worker, on its own clock, every tau of its steps
(``period``):

    delta <- x^i - x^i_last      (its accumulated update since the last pull)
    x~    <- x~ + delta          (push: the server adds it)
    x^i   <- x~                  (pull: the new center replaces the worker's parameters)
    x^i_last <- x^i

Push and pull are one round trip per server (the server adds, then answers with its shard of
the new center). With ``period = 1`` this is asynchronous SGD on a parameter server. Workers
never wait for each other. The local optimizer (with its momentum) runs between exchanges as
configured. BatchNorm statistics are pushed and pulled like parameters. Validation evaluates
the center unless ``evaluate: worker`` (after the exchange at an epoch's last step they differ
only by the updates other nodes pushed since).
"""

from __future__ import annotations

from typing import Any

import torch

from daso.comm.param_server import Op
from daso.strategies.center_server import CenterServerStrategy


class DownpourStrategy(CenterServerStrategy):
    """DOWNPOUR: push accumulated updates, pull the center, every ``period`` steps.

    Options: ``period`` and ``evaluate``, as
    :class:`~daso.strategies.center_server.CenterServerStrategy`.

    Attributes:
        reference: float32 ``[P]``, ``x^i_last``: the parameters at the last pull.
    """

    name = "downpour"
    summary = (
        "DOWNPOUR (Dean et al. 2012): push accumulated updates to sharded parameter servers, "
        "pull the center."
    )

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        wrapped = super().wrap(model, optimizer)
        self.reference = self.state.pack().clone()  # x^i_last = x~ = the initial model
        return wrapped

    def after_step(self, batch: int) -> None:
        """Advance the clock; at the end of a period push ``x^i - x^i_last`` and pull ``x~``."""
        self.step += 1
        if self.step % self.period != 0:
            return
        delta = self.state.pack() - self.reference
        self.state.unpack(self.exchange(Op.ADD, delta))
        self.reference.copy_(self.state.flat)

    def state_dict(self) -> dict[str, Any]:
        """As the base class, plus ``reference`` (float32 ``[P]``, CPU)."""
        return {**super().state_dict(), "reference": self.reference.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reference.copy_(state["reference"])
