"""Training strategies, one module each, all behind :class:`~daso.strategies.base.Strategy`.

============  ===========================================================  ==================
name          what it does                                                 source
============  ===========================================================  ==================
ddp           gradient allreduce over all ranks every step (PyTorch DDP)   usual baseline
hierarchical  node-local reduce, sharded cross-node allreduce, node-local  Horovod's
              allgather of the gradient, every step                        hierarchical mode
local_sgd     node-local SGD, blocking cross-node model average every      Lin et al. 2020
              ``period`` steps
daso          node-local gradient averaging, non-blocking selective        Coquelin et al.
              cross-node parameter averaging at an adaptive rate           2022
horovod       horovod.torch.DistributedOptimizer, allreduce every step     Sergeev & Del
                                                                           Balso 2018
no_comm       no communication: the benchmark's physical bound             -
easgd         synchronous elastic averaging of nodes with a center          Zhang et al. 2015
eamsgd        easgd with Nesterov momentum on the local step                Zhang et al. 2015
async_easgd   asynchronous EASGD: each node exchanges with a center held    Zhang et al. 2015
              by sharded parameter-server threads on its own clock          Algorithm 1
downpour      each node pushes its accumulated update to the sharded        Dean et al. 2012
              center and pulls it back, on its own clock
============  ===========================================================  ==================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from daso.strategies.async_easgd import AsyncEASGDStrategy
from daso.strategies.averaging import merge_stale
from daso.strategies.base import Strategy
from daso.strategies.daso import DASOStrategy
from daso.strategies.ddp import DDPStrategy
from daso.strategies.downpour import DownpourStrategy
from daso.strategies.easgd import EAMSGDStrategy, EASGDStrategy
from daso.strategies.hierarchical import HierarchicalStrategy
from daso.strategies.horovod import HorovodStrategy
from daso.strategies.local_sgd import LocalSGDStrategy
from daso.strategies.no_comm import NoCommStrategy
from daso.topology import ProcessGroups

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        DDPStrategy,
        HierarchicalStrategy,
        LocalSGDStrategy,
        DASOStrategy,
        HorovodStrategy,
        NoCommStrategy,
        EASGDStrategy,
        EAMSGDStrategy,
        AsyncEASGDStrategy,
        DownpourStrategy,
    )
}


def build_strategy(
    name: str, groups: ProcessGroups, epochs: int, options: Mapping[str, Any] | None = None
) -> Strategy:
    """Instantiate strategy ``name`` with its keyword ``options`` (its config section's keys).

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](groups, epochs, **dict(options or {}))


__all__ = [
    "STRATEGIES",
    "AsyncEASGDStrategy",
    "DASOStrategy",
    "DDPStrategy",
    "DownpourStrategy",
    "EAMSGDStrategy",
    "EASGDStrategy",
    "HierarchicalStrategy",
    "HorovodStrategy",
    "LocalSGDStrategy",
    "NoCommStrategy",
    "Strategy",
    "build_strategy",
    "merge_stale",
]
