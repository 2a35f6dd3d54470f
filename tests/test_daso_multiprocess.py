"""Multi-process tests of DASO (4 ranks under mpiexec, Gloo + MPI, CPU).

They check numbers: the merge against its formula, bitwise consistency across ranks, that a
non-blocking sync progresses while the caller computes, and accuracy on real MNIST.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpi_harness import (
    MNIST_ACCURACY_BOUND,
    MNIST_EPOCHS,
    run_ranks,
    share_job,
    train_cli,
)

pytestmark = pytest.mark.multiprocess


def bf16(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.bfloat16).double().numpy()


MERGE_LAYOUTS = [(4, "2"), (4, "1"), (3, "2,1")]
for _n, _layout in MERGE_LAYOUTS:
    share_job(_n, _layout, "merge", {})
share_job(4, "2", "consistency", {})


@pytest.mark.parametrize("n, layout", MERGE_LAYOUTS)
def test_merge_matches_formula_w0_w1_w2(shared_job, n, layout):
    """mean = a + sum_n (x_sent_n - a) / N, x <- (2W x_local + N mean) / (2W + N), computed
    here in float64 with NumPy from the anchor a; 16-bit rounding bounded by the deltas."""
    results = shared_job(n, layout, "merge")
    topo = [r["topology"] for r in results]
    num_nodes = topo[0]["num_nodes"]
    senders = {t["node"]: t["node_ranks"][0] for t in topo}  # first send: local rank 0
    for case_index, case in enumerate(results[0]["cases"]):
        w, downcast = case["w"], case["downcast"]
        cases = [r["cases"][case_index] for r in results]
        anchor = cases[0]["anchor"].double().numpy()
        for rank in range(n):  # the anchor is the same on every rank
            np.testing.assert_array_equal(cases[rank]["anchor"].numpy(), anchor)
        deltas = [
            cases[senders[node]]["sent"].double().numpy() - anchor for node in range(num_nodes)
        ]
        mean = anchor + sum(deltas) / num_nodes
        magnitude = sum(np.abs(d) for d in deltas)
        for rank, t in enumerate(topo):
            local = cases[senders[t["node"]]]["local"].double().numpy()
            expected = (2 * w * local + num_nodes * mean) / (2 * w + num_nodes)
            got = cases[rank]["final"].double().numpy()
            if downcast == "float32":
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
            else:  # each delta and each partial sum is rounded to 8 bits (unit roundoff 2^-8)
                tol = 2.0**-8 * magnitude * num_nodes / (2 * w + num_nodes) + 1e-6
                assert np.all(np.abs(got - expected) <= tol), (downcast, w, rank)
        # every rank of a node holds its sender's merged values, bit for bit
        for rank, t in enumerate(topo):
            assert torch.equal(cases[rank]["final"], cases[senders[t["node"]]]["final"])


def test_parameters_bitwise_identical_after_every_epoch(shared_job):
    """Whole model state + optimizer state equal on all ranks after each epoch; parameters
    equal within a node on every batch of an epoch whose batches all sync node-locally."""
    results = shared_job(4, "2", "consistency")
    epochs = [r["epochs"] for r in results]
    assert len(epochs[0]) == 6
    for e in range(6):
        assert len({ranks[e] for ranks in epochs}) == 1, f"ranks differ after epoch {e}"
    skips = [row["global_skips"] for row in results[0]["history"]]
    assert skips == [4, 4, 2, 1, 8, 0], skips  # the schedule really cycled
    # sends, merges and blocking averages per epoch, counted from the schedule: a send on every
    # batch b < B - 1 with b % S == 0, each merged within the epoch, one blocking average at the
    # epoch end; a blocking epoch averages after every batch. The cycling sends go as float32
    # (4 bytes an element, cycling_downcast), the blocking averages as bfloat16 (2 bytes):
    # P model elements per send and per node, the model and the optimizer state (Q) at the
    # epoch end; cross_node_bytes sums all ranks (2 nodes).
    num_batches, synced, optimizer = 16, results[0]["synced_numel"], results[0]["optimizer_numel"]
    for row in results[0]["history"]:
        s = row["global_skips"]
        sends = len([b for b in range(num_batches - 1) if b % s == 0]) if s else 0
        blocking = 1 if s else num_batches
        assert (row["sends"], row["merges"], row["blocking_averages"]) == (sends, sends, blocking)
        nbytes = 4 * synced * sends + 2 * (synced * blocking + optimizer)
        assert row["cross_node_bytes"] == 2 * nbytes, (row, nbytes)
    checked = skipped_differs = 0
    for i, row in enumerate(results[0]["batches"]):
        for node_ranks in ([0, 1], [2, 3]):
            digests = {results[r]["batches"][i]["params"] for r in node_ranks}
            if row["local_skips"] == 1:
                assert len(digests) == 1, f"node {node_ranks} differs at {row}"
                checked += 1
            elif not row["local_sync"] and len(digests) > 1:
                skipped_differs += 1
    assert checked > 50
    # with local_skips = 2, a skipped node-local sync really leaves the ranks apart
    assert skipped_differs > 0


def test_nonblocking_sync_progresses_while_computing(tmp_path):
    """The sum completes while the main thread only computes (no MPI call), for both
    progress modes, and equals 1 + 2 (two nodes)."""
    results = run_ranks("progress", 2, "1", tmp_path)
    for rank_result in results:
        for case in rank_result["results"]:
            assert case["done_before_wait"], case
            assert case["sum"] == 3.0 and case["all_equal"], case


@pytest.mark.parametrize("label", ["ddp", "daso", "daso+nesterov", "hierarchical", "local_sgd"])
def test_trains_real_mnist_2_nodes_x_2_ranks(mnist_runs, label):
    """The demo configs (``mnist_runs``: daso with one warm-up and one cool-down epoch;
    ``daso+nesterov`` with DiLoCo's outer step on the cycling syncs)."""
    rows = mnist_runs[label]
    assert [r["epoch"] for r in rows] == list(range(MNIST_EPOCHS))
    assert rows[-1]["val_accuracy"] >= MNIST_ACCURACY_BOUND, rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["cross_node_bytes"] > 0 for r in rows)
    if "daso" in label:
        assert [r["global_skips"] for r in rows][:2] == [0, 4]


def test_one_epoch_with_window_steps_goes_through_the_whole_schedule(mnist_runs):
    """62 steps cut into windows of 4: warm-up, cycling with plateaus (global_skips changes)
    and cool-down, all inside one epoch; every window's row is in the epoch's row (the
    ``daso_window_steps`` run of ``mnist_runs``)."""
    rows = mnist_runs["daso_window_steps"]
    windows = rows[0]["windows"]
    assert [w["window"] for w in windows] == list(range(16))  # ceil(62 / 4)
    phases = [w["phase"] for w in windows]
    assert phases == ["warmup"] * 2 + ["cycling"] * 12 + ["cooldown"] * 2
    cycling = [w["global_skips"] for w in windows if w["phase"] == "cycling"]
    assert cycling[0] == 2 and len(set(cycling)) > 1, cycling  # plateaus changed it
    assert all(w["global_skips"] == 0 for w in windows if w["phase"] != "cycling")
    assert sum(w["sends"] for w in windows) == rows[0]["sends"] > 0
    assert rows[0]["val_accuracy"] > 0.9


@pytest.mark.parametrize("n, layout", [(3, "2,1"), (2, "1"), (1, None)])
def test_daso_trains_on_uneven_single_rank_and_single_process_layouts(tmp_path, n, layout):
    rows = train_cli(
        tmp_path,
        "mnist_cnn_daso.yaml",
        n,
        layout,
        "trainer.epochs=2",
        "strategy.warmup_windows=1",
        "strategy.cooldown_windows=0",
        "data.train_subset=3000",
    )
    assert len(rows) == 2 and rows[-1]["val_accuracy"] > 0.85, rows
    assert (rows[0]["cross_node_bytes"] > 0) == (n > 1)
