"""The baselines against ddp, step by step (plain SGD, fixed seeds, Gloo + MPI), and the
cross-node bytes each strategy counts against their analytic values."""

from __future__ import annotations

import pytest
import torch

from mpi_harness import share_job

pytestmark = pytest.mark.multiprocess

BLOCKING = {"warmup_windows": 1, "cooldown_windows": 0}
STRATEGIES = [
    ("ddp", "ddp", {}),
    ("hierarchical", "hierarchical", {}),
    ("hierarchical_after_backward", "hierarchical", {"overlap": False}),
    ("hierarchical_small_buckets", "hierarchical", {"bucket_cap_mb": 0.0005}),
    ("hierarchical_bf16", "hierarchical", {"wire_dtype": "bfloat16"}),
    ("local_sgd_1", "local_sgd", {"period": 1}),
    ("local_sgd_4", "local_sgd", {"period": 4}),
    ("local_sgd_warm", "local_sgd", {"period": 4, "warmup_steps": 2}),
    ("daso", "daso", {"warmup_windows": 0, "cooldown_windows": 0, "max_global_skips": 8}),
    # one blocking (warm-up) window with Adam: parameters averaged after each step, or
    # gradients averaged before it
    ("ddp_adam", "ddp", {}, "adam"),
    ("daso_blocking_parameters_adam", "daso", {**BLOCKING, "downcast": "float32"}, "adam"),
    (
        "daso_blocking_gradients_adam",
        "daso",
        {**BLOCKING, "downcast": "float32", "blocking_sync": "gradients"},
        "adam",
    ),
]
STEPS = 8


LAYOUTS = [(4, "2"), (3, "2,1")]
for _n, _layout in LAYOUTS:
    share_job(
        _n,
        _layout,
        "baselines",
        {"scenario": "equivalence", "strategies": STRATEGIES, "steps": STEPS},
    )


@pytest.fixture(scope="module", params=LAYOUTS, ids=["2x2", "2+1"])
def runs(request, shared_job):
    return shared_job(*request.param, "baselines")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "label", ["hierarchical", "hierarchical_after_backward", "hierarchical_small_buckets"]
)
def test_hierarchical_equals_ddp_after_every_step(runs, label):
    """Overlapped (per DDP bucket, one bucket or several of 512 bytes) and after backward()."""
    for result in runs:
        for got, want in zip(result["runs"][label]["trace"], result["runs"]["ddp"]["trace"]):
            assert rel_error(got, want) < 1e-6


def test_hierarchical_bfloat16_wire_stays_close(runs):
    for result in runs:
        got = result["runs"]["hierarchical_bf16"]["trace"][-1]
        assert rel_error(got, result["runs"]["ddp"]["trace"][-1]) < 1e-2


def test_daso_blocking_gradient_average_equals_ddp_with_adam(runs):
    """With ``blocking_sync: gradients`` a blocking window takes ddp's Adam steps (the mean
    gradient over ranks, also with uneven nodes); averaging the parameters after each Adam
    step, normalised by node-local moments, does not (the paper's blocking sync)."""
    for result in runs:
        ddp = result["runs"]["ddp_adam"]["trace"]
        gradients = result["runs"]["daso_blocking_gradients_adam"]["trace"]
        parameters = result["runs"]["daso_blocking_parameters_adam"]["trace"]
        for got, want in zip(gradients, ddp):
            assert rel_error(got, want) < 1e-6
        assert rel_error(parameters[-1], ddp[-1]) > 1e-3


def test_local_sgd_period_1_equals_ddp_after_every_step(runs):
    for result in runs:
        for got, want in zip(
            result["runs"]["local_sgd_1"]["trace"], result["runs"]["ddp"]["trace"]
        ):
            assert rel_error(got, want) < 1e-6


def test_local_sgd_period_4_agrees_exactly_on_steps_4_and_8(runs):
    for step in range(STEPS):
        traces = [r["runs"]["local_sgd_4"]["trace"][step] for r in runs]
        same = all(torch.equal(traces[0], t) for t in traces[1:])
        assert same == ((step + 1) % 4 == 0), f"step {step + 1}"


def test_local_sgd_average_is_the_mean_over_nodes(runs):
    """On steps 4 and 8 every rank holds sum_n L_n x_n / world, x_n the node's model before
    the average (all ranks of a node share it: gradients are averaged in the node)."""
    world = len(runs)
    for step in (3, 7):
        by_node = {}
        for r in runs:
            by_node.setdefault(r["topology"]["node"], []).append(
                r["runs"]["local_sgd_4"]["before_sync"][step]
            )
        for models in by_node.values():
            assert all(torch.equal(models[0], m) for m in models[1:])
        expected = sum(len(ms) * ms[0].double() for ms in by_node.values()) / world
        assert len(by_node) == 2 and not torch.equal(*[ms[0] for ms in by_node.values()])
        for r in runs:
            got = r["runs"]["local_sgd_4"]["trace"][step].double()
            assert rel_error(got, expected) < 1e-6


def test_local_sgd_warmup_averages_every_step_first(runs):
    traces = [r["runs"]["local_sgd_warm"]["trace"] for r in runs]
    agree = [all(torch.equal(tr[s], traces[0][s]) for tr in traces) for s in range(STEPS)]
    assert agree == [True, True, False, True, False, False, False, True]


def test_cross_node_bytes_match_analytic_counts(runs):
    """Bytes handed to cross-node collectives, summed over ranks, for STEPS steps.

    ddp: every rank hands its whole float32 gradient to the allreduce every step.
    hierarchical: every node hands the whole gradient once per step, split in shards over its
    min_n L_n ranks (float32: 4 bytes, bfloat16: 2). local_sgd: one rank per node hands the
    float32 model state (parameters and BatchNorm statistics) per average. daso (cycling,
    global_skips 4): one rank per node sends the float32 model state on batches 0 and 4
    (cycling_downcast).
    daso blocking (float32): every node hands the gradient (blocking_sync: gradients) or the
    model state (parameters) once per step, in shards.

    These are payloads handed to MPI. On the wire, MPICH's allreduce of a large buffer over N
    ranks (Rabenseifner: reduce-scatter then allgather) sends 2(N-1)/N times the payload per
    rank, which is exactly the payload for the 2 nodes here."""
    world = len(runs)
    nodes = len({r["topology"]["node"] for r in runs})
    numel = runs[0]["runs"]["ddp"]["numel"]
    state = runs[0]["runs"]["ddp"]["state_numel"]

    def total(label: str) -> int:
        return sum(r["runs"][label]["metrics"]["cross_node_bytes"] for r in runs)

    assert total("ddp") == STEPS * world * numel * 4
    assert total("hierarchical") == STEPS * nodes * numel * 4
    assert total("hierarchical_bf16") == STEPS * nodes * numel * 2
    assert total("local_sgd_1") == STEPS * nodes * state * 4
    assert total("local_sgd_4") == (STEPS // 4) * nodes * state * 4
    assert total("local_sgd_warm") == (2 + 2) * nodes * state * 4  # steps 1, 2, 4, 8
    assert total("daso") == 2 * nodes * state * 4  # cycling sends: float32
    adam_numel = runs[0]["runs"]["ddp_adam"]["numel"]  # no BatchNorm: no buffers either
    assert total("daso_blocking_gradients_adam") == STEPS * nodes * adam_numel * 4
    assert total("daso_blocking_parameters_adam") == STEPS * nodes * adam_numel * 4
