"""daso: hierarchical data-parallel training of PyTorch models (DASO and its baselines).

Public entry points (imported lazily, so ``import daso`` does not start MPI)::

    daso.load_config(path, overrides)   # typed, validated config
    daso.Trainer(model, optimizer, loss_fn, config).fit(train_set, val_set)
    daso.Distributed(model, optimizer, "daso", options, steps_per_epoch=N)  # your own loop
    daso.run(main)                      # the CLI's exit codes for your own script
    daso.init_distributed()             # topology and process groups, if you need them first
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "daso.config",
    "load_config": "daso.config",
    "Trainer": "daso.trainer",
    "Distributed": "daso.distributed",
    "run": "daso.script",
    "Preempted": "daso.script",
    "DASOTrainer": "daso.trainer",
    "init_distributed": "daso.topology",
    "detect_topology": "daso.topology",
    "Topology": "daso.topology",
    "DASOSchedule": "daso.schedule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'daso' has no attribute {name!r}")
