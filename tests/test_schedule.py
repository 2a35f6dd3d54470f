"""The DASO schedule: exact knob sequences, the known reference defects, resumability."""

from __future__ import annotations

import pytest
import torch

from daso.errors import ConfigError
from daso.schedule import DASOSchedule, PlateauDetector, SyncParams

# Losses fed after each of 20 epochs (defaults: warm-up 4, cool-down 4, patience 2, 5 %).
LOSSES = [
    2.0,
    1.5,
    1.2,
    1.0,
    0.99,
    0.98,
    0.97,
    0.5,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
    0.49,
]
# (global_skips, local_skips, batches_to_wait) of each epoch, worked out by hand from
# DESIGN.md: blocking warm-up; cycling starts at (8/2, 1, 1); a plateau (3 stalled epochs)
# halves the skips and lowers W; a plateau at S = 1 resets to (8, 8/4, 8/4); blocking cool-down.
EXPECTED = (
    [(0, 1, 0)] * 4
    + [(4, 1, 1)] * 3
    + [(2, 1, 1)] * 4
    + [(1, 1, 1)] * 3
    + [(8, 2, 2)] * 2
    + [(0, 1, 0)] * 4
)


def knobs(p: SyncParams) -> tuple[int, int, int]:
    return p.global_skips, p.local_skips, p.batches_to_wait


def run(schedule: DASOSchedule, losses: list[float]) -> list[tuple[int, int, int]]:
    seen = []
    for loss in losses:
        seen.append(knobs(schedule.params))
        schedule.end_window(loss)
    return seen


def test_default_schedule_exact_sequence():
    assert run(DASOSchedule(windows=20), LOSSES) == EXPECTED


def test_phases_of_default_schedule():
    schedule = DASOSchedule(windows=20)
    assert [schedule.phase(e) for e in (0, 3, 4, 15, 16, 19)] == [
        "warmup",
        "warmup",
        "cycling",
        "cycling",
        "cooldown",
        "cooldown",
    ]


def test_warmup_zero_starts_cycling_at_once_and_leaves_blocking_mode():
    schedule = DASOSchedule(windows=6, warmup_windows=0, cooldown_windows=1)
    assert knobs(schedule.params) == (4, 1, 1)
    assert not schedule.params.blocking
    # never stuck in blocking; the third stalled epoch is a plateau
    assert run(schedule, [1.0] * 5) == [(4, 1, 1)] * 4 + [(2, 1, 1)]


@pytest.mark.parametrize("max_skips, first", [(16, 8), (8, 4), (4, 2), (3, 1), (1, 1)])
def test_max_global_skips_respected_from_first_cycling_epoch(max_skips, first):
    schedule = DASOSchedule(
        windows=10, warmup_windows=1, cooldown_windows=1, max_global_skips=max_skips
    )
    schedule.end_window(1.0)
    assert schedule.params.global_skips == first


def test_reset_respects_max_global_skips_and_local_skip_factor():
    schedule = DASOSchedule(
        windows=30,
        warmup_windows=0,
        cooldown_windows=0,
        patience=0,
        stability_level=0.5,
        max_global_skips=16,
        local_skip_factor=2,
    )
    seen = run(schedule, [1.0] * 6)
    # first loss improves on inf; then every epoch is a plateau
    assert seen == [(8, 1, 1), (8, 1, 1), (4, 1, 1), (2, 1, 1), (1, 1, 1), (16, 8, 8)]


def test_batches_to_wait_never_exceeds_global_skips():
    schedule = DASOSchedule(
        windows=50,
        warmup_windows=0,
        cooldown_windows=0,
        patience=0,
        max_global_skips=8,
        local_skip_factor=1,
    )
    for p in run(schedule, [1.0] * 40):
        assert 1 <= p[2] <= p[0]


def test_state_dict_round_trip_resumes_same_sequence():
    first = DASOSchedule(windows=20)
    run(first, LOSSES[:9])
    state = first.state_dict()
    resumed = DASOSchedule(windows=20)
    resumed.load_state_dict(state)
    assert run(resumed, LOSSES[9:]) == EXPECTED[9:]
    assert run(first, LOSSES[9:]) == EXPECTED[9:]


def test_plateau_detector_agrees_with_reduce_lr_on_plateau():
    losses = [1.0, 0.9, 0.89, 0.88, 0.87, 0.5, 0.5, 0.49, 0.48, 0.47, 0.3]
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.5, patience=2, threshold=0.05, threshold_mode="rel"
    )
    detector = PlateauDetector(threshold=0.05, patience=2)
    for loss in losses:
        before = optimizer.param_groups[0]["lr"]
        reference.step(loss)
        assert detector.step(loss) == (optimizer.param_groups[0]["lr"] < before), loss


def test_send_and_local_sync_batches():
    p = SyncParams(global_skips=4, local_skips=2, batches_to_wait=1, phase="cycling")
    assert [b for b in range(10) if p.is_send_batch(b)] == [0, 4, 8]
    assert [b for b in range(10) if p.is_local_sync_batch(b)] == [0, 2, 4, 6, 8]
    p = SyncParams(global_skips=4, local_skips=3, batches_to_wait=1, phase="cycling")
    assert [b for b in range(9) if p.is_local_sync_batch(b)] == [0, 3, 4, 6, 8]
    blocking = SyncParams(0, 1, 0, "warmup")
    assert blocking.blocking and not blocking.is_send_batch(0) and blocking.is_local_sync_batch(5)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"warmup_windows": 3, "cooldown_windows": 3}, "exceeds the run"),
        ({"max_global_skips": 0}, "max_global_skips"),
        ({"skip_reduction_factor": 1}, "skip_reduction_factor"),
        ({"stability_level": 1.5}, "stability_level"),
        ({"patience": -1}, "patience"),
    ],
)
def test_bad_schedule_values_are_config_errors(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        DASOSchedule(windows=10, **kwargs) if "warmup_windows" not in kwargs else DASOSchedule(
            windows=5, **kwargs
        )


def test_plateau_threshold_is_relative_to_the_magnitude_of_the_best_loss():
    """Negative losses (e.g. a log-likelihood objective): -2.0 -> -2.2 improves by 10 % of
    |best|; ReduceLROnPlateau's ``best * (1 - threshold)`` would ask for a loss above -1.9."""
    detector = PlateauDetector(threshold=0.05, patience=0)
    detector.step(-2.0)
    assert not detector.step(-2.2)
    assert detector.best == -2.2
    assert detector.step(-2.21)  # 0.5 % of |best|: no progress, patience 0: plateau
    positive = PlateauDetector(threshold=0.05, patience=0)
    positive.step(2.0)
    assert not positive.step(1.8) and positive.best == 1.8


def test_detector_is_fed_from_the_last_warmup_epoch_on():
    """Warm-up losses 1.0, 3.0 (the last warm-up epoch), then 2.8, 2.8, 2.8: fed from the last
    warm-up epoch, the best is 3.0 and 2.8 improves on it (no plateau: S stays 4); fed every
    warm-up epoch, the best would be 1.0 and the cycling epochs would plateau to S = 2."""
    schedule = DASOSchedule(windows=8, warmup_windows=2, cooldown_windows=1, patience=1)
    seen = run(schedule, [1.0, 3.0, 2.8, 2.8, 2.8, 2.8])
    assert seen[2] == (4, 1, 1)
    assert seen[3:5] == [(4, 1, 1), (4, 1, 1)]
    assert schedule.detector.best == 2.8


def test_lr_controller_loosens_global_skips_as_the_lr_decays():
    """controller: lr sets S = ceil(max_global_skips * (1 - lr / peak)) (at least 1) each
    cycling window, local skips and W 1; blocking phases stay blocking. Expected values are
    worked out by hand from the formula."""
    s = DASOSchedule(windows=6, warmup_windows=1, cooldown_windows=1, controller="lr")
    lrs = [0.1, 0.099, 0.05, 0.02, 0.001]
    got = [s.end_window(1.0, lr=lr) for lr in lrs]
    # after warm-up (lr 0.1 = peak): ceil(0) -> 1; then ceil(0.08) = 1, ceil(4) = 4,
    # ceil(6.4) = 7; the last window is the cool-down
    assert [p.global_skips for p in got] == [1, 1, 4, 7, 0]
    assert all((p.local_skips, p.batches_to_wait) == (1, 1) for p in got[:4])
    assert got[-1].phase == "cooldown"
    resumed = DASOSchedule(windows=6, warmup_windows=1, cooldown_windows=1, controller="lr")
    resumed.load_state_dict(s.state_dict())
    assert resumed.peak_lr == 0.1


def test_unknown_controller_is_refused():
    with pytest.raises(ConfigError, match="controller"):
        DASOSchedule(windows=6, controller="loss")
