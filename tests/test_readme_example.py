"""The README's wrap-your-own-model example runs, alone and on 2 emulated nodes x 2 ranks."""

from __future__ import annotations

import json
import re
import sys

import pytest

from mpi_harness import ROOT, run_command


def readme_block(marker: str) -> str:
    """The Python block between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``."""
    readme = (ROOT / "README.md").read_text()
    pattern = rf"<!-- {marker}:begin -->\n```python\n(.*?)```\n<!-- {marker}:end -->"
    block = re.search(pattern, readme, re.S)
    assert block, f"README lacks the {marker} example"
    return block.group(1)


def example(tmp_path):
    path = tmp_path / "example.py"
    path.write_text(readme_block("example"))
    return path


@pytest.mark.parametrize("n, layout", [(1, None), (4, "2")])
def test_readme_example_trains(tmp_path, n, layout):
    result = run_command([sys.executable, str(example(tmp_path))], n, layout, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    accuracy = float(re.search(r"val accuracy ([0-9.]+)", result.stdout).group(1))
    assert accuracy > 0.85, result.stdout


#: Prepended to the own-loop example: records, at every window's close, the window's loss and
#: a digest of the rank's parameters, written to ``<record>.<rank>`` at exit.
RECORDER = """
import atexit as _atexit, hashlib as _hashlib, json as _json, os as _os
import daso.distributed as _distributed

_rows, _step = [], _distributed.Distributed.step


def _recording_step(self):
    row = _step(self)
    if row is not None:
        digest = _hashlib.sha256()
        for tensor in self.module.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        _rows.append({{"window": row["window"], "phase": row["phase"],
                       "loss": row["train_loss"], "digest": digest.hexdigest()}})
    return row


_distributed.Distributed.step = _recording_step
_atexit.register(lambda: open("{record}." + _os.environ.get("PMI_RANK", "0"), "w").write(
    _json.dumps(_rows)))
"""


def own_loop(tmp_path):
    path = tmp_path / "own_loop.py"
    path.write_text(RECORDER.format(record=tmp_path / "record") + readme_block("own-loop"))
    return path


@pytest.mark.parametrize("n, layout", [(1, None), (4, "2")])
def test_readme_own_loop_example_trains_with_identical_ranks_at_window_ends(tmp_path, n, layout):
    result = run_command([sys.executable, str(own_loop(tmp_path))], n, layout, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads((tmp_path / f"record.{r}").read_text()) for r in range(n)]
    windows = records[0]
    assert [w["window"] for w in windows] == list(range(5))
    assert {w["phase"] for w in windows} == {"warmup", "cycling", "cooldown"}
    assert windows[-1]["loss"] < windows[0]["loss"] - 0.5, windows
    for rank in records[1:]:  # every rank ends every window with the same parameters
        assert [w["digest"] for w in rank] == [w["digest"] for w in windows]
    assert "window 4 cooldown" in result.stdout
