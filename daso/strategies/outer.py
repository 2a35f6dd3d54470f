"""The outer optimizer of a cross-node model average: DiLoCo's Nesterov step on the anchor.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", arXiv
2311.08105 (section 2, Algorithm 1), and "Streaming DiLoCo", arXiv 2501.18512. Every node
holds the same float32 anchor ``a`` (the model state after the last cross-node sync). When a
sync has formed the mean over nodes ``m``, the pseudo-gradient is ``g = a - m`` and the outer
optimizer takes one step of SGD with Nesterov momentum on ``a``:

    b <- mu * b + g
    a <- a - lr * (g + mu * b)

(PyTorch's SGD with ``nesterov=True``, dampening 0, no weight decay). ``lr = 1, mu = 0`` gives
``a <- m``, the plain average. The inputs are identical on every node, so the new anchor is
too, without any communication.
"""

from __future__ import annotations

from typing import Any

import torch

from daso.errors import ConfigError
from daso.options import DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM, OuterOptimizerOptions

OUTER_OPTIMIZERS = ("none", "nesterov")


class OuterNesterov:
    """SGD with Nesterov momentum on the anchor, driven by the pseudo-gradient ``a - mean``.

    Args:
        numel: elements of the anchor it steps (the parameters; buffers such as BatchNorm
            statistics take the plain mean).
        device: where the momentum buffer lives.
        lr: outer learning rate (DiLoCo: 0.7), > 0.
        momentum: outer Nesterov momentum (DiLoCo: 0.9), in [0, 1).

    Attributes:
        momentum_buffer: float32 ``[numel]``, ``b`` above, zero before the first step.

    Raises:
        ConfigError: ``lr <= 0`` or ``momentum`` outside [0, 1).
    """

    def __init__(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        lr: float = DEFAULT_OUTER_LR,
        momentum: float = DEFAULT_OUTER_MOMENTUM,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ConfigError(
                f"outer optimizer: need outer_lr > 0 and 0 <= outer_momentum < 1 "
                f"(got outer_lr={lr}, outer_momentum={momentum})"
            )
        self.lr = lr
        self.momentum = momentum
        self.momentum_buffer = torch.zeros(numel, dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, anchor: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """One outer step, in place on ``anchor`` (float32 ``[numel]``) from ``mean`` (same).

        Returns:
            ``anchor``, now ``a - lr * (g + mu * b)`` with ``g = a - mean``.
        """
        grad = anchor - mean
        buf = self.momentum_buffer
        buf.mul_(self.momentum).add_(grad)
        return anchor.sub_(grad.add_(buf, alpha=self.momentum), alpha=self.lr)

    def state_dict(self) -> dict[str, Any]:
        """The momentum buffer (on the CPU) and the hyper-parameters it was made with."""
        return {"momentum_buffer": self.momentum_buffer.cpu().clone(), "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.momentum_buffer.copy_(state["momentum_buffer"])


def build_outer_optimizer(
    options: OuterOptimizerOptions, numel: int, device: torch.device | str
) -> OuterNesterov | None:
    """``None`` for ``options.outer_optimizer == "none"`` (the plain average), an
    :class:`OuterNesterov` with ``options.outer_lr`` and ``options.outer_momentum`` over
    ``numel`` float32 elements for ``"nesterov"``.

    Raises:
        ConfigError: an unknown ``name``, or bad ``lr``/``momentum``.
    """
    name = options.outer_optimizer
    if name not in OUTER_OPTIMIZERS:
        raise ConfigError(
            f"outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got {name!r}"
        )
    if name == "none":
        return None
    return OuterNesterov(numel, device, options.outer_lr, options.outer_momentum)
