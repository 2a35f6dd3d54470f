"""Typed option models: the base of every config section and of every strategy's options.

It sits below both the strategies and the config layer: a strategy declares its options as a
subclass of :class:`StrategyOptions` next to its class, and :mod:`daso.config` builds the
``strategy`` section from the registry (:mod:`daso.strategies`), so each option's type,
default and help text are written once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WireDtype = Literal["bfloat16", "float16", "float32"]
#: DiLoCo's outer learning rate and Nesterov momentum (Douillard et al. 2023).
#: Outer step defaults: SlowMo's (Wang et al. 2020, arXiv 1910.00643: lr 1, momentum up to
#: 0.5 at 12-48 inner steps). DiLoCo's 0.7 and 0.9 are set for rounds of hundreds of inner
#: steps; over DASO's or local SGD's short rounds they amplify each average about
#: ``lr / (1 - momentum)`` = 7 times and training diverges (benchmarks/README.md).
DEFAULT_OUTER_LR = 1.0
DEFAULT_OUTER_MOMENTUM = 0.5


class Section(BaseModel):
    """A config section: unknown keys are errors; values are checked on assignment too.

    Floats must be finite: ``.nan`` and ``.inf`` are rejected everywhere (an infinite learning
    rate, timeout or poll interval is never what a run wants). Types are strict: ``'3'`` is not
    a number and ``'true'`` not a bool (an int is still a float).
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True
    )


class StrategyOptions(Section):
    """The options of a strategy (its ``strategy`` config section without ``name``).

    Subclass it next to the strategy class, with a ``Field(default, description=...)`` per
    option, and set the class's ``Options`` attribute to it. Every strategy has
    ``window_steps``.
    """

    window_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps per window, the unit of schedules (warm-up, cool-down, "
        "plateaus) and of the blocking average that ends each window; empty = one epoch.",
    )


class OuterOptimizerOptions(StrategyOptions):
    """The outer optimizer of the strategies that average the model across nodes
    (DiLoCo, Douillard et al. 2023, arXiv 2311.08105)."""

    outer_optimizer: Literal["none", "nesterov"] = Field(
        "none",
        description="Outer step on each cross-node average: none (plain mean) or nesterov "
        "(DiLoCo: SGD with Nesterov momentum on the pseudo-gradient anchor - mean).",
    )
    outer_lr: float = Field(
        DEFAULT_OUTER_LR, gt=0, description="Outer learning rate (SlowMo: 1; DiLoCo: 0.7)."
    )
    outer_momentum: float = Field(
        DEFAULT_OUTER_MOMENTUM,
        ge=0,
        lt=1,
        description="Outer Nesterov momentum (SlowMo: up to 0.5; DiLoCo: 0.9).",
    )
