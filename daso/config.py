"""Typed configuration: YAML files, dotted command-line overrides, validation with clear errors.

A config has six sections, ``model``, ``data``, ``optim``, ``trainer``, ``checkpoint`` and
``strategy``; the ``strategy`` section's keys depend on ``strategy.name``. Every problem
(malformed YAML, unknown key, wrong type, out-of-range value, inconsistent combination) raises
:class:`~daso.errors.ConfigError` naming the file, the dotted key and what is allowed, before
any process group exists.

Example:
    >>> cfg = load_config(None, ["strategy.name=ddp", "trainer.epochs=2"])
    >>> cfg.strategy.name, cfg.trainer.epochs
    ('ddp', 2)
"""

from __future__ import annotations

import os
import re
import reprlib
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from daso.errors import ConfigError
from daso.options import Section
from daso.strategies import STRATEGIES

#: Model names known to :func:`daso.models.build_model` (a test keeps the two in step).
ModelName = Literal["mnist_cnn", "resnet20", "resnet32", "resnet44", "resnet56", "char_transformer"]


class ModelConfig(Section):
    name: ModelName = Field("mnist_cnn", description="Network to train.")
    num_classes: int = Field(10, ge=2, description="Output classes.")
    width: int = Field(1, ge=1, description="Channel multiplier of the ResNets (1 = paper).")


class DataConfig(Section):
    name: Literal["mnist", "cifar10", "imagefolder", "text"] = Field(
        "mnist", description="Data set reader (text: characters of a UTF-8 file)."
    )
    root: str | None = Field(
        None,
        description="MNIST: folder with the IDX files (empty = the embedded test split). "
        "cifar10/imagefolder: folder with train/ and test/ (or a .tar.gz of it). "
        "text: a UTF-8 file (empty = the embedded Tiny Shakespeare).",
    )
    context: int = Field(128, ge=1, description="text: characters per training sequence.")
    batch_size: int = Field(64, ge=1, description="Training batch size per rank.")
    val_batch_size: int = Field(256, ge=1, description="Evaluation batch size per rank.")
    val_size: int = Field(2000, ge=1, description="MNIST: images held out for validation.")
    augment: bool = Field(True, description="Random crop (padding 4) and flip on image sets.")
    train_subset: int | None = Field(None, ge=1, description="Use only this many train images.")
    val_subset: int | None = Field(None, ge=1, description="Use only this many val images.")
    cache_dir: str = Field(".cache/daso", description="Where decoded images are cached.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.05, gt=0, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(False, description="SGD Nesterov momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty / decoupled weight decay.")
    scheduler: Literal["none", "cosine", "step", "multistep"] = Field(
        "none", description="LR schedule, stepped as scheduler_interval says."
    )
    scheduler_interval: Literal["epoch", "step"] = Field(
        "epoch", description="Step the LR schedule once per epoch or per optimizer step."
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear LR warm-up steps before the schedule (interval step)."
    )
    step_size: int = Field(30, ge=1, description="step: epochs (or steps) between LR drops.")
    milestones: list[int] = Field(
        default_factory=list, description="multistep: drop epochs (or steps)."
    )
    gamma: float = Field(0.1, gt=0, le=1, description="step/multistep: LR factor per drop.")


class TrainerConfig(Section):
    epochs: int = Field(10, ge=1, description="Training epochs.")
    eval_every_epochs: int = Field(
        1,
        ge=0,
        description="Validate after every this many epochs and after the last (0: only after "
        "the last; other epochs' rows have no val_ metrics).",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of model init, sampling and augmentation."
    )
    output_dir: str | None = Field(
        None,
        description="Run folder: run.json, metrics, checkpoints (empty: daso train uses "
        "runs/<config file stem>, the Python API runs/<run id>).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA if present.")
    cuda_aware_mpi: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CUDA runs: hand cross-node MPI device buffers (on), stage them through "
        "pinned host memory (off), or detect CUDA-aware MPI (auto; daso info shows the path).",
    )
    amp: bool = Field(False, description="Autocast: bfloat16 on CPU, float16 + GradScaler on CUDA.")
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip gradient 2-norm to this.")
    accumulate_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (gradient accumulation)."
    )
    steps_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps per epoch: required for an IterableDataset, a cap for "
        "a sized one (empty = the whole data set).",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch.set_num_threads per rank, at most the machine's cores (empty: "
        "torch's default).",
    )
    progress: bool | Literal["bar", "lines"] = Field(
        True,
        description="Progress on rank 0: true = a tqdm bar if stderr is a terminal, else a "
        "line every progress_seconds; bar or lines to choose (launch/local.sh does); false: "
        "none.",
    )
    progress_seconds: float = Field(
        10.0, gt=0, description="Seconds between progress lines when stderr is not a terminal."
    )
    loggers: list[Literal["jsonl", "csv", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"],
        description="Metric writers on rank 0 (tensorboard, wandb, mlflow: optional extras; "
        "wandb and mlflow log offline into the run folder).",
    )
    log_every_steps: int = Field(
        50,
        ge=0,
        description="Step rows (loss, LR, samples/s, sync events) every this many optimizer "
        "steps (0 = epoch rows only).",
    )
    overwrite: bool = Field(
        False,
        description="Let a new run (not --resume) replace another run's metrics and "
        "checkpoints in its output folder (else that is an error).",
    )
    timeout_seconds: float = Field(
        300.0,
        gt=0,
        le=7 * 86400,
        description="Longest wait for any collective or MPI request before failing, seconds.",
    )
    deterministic: bool = Field(
        False,
        description="Bitwise-reproducible steps and resumes: fixed DDP gradient buckets, "
        "torch deterministic algorithms (a little slower).",
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop",
        description="NaN/Inf loss or gradient: stop with an error, or skip the step on all ranks.",
    )
    max_skipped_steps: int = Field(
        10,
        ge=1,
        description="nan_policy skip: stop with an error after this many non-finite steps "
        "in a row.",
    )

    @field_validator("loggers")
    @classmethod
    def _each_logger_once(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {repeated} more than once; name each logger once")
        return value

    @field_validator("num_threads")
    @classmethod
    def _at_most_the_cores(cls, value: int | None) -> int | None:
        cores = os.cpu_count() or 1
        if value is not None and value > cores:  # torch segfaults on absurd thread counts
            raise ValueError(f"{value} exceeds this machine's {cores} cores; use at most {cores}")
        return value


class CheckpointConfig(Section):
    dir: str | None = Field(
        None, description="Checkpoint folder (empty = <trainer.output_dir>/checkpoints)."
    )
    every_epochs: int = Field(
        1, ge=0, description="Epochs between checkpoints (0 = only at the end)."
    )
    every_batches: int | None = Field(
        None, ge=1, description="Also checkpoint every this many batches inside an epoch."
    )
    keep: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are deleted.")


def _strategy_section(name: str, cls: type) -> type[Section]:
    """The ``strategy`` config section of strategy ``name``: its options model plus ``name``
    (the discriminator), e.g. ``DASOConfig``."""
    title = cls.__name__.removesuffix("Strategy")
    return create_model(
        f"{title}Config",
        __base__=cls.Options,
        __module__=__name__,
        name=(Literal[name], Field(name, description=cls.summary)),
    )


#: The ``strategy`` section of each registered strategy, by name (built from the registry).
STRATEGY_SECTIONS: dict[str, type[Section]] = {
    name: _strategy_section(name, cls) for name, cls in STRATEGIES.items()
}
DASOConfig = STRATEGY_SECTIONS["daso"]
StrategyConfig = Annotated[
    Union[tuple(STRATEGY_SECTIONS.values())],  # noqa: UP007 - a union built at run time
    Field(discriminator="name"),
]


class Config(Section):
    """The whole run: ``model``, ``data``, ``optim``, ``trainer``, ``checkpoint``, ``strategy``."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    strategy: StrategyConfig = Field(default_factory=DASOConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_strategy_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("strategy"), dict):
            data["strategy"].setdefault("name", "daso")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        strategy = self.strategy
        if isinstance(strategy, DASOConfig) and strategy.window_steps is None:
            total = strategy.warmup_windows + strategy.cooldown_windows
            if total > self.trainer.epochs:
                raise ValueError(
                    f"strategy.warmup_windows ({strategy.warmup_windows}) + "
                    f"strategy.cooldown_windows ({strategy.cooldown_windows}) = {total} exceeds "
                    f"trainer.epochs ({self.trainer.epochs}) (a window is an epoch unless "
                    "strategy.window_steps is set); lower them, train longer, or set "
                    "strategy.window_steps"
                )
        if self.data.name in ("cifar10", "imagefolder") and not self.data.root:
            raise ValueError(
                f"data.root is required for data.name={self.data.name!r}; set it to the folder "
                "holding train/ and test/ (or a .tar.gz of it)"
            )
        self._check_model_matches_data()
        self._check_milestones()
        if self.optim.warmup_steps and self.optim.scheduler_interval != "step":
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) counts optimizer steps but "
                "optim.scheduler_interval is 'epoch'; set optim.scheduler_interval=step"
            )
        return self

    def _check_model_matches_data(self) -> None:
        """``mnist_cnn`` reads 1-channel 28x28 MNIST; the ResNets read 3-channel images."""
        model, data = self.model.name, self.data.name
        if (model == "char_transformer") != (data == "text"):
            raise ValueError(
                f"model.name {model!r} and data.name {data!r} do not fit: char_transformer "
                "reads data.name: text, and text feeds only char_transformer"
            )
        if data == "text":
            return
        if model == "mnist_cnn" and data != "mnist":
            raise ValueError(
                f"model.name 'mnist_cnn' takes 1-channel 28x28 MNIST images but data.name is "
                f"{data!r} (3-channel images); use a ResNet (e.g. model.name: resnet20) or "
                "data.name: mnist"
            )
        if model != "mnist_cnn" and data == "mnist":
            raise ValueError(
                f"model.name {model!r} takes 3-channel images but data.name is 'mnist' "
                "(1-channel); use model.name: mnist_cnn, or data.name: cifar10/imagefolder"
            )

    def _check_milestones(self) -> None:
        """``multistep`` needs increasing drop epochs inside ``1 .. trainer.epochs - 1``."""
        optim, epochs = self.optim, self.trainer.epochs
        if optim.scheduler != "multistep":
            return
        milestones = list(optim.milestones)
        if not milestones:
            raise ValueError(
                "optim.scheduler is 'multistep' but optim.milestones is empty; give the epochs "
                "at which the LR drops, e.g. optim.milestones=[30, 60], or another scheduler"
            )
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(
                f"optim.milestones {milestones} must be strictly increasing; list each drop "
                "epoch once, in order"
            )
        outside = [m for m in milestones if not 1 <= m < epochs]
        if outside and optim.scheduler_interval == "epoch":
            raise ValueError(
                f"optim.milestones {milestones}: {outside} outside 1..{epochs - 1} (trainer.epochs "
                f"is {epochs}), so the LR would never drop there; use drop epochs in "
                f"1..{epochs - 1} or train longer"
            )

    def checkpoint_folder(self) -> Path:
        """Where checkpoints go: ``checkpoint.dir``, else ``<trainer.output_dir>/checkpoints``."""
        if self.checkpoint.dir:
            return Path(self.checkpoint.dir)
        return Path(self.trainer.output_dir or "runs/default") / "checkpoints"

    def strategy_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`daso.strategies.build_strategy` (the section sans name)."""
        return self.strategy.model_dump(exclude={"name"})


def _dotted(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "strategy" and parts[1] in STRATEGY_SECTIONS:
        del parts[1]
    return ".".join(parts)


def _allowed_keys(loc: Sequence[Any]) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        if model is Config and part == "strategy":
            continue
        if part in STRATEGY_SECTIONS:
            model = STRATEGY_SECTIONS[part]
            continue
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


#: A bounded ``repr``: a few levels, items and characters of a value, never the whole of it
#: (a value read from a file may be huge, or a shared structure that expands exponentially).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 60, 40, 60
for _name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _name, 6)


def _short_repr(value: Any, limit: int = 80) -> str:
    """At most ``limit`` characters of ``value``'s ``repr``, built from a bounded view of it."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Largest config file read, in bytes (a config is a page of keys; a larger file is a mistake
#: or an attack that would take minutes to parse).
MAX_CONFIG_BYTES = 1_000_000
#: Most values (YAML nodes: scalars, lists, mappings) in one config, counting every node of an
#: anchored subtree each time an alias (``*name``) refers to it. A config has about a hundred;
#: anchors for reuse stay far below it; an "alias bomb" (anchors of anchors) goes past it at
#: once, and so does a list of a million items (PyYAML reads some 20,000 values a second).
MAX_NODES = 10_000
#: Deepest nesting of lists and mappings in a config (a config has three levels; PyYAML's
#: scanner slows down with the square of the depth, and Python's stack ends near 300).
MAX_DEPTH = 50


def _subtree_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in ``node``'s subtree when every alias in it is expanded (memoised by identity, so
    a shared subtree is counted in time linear in the distinct nodes)."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a cycle (an anchor referred to inside itself) counts once
        if isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_subtree_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(
                _subtree_size(k, memo) + _subtree_size(v, memo) for k, v in node.value
            )
    return memo[key]


class InputLimitError(yaml.YAMLError):
    """A YAML document holds more than :data:`MAX_NODES` values (aliases expanded), or its
    lists and mappings nest deeper than :data:`MAX_DEPTH`."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does (``1e-3`` and ``1e9`` are floats;
    YAML 1.1, PyYAML's default, reads exponents without a dot as text), and refusing documents
    of more than :data:`MAX_NODES` values, aliases expanded (counted as each node or alias is
    met, before anything is built from it), or nested deeper than :data:`MAX_DEPTH`."""

    def compose_document(self) -> Any:
        self._nodes = self._depth = 0
        self._sizes: dict[int, int] = {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise InputLimitError(
                    f"nested too deeply: lists or sections more than {MAX_DEPTH} levels "
                    "deep; a config has sections of keys, a few levels at most"
                )
            self._count()
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _count(self) -> None:
        anchor = None
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
        if anchor in self.anchors:
            self._nodes += _subtree_size(self.anchors[anchor], self._sizes)
        else:
            self._nodes += 1
        if self._nodes <= MAX_NODES:
            return
        if anchor is not None:
            raise InputLimitError(
                f"its aliases (*{anchor} and the ones before it) expand to more than "
                f"{MAX_NODES} values; write the values out, or use fewer aliases"
            )
        raise InputLimitError(f"it holds more than {MAX_NODES} values; a config is a page of keys")


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d[\d_]*)?(\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML with :class:`_Loader` (safe: plain data only; aliases bounded).

    Raises:
        yaml.YAMLError: malformed YAML, or :class:`InputLimitError`.
        ValueError: a scalar that cannot be converted (an integer of thousands of digits).
        RecursionError: nesting deeper than Python's recursion limit.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _wrong_type(kind: str, value: Any) -> str:
    """The message for a value of the wrong type where a number or bool is needed: a quoted
    number (``'3'``), or a float where an integer is needed (``1e9``)."""
    want = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}[kind]
    if isinstance(value, float) and kind == "int_type":
        fix = f"; write {int(value)}" if value.is_integer() else ""
        return f"must be {want}, got the float {value!r}{fix}"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return f"must be {want}, got the text {value!r}"
        return f"must be {want}, got the text {value!r} (quoted); remove the quotes"
    return f"must be {want}, got {_short_repr(value)} ({type(value).__name__})"


#: Most problems a config error lists one by one (the rest are counted).
MAX_PROBLEMS_SHOWN = 10


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, ``source: key: what is wrong (got value)``, for the first
    :data:`MAX_PROBLEMS_SHOWN` problems, then a line counting the rest."""
    lines = []
    problems = error.errors()
    for item in problems[:MAX_PROBLEMS_SHOWN]:
        key = _dotted(item["loc"]) if item["loc"] else "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(item["loc"]))
            lines.append(f"{source}: unknown key '{key}'; allowed here: {allowed}")
        elif item["type"] == "union_tag_invalid":
            name = item["input"].get("name") if isinstance(item["input"], dict) else None
            lines.append(
                f"{source}: '{key}.name' must be one of {sorted(STRATEGY_SECTIONS)} "
                f"(got {_short_repr(name)})"
            )
        elif item["type"] in ("model_type", "model_attributes_type", "dict_type"):
            lines.append(
                f"{source}: {key}: must be a section of 'key: value' pairs "
                f"(got {_short_repr(item['input'])}); indent its keys under '{key}:', or set "
                f"them one at a time with --set {key}.KEY=VALUE"
            )
        elif item["type"] == "invalid_key":
            lines.append(
                f"{source}: {key}: keys must be names (strings), got {item['loc'][-1]}; "
                "quote or rename it"
            )
        elif item["type"] in ("int_type", "float_type", "bool_type"):
            lines.append(f"{source}: {key}: {_wrong_type(item['type'], item['input'])}")
        elif item["type"] == "value_error" and not item["loc"]:
            lines.append(f"{source}: {item['msg'].removeprefix('Value error, ')}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = f" (got {_short_repr(item['input'])})" if item["type"] != "value_error" else ""
            lines.append(f"{source}: {key}: {message}{got}")
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(
            f"{source}: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems (fix the "
            "ones above first; an unknown key is often a section indented wrongly)"
        )
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``.

    Raises:
        ConfigError: the file is missing, a folder, larger than :data:`MAX_CONFIG_BYTES`,
            unreadable, not UTF-8, malformed, has aliases that expand too far, or is not a
            mapping.
    """
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)  # never more, whatever the file grows to
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"cannot read config file {path}: {err}; pass a readable UTF-8 YAML file"
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES // 1_000_000} MB, far more "
            "than any config needs; pass the YAML config itself (a page of keys)"
        )
    try:
        data = parse_yaml(text)
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply to read") from None
    except InputLimitError as err:
        raise ConfigError(f"{path}: {err}") from None
    except ValueError as err:  # a scalar that cannot be converted, e.g. a 5,000-digit integer
        reason = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: a value cannot be converted ({reason}); fix it") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: malformed YAML at {where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {err}") from None
    if data is None:
        raise ConfigError(
            f"config file {path} is empty; write the sections to change (e.g. 'trainer:' and "
            "'  epochs: 10' below it), or pass one of the configs in configs/"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}; "
            "write e.g. 'trainer:' on one line and '  epochs: 10' below it"
        )
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to raw config ``data`` in place.

    The value is parsed as YAML (``4`` is an int, ``true`` a bool, ``[1, 2]`` a list).

    Raises:
        ConfigError: no ``=``, an empty key, a malformed value, or a key below a non-section.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(
            f"override {override!r}: expected dotted.key=value, e.g. strategy.max_global_skips=4"
        )
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError, ValueError):
        raise ConfigError(
            f"override {_short_repr(override)}: the value is not valid YAML"
        ) from None
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: '{'.'.join(parents[: i + 1])}' is a value "
                f"({_short_repr(child)}), not a section, so it has no key '{key.split('.')[i + 1]}'"
            )
        node = child
    node[leaf] = value


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Load, override and validate a config.

    Args:
        path: YAML file, or ``None`` for the defaults.
        overrides: ``dotted.key=value`` strings applied in order (``--set`` on the CLI).

    Returns:
        The validated :class:`Config`; an empty ``trainer.output_dir`` stays empty
        (:class:`~daso.Trainer` then gives the run ``runs/<run id>``; ``daso train`` uses
        ``runs/<config file stem>``, see :func:`default_output_dir`).

    Raises:
        ConfigError: naming the file, the dotted key and the allowed values.
    """
    source = str(path) if path is not None else "<defaults>"
    data = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: a value is nested too deeply to validate") from None
    return config


def default_output_dir(config: Config, path: str | os.PathLike[str] | None) -> None:
    """``daso train``'s run folder when ``trainer.output_dir`` is empty: ``runs/<config file
    stem>``, the same for every run of a config, so that a requeued job's ``--resume auto``
    finds its checkpoints. (The Python API leaves it empty: the trainer then gives each run
    ``runs/<run id>``.)"""
    if not config.trainer.output_dir and path is not None:
        config.trainer.output_dir = str(Path("runs") / Path(path).stem)


def check_launch(
    config: Config, world_size: int, train_size: int, num_classes: int | None = None
) -> None:
    """Checks that need the launch's world size and the loaded data, run before any process group.

    ``daso train`` calls it on every rank after loading the datasets and before building the
    trainer, so a run that cannot work stops with exit code 2 and no output folder.

    Args:
        config: the validated config.
        world_size: ranks in the job (:func:`daso.topology.read_launcher_env`).
        train_size: images in the training set, after ``data.train_subset``.
        num_classes: classes in the data (labels ``0 .. num_classes - 1``), if known.

    Raises:
        ConfigError: each rank's share of the training set (``train_size // world_size``, the
            ``DistributedSampler`` drops the remainder) is smaller than ``data.batch_size``, so no
            rank gets one full batch; or the data has more classes than ``model.num_classes``.
    """
    batch = config.data.batch_size
    per_rank = train_size // world_size if world_size > 0 else 0
    if per_rank < batch:
        subset = " after data.train_subset" if config.data.train_subset is not None else ""
        fix = (
            f"lower data.batch_size to at most {per_rank}, use fewer ranks"
            if per_rank >= 1
            else "use fewer ranks"
        )
        raise ConfigError(
            f"data.batch_size is {batch} per rank, but the training set ({train_size} images"
            f"{subset}) gives each of the {world_size} ranks only {per_rank}: no rank would get "
            f"one full batch; {fix}, or train on more data"
        )
    if num_classes is not None and num_classes > config.model.num_classes:
        raise ConfigError(
            f"the data has {num_classes} classes but model.num_classes is "
            f"{config.model.num_classes}; set model.num_classes={num_classes}"
        )


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def iter_reference() -> Iterator[tuple[str, str, str, str]]:
    """``(dotted key, type, default, description)`` for every config key, in schema order."""
    sections: list[tuple[str, type[Section]]] = [
        (name, field.annotation)
        for name, field in Config.model_fields.items()
        if name != "strategy"
    ]
    sections += [(f"strategy ({name})", cls) for name, cls in STRATEGY_SECTIONS.items()]
    for prefix, cls in sections:
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            key = f"{prefix.split(' ')[0]}.{name}"
            if prefix.startswith("strategy") and name != "name":
                key = f"strategy.{name} ({prefix[10:-1]})"
            yield key, _type_name(field.annotation), repr(default), field.description or ""


def reference_table() -> str:
    """The config reference as a Markdown table (the README embeds it; a test compares)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k}` | {t} | `{d}` | {m} |" for k, t, d, m in iter_reference()]
    return "\n".join(rows)


def check_writable(config: Config) -> None:
    """Check, without creating anything, that the run can write its outputs: the nearest
    existing folder above ``trainer.output_dir`` and above the checkpoint folder must be a
    writable directory.

    Raises:
        ConfigError: naming the key, the path and the fix.
    """
    for key, path in (
        ("trainer.output_dir", Path(config.trainer.output_dir or "runs")),
        ("checkpoint.dir", config.checkpoint_folder()),
    ):
        existing = path.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a folder" if not existing.is_dir() else "is not writable"
            raise ConfigError(
                f"{key}: cannot write {path}: {existing} {what}; choose a writable folder "
                f"(--set {key}=PATH)"
            )
