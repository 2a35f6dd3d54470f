"""Property tests (hypothesis): whatever YAML and overrides a user writes, loading a config either
returns a valid Config or raises ConfigError, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daso.config import STRATEGY_SECTIONS, Config, DASOConfig, check_launch, load_config
from daso.errors import ConfigError

SECTIONS = sorted(Config.model_fields)
KEYS = sorted(
    {
        name
        for cls in [Config.model_fields[s].annotation for s in SECTIONS if s != "strategy"]
        + list(STRATEGY_SECTIONS.values())
        for name in cls.model_fields
    }
)
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

junk = st.text(min_size=0, max_size=8)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=300),
    st.integers(),  # negatives and huge
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(list(STRATEGY_SECTIONS) + ["sgd", "cosine", "multistep", "mnist", "auto"]),
    junk,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), junk, st.integers()), inner, max_size=4),
    ),
    max_leaves=10,
)
sections = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(KEYS), junk), values, max_size=6),
    values,  # a section that is a scalar, a list or null
)
documents = st.one_of(
    st.dictionaries(
        st.one_of(st.sampled_from(SECTIONS), junk, st.integers()), sections, max_size=6
    ),
    values,  # a top level that is not a mapping
)
dotted = st.lists(st.one_of(st.sampled_from(SECTIONS + KEYS), junk), min_size=0, max_size=4).map(
    ".".join
)
value_texts = st.one_of(
    values.map(
        lambda v: (
            yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip().removesuffix("...")
        )
    ),
    junk,
)
#: ``section.key`` of every real key, so that most overrides reach the value checks.
REAL_KEYS = sorted(
    [
        f"{section}.{key}"
        for section in SECTIONS
        if section != "strategy"
        for key in Config.model_fields[section].annotation.model_fields
    ]
    + [f"strategy.{key}" for cls in STRATEGY_SECTIONS.values() for key in cls.model_fields]
)
overrides = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(REAL_KEYS), st.just("="), value_texts).map("".join),
        st.tuples(dotted, st.sampled_from(["=", "", "=="]), value_texts).map("".join),
        junk,
    ),
    max_size=4,
)
SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _load(text: str, sets: list[str]) -> Config | None:
    """``load_config`` on ``text`` written to a file; None when it raised ConfigError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path, sets)
        except ConfigError as err:
            assert str(err), "a ConfigError must say what is wrong"
            return None


def _assert_valid(config: Config) -> None:
    assert isinstance(config, Config)
    if isinstance(config.strategy, DASOConfig) and config.strategy.window_steps is None:
        assert config.strategy.warmup_windows + config.strategy.cooldown_windows <= (
            config.trainer.epochs
        )
    # a file gives no default folder (the trainer and the CLI choose it), a set value stays
    assert config.trainer.output_dir is None or isinstance(config.trainer.output_dir, str)


@SETTINGS
@given(document=documents, sets=overrides)
def test_random_structures_and_overrides_load_or_raise_config_error(document, sets):
    config = _load(yaml.safe_dump(document, sort_keys=False), sets)
    if config is not None:
        _assert_valid(config)


@SETTINGS
@given(base=st.sampled_from(SHIPPED), sets=overrides)
def test_shipped_configs_with_random_overrides_load_or_raise_config_error(base, sets):
    config = _load(base.read_text(), sets)
    if config is not None:
        _assert_valid(config)


@SETTINGS
@given(text=st.text(max_size=200), sets=overrides)
def test_random_text_loads_or_raises_config_error(text, sets):
    config = _load(text, sets)
    if config is not None:
        _assert_valid(config)


@SETTINGS
@given(
    document=st.fixed_dictionaries(
        {
            "data": st.fixed_dictionaries(
                {
                    "batch_size": st.integers(1, 10**6),
                    "train_subset": st.none() | st.integers(1, 10**5),
                }
            ),
            "model": st.fixed_dictionaries({"num_classes": st.integers(2, 20)}),
            "strategy": st.fixed_dictionaries({"name": st.sampled_from(["ddp", "local_sgd"])}),
        }
    ),
    world_size=st.integers(1, 4096),
    train_size=st.integers(0, 10**6),
    num_classes=st.none() | st.integers(1, 50),
)
def test_check_launch_passes_or_raises_config_error(document, world_size, train_size, num_classes):
    config = _load(yaml.safe_dump(document, sort_keys=False), [])
    assert config is not None
    try:
        check_launch(config, world_size, train_size, num_classes)
    except ConfigError as err:
        assert "data.batch_size" in str(err) or "model.num_classes" in str(err)
    else:
        assert train_size // world_size >= config.data.batch_size
