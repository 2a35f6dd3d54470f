"""The delta wire over float32 anchors, on the real averager (4 ranks, 2 nodes x 2, mpiexec).

Every expectation is computed here with NumPy from the values the ranks recorded
(``mpi_worker.scenario_anchor`` and ``scenario_finetune``), never from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpi_harness import share_job

pytestmark = pytest.mark.multiprocess

NUM_NODES, LOCAL = 2, 2


share_job(4, "2", "anchor", {})
share_job(4, "2", "finetune", {})


@pytest.fixture(scope="module")
def anchor_results(shared_job):
    return shared_job(4, "2", "anchor")


def ranks_of(node: int) -> list[int]:
    return [node * LOCAL + i for i in range(LOCAL)]


def test_small_updates_survive_100_blocking_averages_over_bfloat16(anchor_results):
    """Two nodes at 0.05 adding 5e-5 per step: 100 averages must move the weight by 5e-3
    (sending the weight itself in bfloat16 moves it by 4.9e-5)."""
    for result in anchor_results:
        moved = result["drift"]["bfloat16"].double().numpy() - 0.05
        assert np.all(moved >= 0.99 * 5e-3), moved.min()
        reference = result["drift"]["float32"].double().numpy() - 0.05
        np.testing.assert_allclose(reference, 5e-3, rtol=1e-3)


def test_bfloat16_error_is_relative_to_the_update_not_the_weight(anchor_results):
    """Weights of 1000 with node updates of ~1e-3: the bfloat16 and float32 averages differ by
    at most about 2^-8 max|delta| per element (a bfloat16 weight would be off by ~2)."""
    deltas = [anchor_results[ranks_of(n)[0]]["large"]["bfloat16"]["delta"] for n in range(2)]
    deltas = np.stack([d.double().numpy() for d in deltas])
    expected = 1000.0 + deltas.mean(axis=0)
    bound = 2.0**-8 * np.abs(deltas).max(axis=0) * NUM_NODES + 2e-4  # + float32 ulp of 1000
    for result in anchor_results:
        bf16 = result["large"]["bfloat16"]["final"].double().numpy()
        fp32 = result["large"]["float32"]["final"].double().numpy()
        np.testing.assert_allclose(fp32, expected, rtol=0, atol=2e-4)
        assert np.all(np.abs(bf16 - fp32) <= bound), np.abs(bf16 - fp32).max()


def test_epoch_end_average_is_the_mean_over_all_ranks_when_node_ranks_differ(anchor_results):
    """After a batch without node-local sync every rank holds its own state; the epoch-end
    average must equal the mean over all four ranks (equal nodes), BatchNorm buffers too."""
    states = np.stack([r["epoch_end"]["mine"].double().numpy() for r in anchor_results])
    expected = states.mean(axis=0)
    for result in anchor_results:
        got = result["epoch_end"]["final"].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def outer_step(anchor, mean, buffer, lr, momentum):
    """SGD with Nesterov momentum on the anchor along the pseudo-gradient anchor - mean."""
    grad = anchor - mean
    buffer = momentum * buffer + grad
    return anchor - lr * (grad + momentum * buffer), buffer


@pytest.mark.parametrize(
    "case", [0, 1, 2, 3], ids=["none", "nesterov_1_0", "nesterov_07_09", "nesterov_progress"]
)
def test_senders_rotate_and_merges_follow_the_formula(anchor_results, case):
    """Send i is taken by local rank i % 2 of every node (the ranks hold different values, so
    a fixed sender would fail); mean = a + sum_n (x_sent - a) / N, the anchor advances by the
    outer step on the parameters (buffers: the mean), and x <- (2W x_local + N a) / (2W + N),
    W = 1 (merge "staleness") or x <- a + (x_local - x_sent) (merge "progress")."""
    runs = [r["rotation"][case] for r in anchor_results]
    name, lr, momentum, rule = runs[0]["outer"]
    params = runs[0]["param_numel"]
    anchor = runs[0]["initial_anchor"].double().numpy()
    buffer = np.zeros_like(anchor)
    for i in range(4):
        sender = i % LOCAL
        sent = [runs[ranks_of(n)[sender]]["sends"][i]["sent"].double().numpy() for n in range(2)]
        mean = anchor + sum(s - anchor for s in sent) / NUM_NODES
        if name == "none":
            anchor = mean
        else:
            stepped, buffer[:params] = outer_step(
                anchor[:params], mean[:params], buffer[:params], lr, momentum
            )
            anchor = np.concatenate([stepped, mean[params:]])
        for rank in range(NUM_NODES * LOCAL):  # every rank merges its own state
            got = runs[rank]["sends"][i]
            local = got["local"].double().numpy()
            if rule == "staleness":
                expected = (2 * local + NUM_NODES * anchor) / (2 + NUM_NODES)
            else:  # its own progress since the send, laid on the new anchor
                expected = anchor + local - got["sent"].double().numpy()
            np.testing.assert_allclose(got["anchor"].double().numpy(), anchor, atol=1e-5)
            np.testing.assert_allclose(
                got["final"].double().numpy(), expected, atol=1e-5, err_msg=f"rank {rank}"
            )
        # one node-local broadcast per merge: the float32 sum, never the state again
        for run in runs:
            assert run["sends"][i]["broadcasts"] == [anchor.size], run["sends"][i]["broadcasts"]


def test_one_outer_step_on_the_last_step_of_a_window(anchor_results):
    """A merge due on a window's last step takes the plain mean and the window-end average the
    outer step, so that step takes one outer step (not two back to back); with
    ``outer_step_at: window_end`` the window takes one outer step in all."""
    for result in anchor_results:
        steps = result["outer_steps"]
        assert steps["every_sync"] == {"outer_steps": 2, "merges": 2}
        assert steps["window_end"] == {"outer_steps": 1, "merges": 2}


def test_sync_momentum_sends_and_merges_the_momentum_buffers(anchor_results):
    """With ``sync_momentum`` the send carries [x - a | m] (float32 in cycling); on the merge
    every rank takes x <- a' + (x - x_sent) and m <- mean_m + (m - m_sent), the means over the
    senders of both nodes (local rank 0 sends first)."""
    senders = [ranks_of(n)[0] for n in range(NUM_NODES)]
    runs = [r["sync_momentum"] for r in anchor_results]
    anchor = runs[0]["anchor"].double().numpy()
    mean = anchor + sum(runs[r]["sent"].double().numpy() - anchor for r in senders) / NUM_NODES
    mean_m = sum(runs[r]["sent_momentum"].double().numpy() for r in senders) / NUM_NODES
    state, moments = runs[0]["numel"]
    for run in runs:
        local, sent = run["local"].double().numpy(), run["sent"].double().numpy()
        expected = mean + local - sent
        np.testing.assert_allclose(run["final"].double().numpy(), expected, atol=1e-5)
        m = run["local_momentum"].double().numpy() - run["sent_momentum"].double().numpy()
        np.testing.assert_allclose(run["final_momentum"].double().numpy(), mean_m + m, atol=1e-5)
    # each sender hands P + Q float32 elements to MPI once
    assert sum(run["bytes"] for run in runs) == NUM_NODES * (state + moments) * 4


def test_outer_lr_1_momentum_0_equals_the_plain_average(anchor_results):
    for result in anchor_results:
        plain, outer = result["rotation"][0]["sends"], result["rotation"][1]["sends"]
        for a, b in zip(plain, outer):
            np.testing.assert_allclose(b["final"].numpy(), a["final"].numpy(), atol=1e-6)


def test_fine_tuning_below_half_a_bfloat16_ulp_still_learns(shared_job):
    """From a trained model, updates ~1e-4 of weights ~2 (half an ulp: 2^-8): the bfloat16
    delta wire lowers the loss like the float32 wire and ends at nearly the same weights."""
    results = shared_job(4, "2", "finetune")
    for result in results:
        bf16, fp32 = result["runs"]["bfloat16"], result["runs"]["float32"]
        trained = result["trained"].double().numpy()
        assert bf16["max_update"] < 2.0**-8  # far below half a bfloat16 ulp of the weights
        gain_fp32 = fp32["losses"][0] - fp32["final_loss"]
        gain_bf16 = bf16["losses"][0] - bf16["final_loss"]
        assert gain_fp32 > 0.2 * fp32["losses"][0]
        assert gain_bf16 >= 0.9 * gain_fp32, (gain_bf16, gain_fp32)
        moved_fp32 = fp32["weight"].double().numpy() - trained
        moved_bf16 = bf16["weight"].double().numpy() - trained
        assert np.abs(moved_bf16 - moved_fp32).max() <= 0.05 * np.abs(moved_fp32).max()
