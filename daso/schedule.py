"""When to synchronise: the DASO schedule and its plateau detector.

Pure bookkeeping, no communication: given the window and the globally averaged loss of the
window before, it decides the three knobs of DASO (Coquelin et al., J. Big Data 9:14, 2022,
section 3.3, "Selective synchronisation"):

* ``global_skips`` S: a cross-node sync starts on every S-th batch (S = 0: blocking sync on
  every batch);
* ``local_skips``: node-local gradient averaging on every ``local_skips``-th batch (1 = every
  batch), and on every batch that starts a cross-node sync;
* ``batches_to_wait`` W: a non-blocking cross-node sync is merged W batches after it started.

The unit of the schedule is a *window* of ``window_steps`` optimizer steps (by default one
epoch, as in the paper): the knobs change only between windows, and each window's mean loss
feeds the plateau detector.

Phases: the first ``warmup_windows`` and the last ``cooldown_windows`` are blocking (S = W = 0,
local sync every batch). Cycling starts at ``S = max_global_skips // 2``, ``local_skips = 1``,
``W = 1``; each loss plateau divides S and local skips by ``skip_reduction_factor`` and lowers
W by one (never below 1); a plateau at S = 1 resets to ``S = max_global_skips`` and
``local_skips = W = max_global_skips // local_skip_factor``. W never exceeds S, so at most one
sync is in flight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from daso.errors import ConfigError

WARMUP, CYCLING, COOLDOWN = "warmup", "cycling", "cooldown"


@dataclasses.dataclass(frozen=True)
class SyncParams:
    """The schedule's knobs for one window.

    Attributes:
        global_skips: S, batches between cross-node sync starts (0 = blocking every batch).
        local_skips: batches between node-local gradient averages (1 = every batch).
        batches_to_wait: W, batches between the start of a non-blocking sync and its merge.
        phase: ``"warmup"``, ``"cycling"`` or ``"cooldown"``.
    """

    global_skips: int
    local_skips: int
    batches_to_wait: int
    phase: str

    @property
    def blocking(self) -> bool:
        """True when every batch ends with a blocking cross-node average."""
        return self.global_skips == 0

    def is_send_batch(self, batch: int) -> bool:
        """Whether step ``batch`` (0-based in its window) starts a non-blocking cross-node sync."""
        return not self.blocking and batch % self.global_skips == 0

    def is_local_sync_batch(self, batch: int) -> bool:
        """Whether batch ``batch`` averages gradients inside the node."""
        return self.blocking or batch % self.local_skips == 0 or self.is_send_batch(batch)


BLOCKING = {phase: SyncParams(0, 1, 0, phase) for phase in (WARMUP, COOLDOWN)}


class PlateauDetector:
    """Detects a loss plateau the way ``torch.optim.lr_scheduler.ReduceLROnPlateau`` does.

    Mode "min" with a threshold relative to the best loss's magnitude, as the reference's
    ``DetectMetricPlateau``: a window improves when ``loss < best - threshold * |best|``
    (``ReduceLROnPlateau``'s ``best * (1 - threshold)`` would demand a *rise* of a negative
    loss); a plateau is reported when more than ``patience`` windows in a row did not improve,
    and the count starts again.

    Args:
        threshold: relative improvement that counts (DASO's ``stability_level``), in [0, 1).
        patience: windows without improvement tolerated before a plateau, >= 0.
    """

    def __init__(self, threshold: float = 0.05, patience: int = 2) -> None:
        self.threshold = threshold
        self.patience = patience
        self.best = math.inf
        self.num_bad_windows = 0

    def step(self, loss: float) -> bool:
        """Record one window's loss; return True if this completes a plateau."""
        if self.best == math.inf or loss < self.best - self.threshold * abs(self.best):
            self.best = loss
            self.num_bad_windows = 0
            return False
        self.num_bad_windows += 1
        if self.num_bad_windows > self.patience:
            self.num_bad_windows = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: best loss and the bad-window count."""
        return {"best": self.best, "num_bad_windows": self.num_bad_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.best = float(state["best"])
        self.num_bad_windows = int(state.get("num_bad_windows", state.get("num_bad_epochs", 0)))


class DASOSchedule:
    """The DASO controller: sync parameters per window, adapted from the window losses.

    Args:
        windows: total windows of the run (cool-down is the last ``cooldown_windows`` of them).
        warmup_windows: blocking windows at the start (0 = start cycling at once).
        cooldown_windows: blocking windows at the end.
        stability_level: relative loss improvement below which a window counts as no progress.
        patience: windows without progress tolerated before a plateau.
        max_global_skips: largest S; cycling starts at ``max_global_skips // 2``.
        skip_reduction_factor: S and local skips are divided by it on a plateau.
        local_skip_factor: after a reset,
            ``local_skips = W = max_global_skips // local_skip_factor``.
        controller: ``"plateaus"`` (the paper's rule above) or ``"lr"``: each cycling window
            takes ``S = ceil(max_global_skips * (1 - lr / peak_lr))`` (at least 1),
            ``local_skips = W = 1``, from the learning rate of the window before (``lr`` of
            :meth:`end_window`) and the largest seen; synchronous while the LR is high, looser
            as it decays (post-local SGD, Lin et al. 2020, arXiv 1808.07217).

    The plateau detector is fed from the last warm-up window on: that window's loss is the first
    ``best`` the cycling phase is measured against; earlier warm-up losses never reach it.

    Raises:
        ConfigError: an out-of-range value or ``warmup_windows + cooldown_windows > windows``.

    Example:
        >>> s = DASOSchedule(windows=6, warmup_windows=1, cooldown_windows=1)
        >>> s.params.global_skips, s.end_window(2.0).global_skips
        (0, 4)
    """

    def __init__(
        self,
        windows: int | None,
        warmup_windows: int = 4,
        cooldown_windows: int = 4,
        stability_level: float = 0.05,
        patience: int = 2,
        max_global_skips: int = 8,
        skip_reduction_factor: int = 2,
        local_skip_factor: int = 4,
        controller: str = "plateaus",
    ) -> None:
        checks = [
            (
                controller in ("plateaus", "lr"),
                f"controller must be plateaus or lr, got {controller!r}",
            ),
            (warmup_windows >= 0, f"warmup_windows must be >= 0, got {warmup_windows}"),
            (cooldown_windows >= 0, f"cooldown_windows must be >= 0, got {cooldown_windows}"),
            (0 <= stability_level < 1, f"stability_level must be in [0, 1), got {stability_level}"),
            (patience >= 0, f"patience must be >= 0, got {patience}"),
            (max_global_skips >= 1, f"max_global_skips must be >= 1, got {max_global_skips}"),
            (
                skip_reduction_factor >= 2,
                f"skip_reduction_factor must be >= 2, got {skip_reduction_factor}",
            ),
            (local_skip_factor >= 1, f"local_skip_factor must be >= 1, got {local_skip_factor}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"DASO schedule: {message}")
        self.warmup_windows = warmup_windows
        self.cooldown_windows = cooldown_windows
        self.windows: int | None = None
        self.max_global_skips = max_global_skips
        self.skip_reduction_factor = skip_reduction_factor
        self.local_skip_factor = local_skip_factor
        self.controller = controller
        self.peak_lr = 0.0
        self.detector = PlateauDetector(stability_level, patience)
        self.window = 0
        self.params = self._entry_params(self.phase(0))
        if windows is not None:
            self.set_windows(windows)

    def set_windows(self, windows: int) -> None:
        """Set the run's length in windows (construction may leave it open, until the data's
        epoch length is known; the warm-up phase does not need it).

        Raises:
            ConfigError: ``windows < 1`` or ``warmup_windows + cooldown_windows > windows``.
        """
        if windows < 1:
            raise ConfigError(f"DASO schedule: windows must be >= 1, got {windows}")
        if self.warmup_windows + self.cooldown_windows > windows:
            raise ConfigError(
                f"DASO schedule: warmup_windows ({self.warmup_windows}) + cooldown_windows "
                f"({self.cooldown_windows}) exceeds the run's {windows} windows; lower them, "
                "train longer, or set a smaller strategy.window_steps"
            )
        self.windows = windows
        self._reconcile()

    def _reconcile(self) -> None:
        """After a resume into a run of another length: the current window's knobs follow
        its phase under the new length (e.g. a window that was cool-down in a shorter run is
        cycling in a longer one)."""
        phase = self.phase(self.window)
        if self.params.phase != phase:
            if phase == CYCLING:
                self.detector.num_bad_windows = 0
            self.params = self._entry_params(phase)
        if self.window == 0:  # nothing ran yet: the first window may be the cool-down
            self.params = self._entry_params(self.phase(0))

    def phase(self, window: int) -> str:
        """Phase of window ``window`` (0-based)."""
        if window < self.warmup_windows:
            return WARMUP
        if self.windows is not None and window >= self.windows - self.cooldown_windows:
            return COOLDOWN
        return CYCLING

    def _entry_params(self, phase: str) -> SyncParams:
        if phase != CYCLING:
            return BLOCKING[phase]
        return SyncParams(max(1, self.max_global_skips // 2), 1, 1, CYCLING)

    def _after_plateau(self, p: SyncParams) -> SyncParams:
        if p.global_skips > 1:
            skips = max(1, p.global_skips // self.skip_reduction_factor)
            local = max(1, p.local_skips // self.skip_reduction_factor)
            return SyncParams(skips, local, max(1, min(p.batches_to_wait - 1, skips)), CYCLING)
        reset = max(1, self.max_global_skips // self.local_skip_factor)
        return SyncParams(self.max_global_skips, reset, min(reset, self.max_global_skips), CYCLING)

    def end_window(self, loss: float | None, lr: float | None = None) -> SyncParams:
        """Feed the loss of the window just finished (averaged over all ranks); advance one window.

        Args:
            loss: the window's mean training loss over all ranks; ``None`` when every step
                of the window was skipped (non-finite): the plateau detector is not fed.
            lr: the learning rate the window ran at (``controller: lr``; ignored otherwise).

        Returns:
            The :class:`SyncParams` of the next window (also in :attr:`params`).
        """
        # the detector sees the last warm-up window and every window after it (the reference's
        # choice): earlier warm-up losses, from the blocking regime, never set its best
        feed = self.window >= self.warmup_windows - 1 and loss is not None
        plateau = self.detector.step(float(loss)) if feed else False
        previous = self.params.phase
        self.window += 1
        phase = self.phase(self.window)
        if phase != CYCLING or previous != CYCLING:
            if phase == CYCLING:
                self.detector.num_bad_windows = 0
            self.params = self._entry_params(phase)
        elif plateau and self.controller == "plateaus":
            self.params = self._after_plateau(self.params)
        if self.controller == "lr" and lr is not None:
            self.peak_lr = max(self.peak_lr, lr)
            if phase == CYCLING and self.peak_lr > 0:
                fraction = max(0.0, 1.0 - lr / self.peak_lr)
                skips = min(
                    self.max_global_skips, max(1, math.ceil(self.max_global_skips * fraction))
                )
                self.params = SyncParams(skips, 1, 1, CYCLING)
        return self.params

    def state_dict(self) -> dict[str, Any]:
        """Epoch counter, current knobs and the plateau detector's state."""
        return {
            "window": self.window,
            "params": dataclasses.asdict(self.params),
            "detector": self.detector.state_dict(),
            "peak_lr": self.peak_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the schedule then continues identically."""
        self.window = int(state.get("window", state.get("epoch", 0)))
        self.params = SyncParams(**state["params"])
        self.detector.load_state_dict(state["detector"])
        self.peak_lr = float(state.get("peak_lr", 0.0))
        self._reconcile()
