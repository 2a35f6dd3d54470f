"""Single-process pieces of fault handling: signal capture, the NaN/Inf guard, the stop vote."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from daso.comm.control import StopVote
from daso.errors import NumericalError
from daso.faults import NonFiniteGuard, PreemptionSignals, describe_peer_failure


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signals_are_captured_then_handlers_restored(signum):
    before = signal.getsignal(signum)
    with PreemptionSignals() as signals:
        assert signals.received == 0
        os.kill(os.getpid(), signum)
        assert signals.received == signum
    assert signal.getsignal(signum) == before


def model_with_grads(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return model


@pytest.mark.parametrize(
    "loss, grad, bad",
    [
        (1.0, 0.5, False),
        (float("nan"), 0.5, True),
        (1.0, float("inf"), True),
        (1.0, 1e15, False),
        (1.0, 1e30, True),
    ],
)
def test_guard_flags_nonfinite_loss_or_gradient(loss, grad, bad):
    guard = NonFiniteGuard("stop", torch.device("cpu"), rank=3)
    flag = guard.nonfinite(torch.tensor(loss), model_with_grads(grad).parameters())
    assert bool(flag) == bad


def test_stop_mode_names_epoch_batch_and_rank():
    guard = NonFiniteGuard("stop", torch.device("cpu"), rank=3)
    assert guard.should_skip(torch.tensor(False), 0, 0) is False
    with pytest.raises(NumericalError, match=r"rank 3: NaN or Inf .* epoch 2, batch 7"):
        guard.should_skip(torch.tensor(True), 2, 7)


def test_skip_mode_counts():
    guard = NonFiniteGuard("skip", torch.device("cpu"), rank=0)
    assert guard.should_skip(torch.tensor(True), 0, 1) is True
    assert guard.should_skip(torch.tensor(False), 0, 2) is False
    assert guard.skipped_steps == 1
    guard.check()  # nothing deferred on a CPU


def test_guard_rejects_unknown_policy():
    with pytest.raises(ValueError, match="stop' or 'skip"):
        NonFiniteGuard("ignore", torch.device("cpu"), rank=0)


def test_single_process_vote_answers_three_batches_later():
    vote = StopVote(None, None, leader=True, timeout=1.0)
    answers = [vote.exchange(flag) for flag in (1, 0, 0, 0, 0)]
    assert answers == [0, 0, 0, 1, 0]
    assert vote.exchange(1) == 0
    assert vote.finish() == 1  # a flag still in flight counts at the end
    assert vote.exchange(0) == 0  # nothing left in flight after finish


def test_failure_message_names_operation_and_silent_ranks():
    err = RuntimeError("Connection closed by peer")
    text = describe_peer_failure(2, "epoch 1 batch 4: stop vote", err, [3])
    assert text.startswith("rank 2: epoch 1 batch 4: stop vote failed: rank(s) [3] stopped")
    assert "Connection closed by peer" in text
    assert "rank 0, which hosts" in describe_peer_failure(2, "x", err, None)


def test_skip_mode_stops_after_max_skipped_steps_in_a_row():
    guard = NonFiniteGuard("skip", torch.device("cpu"), rank=1, max_skipped_steps=3)
    assert guard.should_skip(torch.tensor(True), 0, 0)
    assert guard.should_skip(torch.tensor(True), 0, 1)
    assert not guard.should_skip(torch.tensor(False), 0, 2)  # a good step resets the count
    assert guard.should_skip(torch.tensor(True), 0, 3)
    assert guard.should_skip(torch.tensor(True), 0, 4)
    with pytest.raises(NumericalError, match=r"rank 1: 3 non-finite steps in a row.*max_skipped"):
        guard.should_skip(torch.tensor(True), 0, 5)


def test_skip_mode_warns_once_per_epoch(caplog):
    guard = NonFiniteGuard("skip", torch.device("cpu"), rank=0, max_skipped_steps=100)
    with caplog.at_level("WARNING", logger="daso"):
        for epoch in range(2):
            for batch in range(5):
                guard.should_skip(torch.tensor(True), epoch, batch)
                guard.should_skip(torch.tensor(False), epoch, batch)
    warnings = [r for r in caplog.records if "step skipped" in r.getMessage()]
    assert [r.getMessage().split(" batch")[0] for r in warnings] == [
        "rank 0: non-finite loss/gradient at epoch 0",
        "rank 0: non-finite loss/gradient at epoch 1",
    ]
    assert guard.skipped_steps == 10


def test_window_of_skipped_steps_reports_no_loss_and_does_not_feed_the_controller():
    """Every step non-finite: the window's ``train_loss`` is ``None`` (not 0.0) and DASO's
    plateau detector never sees a loss."""
    from daso.distributed import Distributed

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dist_ = Distributed(
        model,
        optimizer,
        "daso",
        {"warmup_windows": 0, "cooldown_windows": 0, "window_steps": 2},
        steps_per_epoch=4,
        epochs=1,
        nan_policy="skip",
        max_skipped_steps=100,
        preemption=False,
    )
    fed = []
    detector = dist_.strategy.schedule.detector
    original = detector.step
    detector.step = lambda loss: fed.append(loss) or original(loss)
    rows = []
    for step in range(4):
        with dist_.micro_batch():
            loss = model(torch.ones(1, 3)).sum()
            dist_.backward(loss * float("nan") if step < 2 else loss)
        row = dist_.step()
        if row is not None:
            rows.append(row)
    dist_.close()
    assert [r["train_loss"] is None for r in rows] == [True, False]
    assert [r["skipped_steps"] for r in rows] == [2, 0]
    assert len(fed) == 1 and fed[0] == pytest.approx(rows[1]["train_loss"])
