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
