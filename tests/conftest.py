"""Make the shared multi-process harness importable as ``mpi_harness``; fixtures shared by
several test modules."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mpi_harness import MNIST_EPOCHS, train_cli  # noqa: E402


@pytest.fixture(scope="session")
def mnist_ddp_rows(tmp_path_factory):
    """Metric rows of ddp on real MNIST, 2 emulated nodes x 2 ranks: the baseline that the
    MNIST accuracy tests of several modules share (trained once per session)."""
    out = tmp_path_factory.mktemp("mnist_ddp")
    return train_cli(out, "mnist_cnn_ddp.yaml", 4, "2", f"trainer.epochs={MNIST_EPOCHS}")
