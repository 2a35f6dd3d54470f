"""The trainer for any task and the step-level API, on 2 emulated nodes x 2 ranks: a
regression (loss, never an accuracy), a model returning ``(logits, aux)``, an IterableDataset
of dict batches with gradient accumulation and a per-step LR, and every registered strategy
built from its defaults."""

from __future__ import annotations

import importlib.util
import math

import pytest

from mpi_harness import ROOT, run_batch, run_ranks

pytestmark = pytest.mark.multiprocess
WORKER = ROOT / "tests" / "task_worker.py"
HOROVOD_SKIP = [] if importlib.util.find_spec("horovod") else ["horovod"]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The scenarios on 2 emulated nodes x 2 ranks, all in one MPI job."""
    scenarios = {
        "regression": {},
        "tuple_output": {},
        "iterable": {},
        "every_strategy": {"skip": HOROVOD_SKIP},
        "control": {},
    }
    return run_batch(scenarios, 4, "2", tmp_path_factory.mktemp("tasks"), worker=WORKER)


def test_regression_reports_loss_and_no_accuracy(four_ranks):
    results = four_ranks["regression"]
    history = results[0]["history"]
    assert all(row["val_accuracy"] is None for row in history), history
    assert history[-1]["val_loss"] < 0.1 * results[0]["untrained"], history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len({r["final"] for r in results}) == 1  # every epoch ends with one model


def test_model_returning_logits_and_aux_trains_on_a_loss_over_the_tuple(four_ranks):
    results = four_ranks["tuple_output"]
    history = results[0]["history"]
    last = history[-1]
    assert last["val_accuracy"] is None  # the output is a tuple: no built-in accuracy
    assert last["val_logits_accuracy"] > 0.9, last  # the user's metric
    assert math.isfinite(last["val_loss"]) and last["val_loss"] < history[0]["train_loss"]
    assert len({r["final"] for r in results}) == 1


def test_iterable_dataset_of_dict_batches_with_accumulation_and_per_step_lr(four_ranks):
    results = four_ranks["iterable"]
    history = results[0]["history"]
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert history[-1]["val_accuracy"] is None  # a step_fn's dict batch has no target
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    # cosine over 36 steps after 4 warm-up steps, read at each epoch's end (per-step LR)
    lrs = [row["lr"] for row in history]
    assert lrs[0] > lrs[1] > lrs[2] and lrs[0] < 0.05, lrs
    assert len({r["final"] for r in results}) == 1


def test_every_registered_strategy_runs_from_its_defaults(four_ranks):
    results = four_ranks["every_strategy"]
    from daso.strategies import STRATEGIES

    assert set(results[0]) == set(STRATEGIES) - set(HOROVOD_SKIP)
    for name, run in results[0].items():
        assert [row["window"] for row in run["rows"]] == list(range(8)), name
        assert all(math.isfinite(row["train_loss"]) for row in run["rows"]), name
        assert run["should_stop"] is False
        finals = [r[name]["final"] for r in results]
        if name in ("ddp", "hierarchical", "daso", "horovod", "passm"):  # one model everywhere
            assert len(set(finals)) == 1, name
        elif run["lockstep"] and name != "no_comm":  # one model per node (elastic, local)
            assert finals[0] == finals[1] and finals[2] == finals[3], name


def test_step_level_api_refuses_calls_out_of_order_naming_the_fix(tmp_path):
    messages = run_ranks("misuse", 1, None, tmp_path, worker=WORKER)[0]
    assert "after 0 of 2 micro-batches" in messages["step_first"]
    assert "outside micro_batch()" in messages["backward_outside"]
    assert "without backward(loss)" in messages["no_backward"]
    assert "inside micro_batch()" in messages["nested"]
    assert "inside a step" in messages["state_inside_step"]
    assert "call step()" in messages["too_many"]
    assert messages["stepped"] is True
    assert "steps_per_epoch must be an integer >= 1" in messages["bad_steps"]
    assert "perod" in messages["bad_option"]
    assert "exceeds the run's 2 windows" in messages["short_run"]


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """On one node of 2 ranks: node-local sync on the last micro-batch only still averages
    the whole step's gradient (equal to float tolerance: the sums run in another order)."""
    import torch

    results = run_ranks("accumulation", 2, "2", tmp_path, worker=WORKER)
    for result in results:
        for whole, accumulated in zip(result[1], result[2], strict=True):
            assert torch.allclose(whole, accumulated, atol=1e-6), (whole, accumulated)
        assert abs(result["loss1"] - result["loss2"]) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))


def test_control_plane_stop_vote_stops_every_rank_after_the_same_step(four_ranks):
    results = four_ranks["control"]
    assert {r["stopped_at"] for r in results} == {results[0]["stopped_at"]}
    # flagged at step 3; the node round and the leaders' round are each read a step later
    assert 3 < results[0]["stopped_at"] <= 6, results[0]
