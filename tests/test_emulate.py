"""The emulated cluster: namespaces with host names, a rate-limited link whose kernel counters
agree with the bytes strategies report, and teardown on exit, Ctrl-C and failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from daso.emulate import EmulationUnavailable, check_available, leftovers, rate_bits_per_second

from mpi_harness import ROOT

CAN_EMULATE = os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "tc", "unshare"))
needs_root = pytest.mark.skipif(not CAN_EMULATE, reason="needs root and iproute2")
DASO = [sys.executable, "-m", "daso.cli"]


@pytest.mark.parametrize(
    "rate, bps",
    [("unlimited", None), ("200mbit", 2e8), ("1gbit", 1e9), ("50mbit", 5e7), ("1.5kbit", 1500.0)],
)
def test_rate_parsing(rate, bps):
    assert rate_bits_per_second(rate) == bps


def test_bad_rate_is_a_clear_error():
    with pytest.raises(ValueError, match="use 'unlimited' or a number with bit"):
        rate_bits_per_second("200MB/s")


def test_without_root_it_says_so_and_offers_the_override_mode(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationUnavailable, match="must run as root.*DASO_RANKS_PER_NODE"):
        check_available()


def emulate(prefix, *args, timeout=300):
    return subprocess.run(
        [*DASO, "emulate", "--prefix", prefix, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@needs_root
def test_info_finds_nodes_from_hostnames_and_tears_down():
    result = emulate(
        "dasotinfo", "--nodes", "2", "--ranks-per-node", "2", "--rate", "1gbit", "--", "info"
    )
    assert result.returncode == 0, result.stderr
    assert "2 node(s), ranks per node [2, 2], world size 4" in result.stdout
    for rank, node in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert f"rank {rank}/4 host dasotinfo-node{node} node {node}/2" in result.stdout
    assert result.stdout.count("(layout from hostname)") == 4  # no override
    assert leftovers("dasotinfo") == []


@needs_root
def test_daso_training_link_counters_match_reported_bytes(tmp_path):
    counters = tmp_path / "link.json"
    result = emulate(
        "dasottrain",
        "--nodes",
        "2",
        "--ranks-per-node",
        "2",
        "--rate",
        "200mbit",
        "--counters",
        str(counters),
        "--",
        "train",
        "--config",
        str(ROOT / "configs/mnist_cnn_daso.yaml"),
        "--set",
        "trainer.epochs=2",
        "--set",
        "strategy.warmup_windows=1",
        "--set",
        "strategy.cooldown_windows=0",
        "--set",
        "trainer.progress=false",
        "--set",
        f"trainer.output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    link = json.loads(counters.read_text())
    assert link["hostnames"] == ["dasottrain-node0", "dasottrain-node1"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reported = sum(row["cross_node_bytes"] for row in rows)
    sent = sum(link["tx_bytes"])
    # within 10%: TCP/IP headers, the initial weight broadcast and the loss reductions are the
    # only extra cross-node bytes
    assert 0.9 * reported <= sent <= 1.1 * reported, (sent, reported)
    # node-local gradient averaging (DDP inside each node, every batch, float32) would be far
    # more than that: 2 ranks x 2 nodes x batches x parameters x 4 bytes
    params = 80_218
    batches = 2 * 63
    assert sent < 0.5 * (4 * batches * params * 4)
    assert leftovers("dasottrain") == []


@needs_root
def test_teardown_on_ctrl_c():
    proc = subprocess.Popen(
        [
            *DASO,
            "emulate",
            "--prefix",
            "dasotint",
            "--nodes",
            "2",
            "--ranks-per-node",
            "1",
            "--",
            "sleep",
            "60",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        n.startswith("dasotint") for n in leftovers("dasotint")
    ):
        time.sleep(0.2)
    time.sleep(2)  # let mpiexec start the ranks inside the namespaces
    assert leftovers("dasotint"), "the cluster never came up"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert leftovers("dasotint") == []
    assert subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True).stdout == b""


@needs_root
def test_teardown_on_failure():
    result = emulate("dasotfail", "--nodes", "2", "--ranks-per-node", "1", "--", "false")
    assert result.returncode != 0
    assert leftovers("dasotfail") == []
