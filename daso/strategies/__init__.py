"""Training strategies, one module each, all behind :class:`~daso.strategies.base.Strategy`.

Every module of this package is imported here, and every :class:`Strategy` subclass with a
``name`` registers itself (:data:`STRATEGIES`): a new strategy is one new module (its class and
its options model) plus an example config; nothing else lists it.

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
passm         the ranks of a node share one model in shared memory; each    Kungurtsev et al.
              steps its own block of the parameters, lock-free; the nodes'  2021
              copies are averaged every ``period`` steps
============  ===========================================================  ==================
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from daso.strategies.averaging import merge_stale
from daso.strategies.base import REGISTRY, Strategy
from daso.topology import ProcessGroups

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from daso.strategies.async_easgd import AsyncEASGDStrategy  # noqa: E402
from daso.strategies.daso import DASOStrategy  # noqa: E402
from daso.strategies.ddp import DDPStrategy  # noqa: E402
from daso.strategies.downpour import DownpourStrategy  # noqa: E402
from daso.strategies.easgd import EAMSGDStrategy, EASGDStrategy  # noqa: E402
from daso.strategies.hierarchical import HierarchicalStrategy  # noqa: E402
from daso.strategies.horovod import HorovodStrategy  # noqa: E402
from daso.strategies.local_sgd import LocalSGDStrategy  # noqa: E402
from daso.strategies.no_comm import NoCommStrategy  # noqa: E402

#: The registered strategies by name: ``daso`` first (the default), then alphabetical.
STRATEGIES: dict[str, type[Strategy]] = {"daso": REGISTRY["daso"]} | dict(sorted(REGISTRY.items()))


def build_strategy(
    name: str,
    groups: ProcessGroups,
    epochs: int | None,
    options: Mapping[str, Any] | None = None,
    timeout_seconds: float = 300.0,
) -> Strategy:
    """Instantiate strategy ``name`` with its ``options`` (its config section's keys).

    Args:
        epochs: windows of the run (epochs unless ``window_steps`` cuts them smaller), or
            ``None`` until :meth:`~daso.strategies.base.Strategy.set_run_length` says.
        timeout_seconds: the strategy's longest wait for a cross-node message.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
        ConfigError: an unknown option or an out-of-range value.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](groups, epochs, timeout_seconds=timeout_seconds, **dict(options or {}))


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
