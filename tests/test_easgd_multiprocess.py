"""EASGD across emulated nodes: the synchronous elastic step against the paper's formula
(eqs. 5-6) from gathered pre-step values, identical centers, and real MNIST accuracy of all
four EASGD-paper strategies (easgd, eamsgd, async_easgd, downpour) against ddp's."""

from __future__ import annotations

import pytest
import torch

from mpi_harness import share_job

pytestmark = pytest.mark.multiprocess
STEPS = 6


LAYOUTS = [(4, "2"), (4, "1")]
for _n, _layout in LAYOUTS:
    share_job(
        _n,
        _layout,
        "easgd_equivalence",
        {"scenario": "equivalence", "strategies": [("easgd", "easgd", {})], "steps": STEPS},
    )


@pytest.mark.parametrize("n, layout", LAYOUTS, ids=["2x2", "4x1"])
def test_elastic_step_matches_formula_and_centers_agree(shared_job, n, layout):
    results = shared_job(n, layout, "easgd_equivalence")
    runs = [r["runs"]["easgd"] for r in results]
    nodes = sorted({r["topology"]["node"] for r in results})
    first = {
        node: next(i for i, r in enumerate(results) if r["topology"]["node"] == node)
        for node in nodes
    }
    alpha = 0.9 / len(nodes)  # beta = p * alpha = 0.9
    center = runs[0]["pre_step"][0].double()  # x~ starts at the common initial model
    for step in range(STEPS):
        for r in runs[1:]:  # the center is identical on every rank of every node
            assert torch.equal(r["centers"][step], runs[0]["centers"][step])
        differences = {
            node: runs[first[node]]["pre_step"][step].double() - center for node in nodes
        }
        total = sum(differences.values())
        for rank, result in enumerate(results):
            node = result["topology"]["node"]
            expected = runs[rank]["before_sync"][step].double() - alpha * differences[node]
            got = runs[rank]["trace"][step].double()
            assert float((got - expected).norm() / expected.norm()) < 1e-6, (step, rank)
        center = center + alpha * total
        got_center = runs[0]["centers"][step].double()
        assert float((got_center - center).norm() / center.norm()) < 1e-6, step
        center = got_center  # follow the run's own rounding
    assert not torch.equal(runs[first[0]]["trace"][-1], runs[first[1]]["trace"][-1])


@pytest.mark.parametrize("strategy", ["easgd", "eamsgd", "async_easgd", "downpour"])
def test_trains_real_mnist_within_1_5_points_of_ddp(mnist_runs, strategy):
    ddp_rows, rows = mnist_runs["ddp"], mnist_runs[strategy]
    assert rows[-1]["val_accuracy"] >= ddp_rows[-1]["val_accuracy"] - 0.015, (
        rows[-1],
        ddp_rows[-1],
    )
    assert all(r["cross_node_bytes"] > 0 for r in rows)
