"""Horovod against ddp, and on real MNIST. Needs Horovod (``make horovod``).

Without Horovod these tests skip, unless ``DASO_REQUIRE_HOROVOD=1`` (set by ``.ci/run``), where
a missing Horovod is a failure: CI must prove the row works.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from mpi_harness import MNIST_ACCURACY_BOUND, MNIST_EPOCHS, run_command, run_ranks, train_cli

HAVE_HOROVOD = importlib.util.find_spec("horovod") is not None
REQUIRED = os.environ.get("DASO_REQUIRE_HOROVOD") == "1"

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(
        not HAVE_HOROVOD and not REQUIRED, reason="Horovod not installed: run `make horovod`"
    ),
]

STEPS = 8


def test_horovod_is_installed():
    assert HAVE_HOROVOD, "DASO_REQUIRE_HOROVOD=1 but Horovod is missing: run `make horovod`"


def test_horovod_equals_ddp_after_every_step(tmp_path):
    results = run_ranks(
        "equivalence",
        4,
        "2",
        tmp_path,
        {"strategies": [("ddp", "ddp", {}), ("horovod", "horovod", {})], "steps": STEPS},
    )
    for result in results:
        runs = result["runs"]
        for got, want in zip(runs["horovod"]["trace"], runs["ddp"]["trace"]):
            assert float((got - want).norm() / want.norm()) < 1e-5
    numel = results[0]["runs"]["ddp"]["numel"]
    sent = sum(r["runs"]["horovod"]["metrics"]["cross_node_bytes"] for r in results)
    assert sent == STEPS * 4 * numel * 4  # every rank hands its float32 gradient every step
    assert torch.equal(
        results[0]["runs"]["horovod"]["trace"][-1], results[3]["runs"]["horovod"]["trace"][-1]
    )


def test_horovod_trains_real_mnist(tmp_path):
    rows = train_cli(tmp_path, "mnist_cnn_horovod.yaml", 4, "2", f"trainer.epochs={MNIST_EPOCHS}")
    assert rows[-1]["val_accuracy"] >= MNIST_ACCURACY_BOUND, rows[-1]
    assert all(r["cross_node_bytes"] > 0 and r["strategy"] == "horovod" for r in rows)


def test_selecting_horovod_without_it_is_a_clear_error(tmp_path):
    # hide horovod from the child: an empty package named horovod, first on sys.path, shadows
    # the real one, so `import horovod.torch` fails as it does where Horovod is not installed
    fake = tmp_path / "fake" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    result = run_command(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(fake.parent)!r}); "
            "from daso.cli import main; sys.exit(main(['train', '--config', "
            "'configs/mnist_cnn_horovod.yaml']))",
        ],
        1,
        None,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "make horovod" in result.stderr and "not installed" in result.stderr
