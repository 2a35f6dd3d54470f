"""The README's wrap-your-own-model example runs, alone and on 2 emulated nodes x 2 ranks."""

from __future__ import annotations

import re
import sys

import pytest

from mpi_harness import ROOT, run_command


def example(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- example:begin -->\n```python\n(.*?)```\n<!-- example:end -->", readme, re.S
    )
    assert block, "README lacks the wrap-your-own-model example"
    path = tmp_path / "example.py"
    path.write_text(block.group(1))
    return path


@pytest.mark.parametrize("n, layout", [(1, None), (4, "2")])
def test_readme_example_trains(tmp_path, n, layout):
    result = run_command([sys.executable, str(example(tmp_path))], n, layout, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"val accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy > 0.85, result.stdout
