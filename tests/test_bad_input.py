"""Bad input: each case is a ConfigError/DataError naming the key or path, before any process
group or output folder exists; ``daso train`` exits 2 on it (also under mpiexec, every rank)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from daso.cli import EXIT_BAD_INPUT, build_datasets
from daso.config import check_launch, load_config
from daso.errors import ConfigError, DataError

from mpi_harness import ROOT, mpi_env, run_command, train_args

MNIST = ROOT / "configs" / "mnist_cnn_ddp.yaml"


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# -- odd YAML shapes and overrides ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("- 1\n- 2\n", r"top level must be a mapping of sections, got list"),
        ("trainer: 5\n", r"trainer: must be a section of 'key: value' pairs \(got 5\)"),
        ("strategy: null\n", r"strategy: must be a section .*\(got None\)"),
        ("strategy: [1, 2]\n", r"strategy: must be a section .*\(got \[1, 2\]\)"),
        ("model: null\n", r"model: must be a section"),
        ("1: 2\n", r"1: keys must be names \(strings\), got 1"),
        ("trainer:\n  null: 1\n", r"trainer.None: keys must be names"),
        ("strategy:\n  7: daso\n", r"strategy.7: keys must be names"),
        (
            "strategy:\n  name: [daso]\n",
            r"'strategy.name' must be one of \[.*'daso'.*\(got \['daso'\]\)",
        ),
        ("? [1, 2]\n: 3\n", r"malformed YAML at line 1, column 3"),
        ("trainer:\n  epochs: 3\n  epochs: [\n", r"malformed YAML at line \d+, column \d+"),
        ("optim:\n  milestones: " + "[" * 1200 + "]" * 1200 + "\n", r"nested too deeply"),
        ("trainer:\n  seed: 2020-01-01\n", r"trainer.seed: must be an integer, got .*date"),
        ("trainer:\n  seed: 99999999999999999999\n", r"trainer.seed: .*less than or equal to"),
    ],
)
def test_odd_yaml_gives_config_error_naming_the_key(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


def test_config_file_that_is_not_utf8_gives_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*UTF-8"):
        load_config(write(tmp_path, b"trainer:\n  epochs: \xff\xfe\n"))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["a..b=1"], r"override 'a\.\.b=1': expected dotted.key=value"),
        (["=3"], r"expected dotted.key=value"),
        (["trainer=3"], r"trainer: must be a section .*--set trainer.KEY=VALUE"),
        (["strategy=null"], r"strategy: must be a section"),
        (
            ["trainer=3", "trainer.epochs=2"],
            r"'trainer' is a value \(3\), not a section, so it has no key 'epochs'",
        ),
        (["trainer.epochs=[1"], r"the value is not valid YAML"),
        (["trainer.epochs=" + "[" * 1200], r"the value is not valid YAML"),
        (["1=2"], r"unknown key '1'; allowed here: checkpoint, data"),
    ],
)
def test_odd_overrides_give_config_error(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


# -- values and combinations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("trainer.timeout_seconds=.inf", "trainer.timeout_seconds"),
        ("trainer.grad_clip_norm=.inf", "trainer.grad_clip_norm"),
        ("strategy.poll_interval_seconds=.inf", "strategy.poll_interval_seconds"),
    ],
)
def test_non_finite_floats_are_rejected(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
        load_config(None, [override])


def test_warmup_plus_cooldown_over_epochs_has_no_top_level_prefix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.epochs=5"])
    assert str(err.value).startswith("<defaults>: strategy.warmup_windows (4)"), str(err.value)


@pytest.mark.parametrize(
    "milestones, pattern",
    [
        ("[]", r"'multistep' but optim.milestones is empty"),
        ("[5, 3]", r"optim.milestones \[5, 3\] must be strictly increasing"),
        ("[3, 3]", r"must be strictly increasing"),
        ("[2, 10]", r"\[10\] outside 1\.\.9 \(trainer.epochs is 10\)"),
        ("[0, 5]", r"\[0\] outside 1\.\.9"),
        ("[-1]", r"\[-1\] outside 1\.\.9"),
    ],
)
def test_multistep_milestones_must_increase_within_epochs(milestones, pattern):
    sets = ["trainer.epochs=10", "optim.scheduler=multistep", f"optim.milestones={milestones}"]
    with pytest.raises(ConfigError, match=pattern):
        load_config(MNIST, sets)


def test_valid_milestones_and_step_size_beyond_epochs_are_fine():
    base = ["trainer.epochs=10"]
    assert load_config(MNIST, [*base, "optim.scheduler=multistep", "optim.milestones=[3, 9]"])
    assert load_config(MNIST, [*base, "optim.scheduler=step", "optim.step_size=50"])
    # milestones are ignored (and not checked) by the other schedulers
    assert load_config(MNIST, [*base, "optim.scheduler=cosine", "optim.milestones=[99]"])


def test_cifar_config_shortened_without_moving_milestones_is_refused():
    with pytest.raises(ConfigError, match=r"optim.milestones \[100, 150\]: \[150\] outside"):
        load_config(ROOT / "configs/cifar10_resnet20_daso.yaml", ["trainer.epochs=120"])


@pytest.mark.parametrize(
    "sets, pattern",
    [
        (
            ["model.name=mnist_cnn", "data.name=cifar10", "data.root=x"],
            r"model.name 'mnist_cnn' takes 1-channel 28x28 MNIST images but data.name is 'cifar10'",
        ),
        (
            ["model.name=resnet20", "data.name=mnist"],
            r"model.name 'resnet20' takes 3-channel images but data.name is 'mnist'",
        ),
        (
            ["model.name=resnet20", "data.name=imagefolder"],
            r"data.root is required for data.name='imagefolder'; set it to the folder",
        ),
    ],
)
def test_inconsistent_model_and_data(sets, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(MNIST, sets)


# -- world size and data size -----------------------------------------------------------------


def test_check_launch_batch_larger_than_each_ranks_share():
    config = load_config(MNIST, ["data.batch_size=32", "data.train_subset=100"])
    check_launch(config, world_size=3, train_size=100)  # 33 per rank: one full batch
    with pytest.raises(ConfigError) as err:
        check_launch(config, world_size=4, train_size=100)
    message = str(err.value)
    assert "data.batch_size is 32 per rank" in message
    assert "100 images after data.train_subset" in message
    assert "each of the 4 ranks only 25" in message
    assert "lower data.batch_size to at most 25, use fewer ranks" in message


def test_check_launch_fewer_images_than_ranks():
    config = load_config(MNIST, ["data.batch_size=1"])
    with pytest.raises(ConfigError, match=r"each of the 8 ranks only 0.*; use fewer ranks"):
        check_launch(config, world_size=8, train_size=5)


def test_check_launch_more_classes_in_data_than_model_outputs():
    config = load_config(MNIST, ["model.num_classes=5"])
    with pytest.raises(ConfigError, match=r"10 classes but model.num_classes is 5; set model"):
        check_launch(config, world_size=1, train_size=8000, num_classes=10)
    check_launch(config, world_size=1, train_size=8000, num_classes=5)


# -- data paths -------------------------------------------------------------------------------


def _data_config(tmp_path: Path, name: str, root: Path):
    model = "mnist_cnn" if name == "mnist" else "resnet20"
    return load_config(
        None,
        [f"data.name={name}", f"data.root={root}", f"model.name={model}"]
        + [f"data.cache_dir={tmp_path / 'cache'}"],
    )


@pytest.mark.parametrize(
    "name, make, pattern",
    [
        ("mnist", lambda t: t / "missing", r"MNIST root .*missing is not a folder"),
        ("mnist", lambda t: t / "empty", r"no MNIST images-idx3 file .* in .*empty"),
        ("cifar10", lambda t: t / "missing", r"image data path .*missing does not exist"),
        ("cifar10", lambda t: t / "empty", r"empty holds no split folders; expected"),
        ("cifar10", lambda t: t / "flat", r"split folder .*flat/\w+ has no class folders"),
        ("imagefolder", lambda t: t / "noimages", r"class folder .*cat holds no .jpg/.jpeg/.png"),
        ("cifar10", lambda t: t / "bad.tar.gz", r"(?s)cannot read .*bad.tar.gz.*re-copy it"),
    ],
)
def test_missing_or_empty_data_path_is_a_data_error_naming_it(tmp_path, name, make, pattern):
    (tmp_path / "empty").mkdir()
    for split in ("train", "test"):
        (tmp_path / "flat" / split).mkdir(parents=True)
        (tmp_path / "flat" / split / "a.jpg").write_bytes(b"\xff\xd8")
        (tmp_path / "noimages" / split / "cat").mkdir(parents=True)
        (tmp_path / "noimages" / split / "cat" / "notes.txt").write_text("no images here")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=pattern):
        build_datasets(_data_config(tmp_path, name, make(tmp_path)))


# -- the command line -------------------------------------------------------------------------


def _run_train(tmp_path: Path, config: Path, *sets: str, env: dict[str, str] | None = None):
    output = tmp_path / "out"
    args = train_args(config, output, *sets)
    started = time.monotonic()
    result = subprocess.run(
        args, cwd=tmp_path, env=env or mpi_env(None), capture_output=True, text=True, timeout=120
    )
    return result, output, time.monotonic() - started


def _assert_nothing_written(tmp_path: Path, output: Path) -> None:
    assert not output.exists(), "the output folder was created for bad input"
    assert not (tmp_path / "runs").exists()
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".ckpt", ".jsonl", ".tmp")]
    assert written == [], written


@pytest.mark.parametrize(
    "text, sets, message",
    [
        ("trainer:\n  epochs: 3\n    seed: 1\n", [], "malformed YAML at line 3, column 9"),
        ("strategy:\n  name: ddp\n  period: 4\n", [], "unknown key 'strategy.period'"),
        ("trainer:\n  epochs: many\n", [], "trainer.epochs: must be an integer, got the text"),
        ("data:\n  batch_size: 0\n", [], "data.batch_size: Input should be greater than"),
        ("trainer:\n  epochs: 5\n", [], "strategy.warmup_windows (4) + strategy.cooldown"),
        ("model: 5\n", [], "model: must be a section"),
        ("trainer: 5\n", [], "'trainer' is a value (5), not a section, so it has no key"),
        ("{}\n", ["a..b=1"], "expected dotted.key=value"),
        ("data:\n  root: /nonexistent/mnist\n", [], "MNIST root /nonexistent/mnist is not"),
        (
            "data:\n  batch_size: 64\n  train_subset: 10\n",
            [],
            "data.batch_size is 64 per rank, but the training set (10 images",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_message_and_writes_nothing(tmp_path, text, sets, message):
    config = write(tmp_path, text, "bad.yaml")
    result, output, _ = _run_train(tmp_path, config, *sets)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    _assert_nothing_written(tmp_path, output)


def test_cli_batch_too_large_for_launcher_world_size_exits_2_before_any_group(tmp_path):
    """A torchrun-style environment says 4 ranks; the check fails before init_distributed
    (which would wait for the 3 ranks that do not exist)."""
    env = mpi_env(None)
    env.update(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="4")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # nothing listens there
    result, output, seconds = _run_train(
        tmp_path, MNIST, "data.batch_size=32", "data.train_subset=100", env=env
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "gives each of the 4 ranks only 25" in result.stderr, result.stderr
    assert "lower data.batch_size to at most 25" in result.stderr
    assert seconds < 60
    _assert_nothing_written(tmp_path, output)


@pytest.mark.multiprocess
def test_cli_bad_config_under_mpiexec_every_rank_exits_2_quickly(tmp_path):
    config = write(tmp_path, "strategy:\n  name: ddp\n  bogus: 1\n", "bad.yaml")
    output = tmp_path / "out"
    started = time.monotonic()
    result = run_command(train_args(config, output), 2, None, timeout=90, cwd=tmp_path)
    seconds = time.monotonic() - started
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert result.stderr.count("unknown key 'strategy.bogus'") == 1, result.stderr  # rank 0 only
    assert seconds < 60, seconds
    _assert_nothing_written(tmp_path, output)
    assert os.listdir(tmp_path) == ["bad.yaml"]


def test_cli_schedule_longer_than_the_windows_exits_2_before_training(tmp_path):
    """With window_steps the run's windows are known once the data is: 125 steps in windows of
    70 are 2 windows, too few for 2 + 2 blocking ones; every rank stops before the first step."""
    output = tmp_path / "out"
    overrides = [
        "trainer.epochs=1",
        "strategy.window_steps=70",
        "strategy.warmup_windows=2",
        "strategy.cooldown_windows=2",
    ]
    args = train_args("mnist_cnn_daso.yaml", output, *overrides)
    result = run_command(args, 2, "1", timeout=90)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert result.stderr.count("exceeds the run's 2 windows") == 1, result.stderr
    assert "window_steps" in result.stderr
    assert not (output / "metrics.jsonl").exists()


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_cli_stop_at_epoch_must_be_a_positive_count(tmp_path, value):
    config = ROOT / "configs" / "mnist_cnn_ddp.yaml"
    args = [*train_args(config, tmp_path / "out"), "--stop-at-epoch", value]
    result = subprocess.run(args, cwd=tmp_path, env=mpi_env(None), capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{value!r} is not a number of epochs >= 1" in result.stderr
