"""Config files are untrusted input: bounded in size, alias expansion and time. An alias bomb, a
file of many megabytes, a 5,000-digit integer or ten thousand unknown keys each end at once with
one ``ConfigError``; a fuzz test over generated hostile YAML checks the time and memory bounds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from daso.config import MAX_CONFIG_BYTES, _short_repr, load_config
from daso.errors import ConfigError


def alias_bomb(levels: int, fanout: int, key: str = "extra") -> str:
    """Anchors of anchors: level ``n`` refers ``fanout`` times to level ``n - 1``, so the
    document expands to ``fanout ** levels`` values (the shape of the "billion laughs")."""
    lines = [f"  l0: &l0 [{', '.join(['1'] * fanout)}]"]
    for n in range(1, levels):
        lines.append(f"  l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * fanout)}]")
    return f"trainer:\n  epochs: 8\n{key}:\n" + "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9, 9))  # 9 ** 9 = 387 million values, in 500 bytes
    assert path.stat().st_size < 600
    began = time.monotonic()
    expected = r"aliases \(\*l\d and the ones before it\) expand to more than 10000 values"
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert time.monotonic() - began < 1.0
    assert "\n" not in str(err.value)


def test_a_few_aliases_for_reuse_still_load(tmp_path):
    path = tmp_path / "reuse.yaml"
    path.write_text("optim:\n  lr: &lr 0.2\n  momentum: 0.9\ntrainer:\n  epochs: 9\n")
    assert load_config(path).optim.lr == 0.2
    path.write_text(
        "trainer: &t\n  epochs: 9\n  seed: 3\nstrategy:\n  name: ddp\n"
        "data:\n  batch_size: 16\nextra_ok: *t\n"
    )
    with pytest.raises(ConfigError, match="unknown key 'extra_ok'"):  # the alias itself is fine
        load_config(path)


def test_a_file_above_the_size_cap_is_refused_in_one_line(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("w") as handle:
        handle.write("trainer:\n  epochs: 2\n")
        handle.write("# a comment line of padding, many times over\n" * 50_000)  # 2.3 MB
    assert path.stat().st_size > MAX_CONFIG_BYTES
    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"is larger than 1 MB") as err:
        load_config(path)
    assert time.monotonic() - began < 1.0
    assert "\n" not in str(err.value)


def test_a_huge_integer_is_a_config_error(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("trainer:\n  epochs: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="a value cannot be converted"):
        load_config(path)


def test_thousands_of_unknown_keys_name_the_first_few_and_count_the_rest(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("trainer:\n" + "".join(f"  key{i}: 1\n" for i in range(3_000)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 11, lines[:3]
    assert "unknown key 'trainer.key0'" in lines[0]
    assert "and 2990 more problems" in lines[-1]
    path.write_text("trainer:\n" + "".join(f"  key{i}: 1\n" for i in range(10_000)))
    with pytest.raises(ConfigError, match="holds more than 10000 values") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_short_repr_never_builds_the_whole_repr():
    """A structure that shares one list 9 levels deep repr()s to gigabytes; the bounded view
    takes microseconds."""
    value: list = [1] * 9
    for _ in range(9):
        value = [value] * 9
    began = time.monotonic()
    text = _short_repr(value)
    assert time.monotonic() - began < 0.1
    assert len(text) <= 80 and text.startswith("[[[")


def _nested(n: int) -> str:
    return "trainer:\n  epochs: " + "[" * n + "]" * n + "\n"


def _deep_sections(n: int) -> str:
    return "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(n))


def _long_scalar(n: int) -> str:
    return "trainer:\n  output_dir: " + "x" * n + "\n"


def _long_list(n: int) -> str:
    return "trainer:\n  loggers: [" + ", ".join(["jsonl"] * n) + "]\n"


def _many_digits(n: int) -> str:
    return "trainer:\n  seed: " + "7" * n + "\n"


def _many_aliases(n: int) -> str:
    return "data:\n  milestones: &m [1]\n" + "".join(f"  k{i}: *m\n" for i in range(n))


def _hostile_documents() -> st.SearchStrategy[str]:
    """Aliases of aliases, deep nesting, huge scalars, long lists, many aliases."""
    return st.one_of(
        st.builds(
            alias_bomb, st.integers(2, 12), st.integers(2, 12), st.sampled_from(["x", "trainer"])
        ),
        st.builds(_nested, st.integers(1, 3000)),
        st.builds(_deep_sections, st.integers(1, 400)),
        st.builds(_long_scalar, st.integers(1, 1_200_000)),
        st.builds(_long_list, st.integers(1, 200_000)),
        st.builds(_many_digits, st.integers(1, 20_000)),
        st.builds(_many_aliases, st.integers(1, 30_000)),
    )


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # a failure is shown as found: no slow shrinking
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=_hostile_documents())
def test_hostile_yaml_ends_within_2_s_and_200_mb(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("hostile") / "config.yaml"
    path.write_text(text)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (peak RSS) := the current RSS
    began = time.monotonic()
    try:
        load_config(path)
    except ConfigError as err:
        assert str(err)
    elapsed = time.monotonic() - began
    grown = (_status_kb("VmHWM") - before) * 1024
    assert elapsed < 2.0, f"{elapsed:.2f} s for {text[:80]!r}"
    assert grown < 200e6, f"{grown / 1e6:.0f} MB for {text[:80]!r}"


def _status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")
