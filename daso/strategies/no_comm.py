"""``no_comm``: every rank trains alone on its shard; no communication at all.

Not a way to train: the physical bound of the comparison benchmark. Its epoch time is what any
strategy would take if communication were free, so every strategy's time is reported as a ratio
to it. Ranks end with different models; validation averages each rank's accuracy on its shard.
"""

from __future__ import annotations

import torch

from daso.strategies.base import Strategy


class NoCommStrategy(Strategy):
    """Independent training on every rank (the no-communication bound)."""

    name = "no_comm"
    summary = "No communication (benchmark bound; ranks diverge)."

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.model, self.optimizer = model, optimizer
        return model

    def window_metrics(self) -> dict[str, float]:
        return {
            "cross_node_bytes": 0,
            "comm_wait_seconds": 0.0,
        }
