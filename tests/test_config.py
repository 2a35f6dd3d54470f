"""Config loading and validation: every shipped file, and each kind of bad input."""

from __future__ import annotations

import inspect
import os
import re
import typing
from pathlib import Path

import pytest

from daso.config import (
    STRATEGY_SECTIONS,
    DASOConfig,
    ModelName,
    default_output_dir,
    load_config,
    reference_table,
)
from daso.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_has_the_required_files():
    names = {p.name for p in CONFIGS}
    assert {"mnist_cnn_daso.yaml", "mnist_cnn_ddp.yaml", "cifar10_resnet20_daso.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.trainer.output_dir is None  # the Python API: the trainer gives each run its own
    default_output_dir(config, path)  # daso train: one folder per config, for --resume auto
    assert config.trainer.output_dir == str(Path("runs") / path.stem)
    assert config.strategy.name in STRATEGY_SECTIONS


def test_defaults_are_the_reference_values():
    daso = load_config(None).strategy
    assert (
        daso.warmup_windows,
        daso.cooldown_windows,
        daso.stability_level,
        daso.patience,
        daso.max_global_skips,
        daso.skip_reduction_factor,
        daso.local_skip_factor,
        daso.downcast,
    ) == (4, 4, 0.05, 2, 8, 2, 4, "bfloat16")


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "strategy:\n  name: daso\n  max_global_skip: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "strategy.max_global_skip" in message
    assert "max_global_skips" in message  # the allowed keys are listed


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'.*trainer"):
        load_config(write(tmp_path, "trainr:\n  epochs: 3\n"))


@pytest.mark.parametrize(
    "text, key, hint",
    [
        (
            "strategy:\n  max_global_skips: 0\n",
            "strategy.max_global_skips",
            "greater than or equal to 1",
        ),
        (
            "strategy:\n  downcast: int8\n",
            "strategy.downcast",
            "'bfloat16', 'float16' or 'float32'",
        ),
        (
            "strategy:\n  blocking_sync: gradients\n  sync_optimizer_state: false\n",
            "strategy: blocking_sync: gradients",
            "needs sync_optimizer_state: true",
        ),
        ("strategy:\n  blocking_sync: grads\n", "strategy.blocking_sync", "'gradients'"),
        ("trainer:\n  epochs: many\n", "trainer.epochs", "must be an integer, got the text"),
        ("optim:\n  lr: -1\n", "optim.lr", "greater than 0"),
        (
            "strategy:\n  name: gossip\n",
            "strategy.name",
            "['async_easgd', 'daso', 'ddp', 'downpour', 'eamsgd', 'easgd', 'hierarchical'",
        ),
    ],
)
def test_bad_value_names_key_and_allowed_values(tmp_path, text, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value) and hint in str(err.value), str(err.value)


def test_malformed_yaml_gives_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"line 3, column 9: mapping values"):
        load_config(write(tmp_path, "trainer:\n  epochs: 3\n    seed: 1\n"))


def test_inconsistent_warmup_and_cooldown(tmp_path):
    with pytest.raises(
        ConfigError, match=r"warmup_windows \(4\) \+ strategy.cooldown_windows \(4\)"
    ):
        load_config(write(tmp_path, "trainer:\n  epochs: 5\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_directory_or_an_empty_file_as_config_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file inside it"):
        load_config(tmp_path)
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match="is empty; write the sections to change") as err:
            load_config(write(tmp_path, text))
        assert "leave out --config" not in str(err.value)  # daso train requires --config


def test_num_threads_is_bounded_by_the_cores():
    cores = os.cpu_count() or 1
    assert load_config(None, [f"trainer.num_threads={cores}"]).trainer.num_threads == cores
    with pytest.raises(ConfigError, match=f"exceeds this machine's {cores} cores"):
        load_config(None, ["trainer.num_threads=100000"])


def test_overrides_are_typed_and_validated():
    config = load_config(
        ROOT / "configs/mnist_cnn_daso.yaml",
        ["strategy.max_global_skips=4", "trainer.amp=true", "optim.milestones=[2, 3]"],
    )
    assert config.strategy.max_global_skips == 4 and config.trainer.amp is True
    assert config.optim.milestones == [2, 3]
    with pytest.raises(ConfigError, match="strategy.max_global_skips"):
        load_config(None, ["strategy.max_global_skips=zero"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["strategy.max_global_skips"])
    with pytest.raises(ConfigError, match="'trainer.epochs' is a value"):
        load_config(ROOT / "configs/mnist_cnn_daso.yaml", ["trainer.epochs.x=1"])


def test_schema_model_names_match_the_model_registry():
    from daso.models import MODEL_NAMES

    assert set(typing.get_args(ModelName)) == set(MODEL_NAMES)


def test_daso_schedule_options_are_the_schedule_arguments():
    from daso.schedule import DASOSchedule

    params = set(inspect.signature(DASOSchedule).parameters) - {"windows"}
    assert set(DASOConfig().schedule_options()) == params


def test_strategy_sections_are_the_registry():
    """Each registered strategy has a ``strategy`` section: its own options plus ``name``,
    with the same defaults (nothing restated in the config layer)."""
    from daso.strategies import STRATEGIES

    assert list(STRATEGY_SECTIONS) == list(STRATEGIES)
    for name, cls in STRATEGIES.items():
        section = STRATEGY_SECTIONS[name]
        assert issubclass(section, cls.Options)
        assert set(section.model_fields) == set(cls.Options.model_fields) | {"name"}
        assert section().model_dump(exclude={"name"}) == cls.Options().model_dump()
        assert load_config(None, [f"strategy.name={name}"]).strategy.name == name
        assert cls.summary, name


def test_readme_config_reference_matches_schema():
    readme = (ROOT / "README.md").read_text()
    section = re.search(
        r"<!-- config-reference:begin -->\n(.*?)\n<!-- config-reference:end -->", readme, re.S
    )
    assert section, "README lacks the generated config reference"
    assert section.group(1).strip() == reference_table().strip(), (
        "README config table is stale: regenerate it with `daso config-reference`"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("trainer:\n  epochs: '3'\n", "trainer.epochs: must be an integer, got the text '3' "
         "(quoted); remove the quotes"),
        ("trainer:\n  epochs: 1e9\n", "trainer.epochs: must be an integer, got the float "
         "1000000000.0; write 1000000000"),
        ("trainer:\n  epochs: 2.5\n", "trainer.epochs: must be an integer, got the float 2.5"),
        ("optim:\n  lr: '0.1'\n", "optim.lr: must be a number, got the text '0.1' (quoted)"),
        ("trainer:\n  deterministic: 'yes'\n", "trainer.deterministic: must be true or false"),
    ],
)  # fmt: skip
def test_numbers_and_bools_are_strict_and_say_why(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value), str(err.value)


def test_exponent_notation_is_a_number_as_in_yaml_1_2(tmp_path):
    config = load_config(write(tmp_path, "optim:\n  lr: 1e-3\n"), ["optim.weight_decay=5e-4"])
    assert (config.optim.lr, config.optim.weight_decay) == (0.001, 0.0005)


def test_without_a_config_file_the_output_folder_is_left_to_the_run():
    assert load_config(None).trainer.output_dir is None


def test_loggers_are_named_once_and_from_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.loggers: lists \['csv'\] more than once"):
        load_config(None, ["trainer.loggers=[csv, jsonl, csv]"])
    with pytest.raises(ConfigError, match=r"trainer.loggers.0"):
        load_config(None, ["trainer.loggers=[neptune]"])
