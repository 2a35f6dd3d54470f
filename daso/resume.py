"""The trainer's checkpoint side: what a rank contributes to a checkpoint, and how a resumed
run takes its state back (see :mod:`daso.checkpoint` for the file itself).

:class:`Checkpointing` is a base class of :class:`daso.trainer.Trainer`; it reads the trainer's
attributes (``model``, ``optimizer``, ``strategy``, ``history``, ``epoch``, ``batch``, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from daso import checkpoint as ckpt
from daso.comm import allreduce_sum, unwrap
from daso.errors import CheckpointError
from daso.log import ONCE

log = logging.getLogger("daso.trainer")


#: The LR schedule's inputs: a resume that changes one rebuilds the schedule.
SCHEDULE_KEYS = frozenset(
    {
        "trainer.epochs",
        "optim.lr",
        "optim.scheduler",
        "optim.scheduler_interval",
        "optim.warmup_steps",
        "optim.step_size",
        "optim.milestones",
        "optim.gamma",
    }
)
#: Keys whose new value a resume applies to state the checkpoint restored: the LR schedule's
#: inputs, the optimizer's hyperparameters, and (through the run's length) DASO's cool-down.
TAKE_EFFECT = SCHEDULE_KEYS | {"optim.momentum", "optim.weight_decay", "optim.nesterov"}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs between two config dumps."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [(f"{key}.{k}", x, y) for k, x, y in config_differences(a, b)]
        elif a != b:
            found.append((key, a, b))
    return found


def _changes_text(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


class Checkpointing:
    """Checkpoint, resume and ``state_dict`` methods of the trainer."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: ``epoch``, ``batch``, ``model``, ``optimizer``, ``lr_scheduler``,
        ``scaler`` and ``strategy`` (checkpoints gather it from every rank, see
        :meth:`save_checkpoint`)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self._scheduler_state_dict(),
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
        }

    def _scheduler_state_dict(self) -> dict[str, Any] | None:
        if self.lr_scheduler is not None:
            return self.lr_scheduler.state_dict()
        return self._scheduler_state  # loaded, not yet applied (before fit)

    def _model_signature(self) -> list[tuple[str, list[int]]]:
        return [(k, list(v.shape)) for k, v in unwrap(self.model).state_dict().items()]

    def save_checkpoint(self) -> Path:
        """Collective (every rank calls it at the same point): write a checkpoint of the run as
        it stands, ``<checkpoint dir>/ckpt-e<epoch>-b<batch>.pt``, keeping the newest
        ``checkpoint.keep`` (see :mod:`daso.checkpoint` for what it holds and how it is written).

        Returns:
            The checkpoint's path.

        Raises:
            NumericalError: a deferred NaN/Inf check fails (nothing is written).
            CheckpointError: rank 0 could not write the file (older checkpoints are intact).
        """
        self._operation = f"checkpoint at epoch {self.epoch} batch {self.batch}"
        dist_state = self.dist.state_dict()  # checks deferred NaNs, folds window counters
        path = self.checkpoint_dir / ckpt.checkpoint_name(self.epoch, self.batch)
        meta = {
            "model": self.config.model.name,
            "strategy": self.strategy.name,
            "world_size": self.topology.world_size,
            "layout": self.topology.ranks_per_node,
            "epoch": self.epoch,
            "batch": self.batch,
            "model_signature": self._model_signature(),
        }
        shared = {
            "run_id": self.run_id,
            "history": self.history,
            "lr_scheduler": self._scheduler_state_dict(),
            "scaler": dist_state["scaler"],
            "config": self.config.model_dump(mode="json"),
            "windows": self.windows,
        }
        state = {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": dist_state["strategy"],
        }
        extra = {"rng": ckpt.capture_rng_state(), "partial": dist_state["partial"]}
        ckpt.gather_and_save(
            path,
            meta,
            shared,
            state,
            extra,
            self.config.checkpoint.keep,
            self.groups.world_group,
            own=self.own_checkpoints,
        )
        # this run's files there, newest first: the only ones it prunes (rank 0 prunes)
        own = [*self.own_checkpoints, path.name]
        self.own_checkpoints = ckpt.newest_names(own, self.config.checkpoint.keep)
        if self.rank == 0:
            self.run_folder.record_checkpoints(self.own_checkpoints)
        return path

    def resume(self, source: str | Path = "auto") -> Path | None:
        """Load the checkpoint at ``source``, or with ``"auto"`` the newest valid one in the
        checkpoint folder (damaged ones are skipped with a warning). Call on every rank before
        :meth:`fit`.

        Returns:
            The checkpoint loaded, or ``None`` for ``"auto"`` when there is none yet.

        Raises:
            CheckpointError: a missing or corrupt file (``source`` a path), or a checkpoint of
                another model, strategy or an incompatible world size.
        """
        found = ckpt.resolve_resume(source, self.checkpoint_dir)
        if found is None:
            return None
        path, checkpoint = found
        exact = ckpt.check_compatible(
            checkpoint,
            path,
            self.config.model.name,
            self.strategy.name,
            self.topology.ranks_per_node,
        )
        self.load_checkpoint(checkpoint, path, exact)
        return path

    def load_checkpoint(self, checkpoint: dict[str, Any], source: Path, exact: bool) -> None:
        """Restore a checkpoint read by :func:`daso.checkpoint.read_checkpoint`.

        Args:
            checkpoint: the checkpoint's payload.
            source: its path (for messages).
            exact: this rank's own state and RNG stream are restored (same layout); else
                rank 0's state is loaded everywhere and the RNG is re-seeded (a re-shard).

        Raises:
            CheckpointError: the checkpoint's model has other parameter names or shapes, or a
                part of its state does not fit this run's model, optimizer or strategy (its
                structure was checked on read; this catches values that only the objects
                loading them can judge).
        """
        meta = checkpoint["meta"]
        if [tuple(s) for s in meta["model_signature"]] != [
            (k, v) for k, v in self._model_signature()
        ]:
            raise CheckpointError(
                f"checkpoint {source} holds a model with other parameters (names or shapes) "
                "than this run's; resume with the same model and model.width, or start a new "
                "run in a folder of its own (--set trainer.output_dir=DIR, without --resume)"
            )
        part = "the model"
        try:
            state = ckpt.rank_state(checkpoint, self.rank if exact else 0, self.device)
            unwrap(self.model).load_state_dict(state["model"])
            part = "the optimizer"
            self.optimizer.load_state_dict(state["optimizer"])
            shared = checkpoint["shared"]
            self.epoch, self.batch = int(meta["epoch"]), int(meta["batch"])
            extra = ckpt.rank_extra(checkpoint, self.rank) if exact else {}
            part = "the strategy"
            self.dist.load_state_dict(
                {
                    "strategy": state["strategy"],
                    "step": 0,  # fit() sets it from epoch and batch, once it knows the length
                    "partial": extra.get("partial", {}),
                    "scaler": shared.get("scaler"),
                }
            )
            if exact:  # check that the RNG state loads (fit() restores it at the first batch)
                part = "the RNG state"
                current = ckpt.capture_rng_state()
                ckpt.restore_rng_state(extra["rng"])
                ckpt.restore_rng_state(current)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise CheckpointError(
                f"checkpoint {source}: the state of {part} does not load into this run "
                f"({type(err).__name__}: {reason}); it is damaged or not daso's, resume from "
                "another one"
            ) from None
        self._scheduler_state = shared.get("lr_scheduler")
        self.history = list(shared.get("history", []))
        self.run_id = shared.get("run_id") or self.run_id
        self.own_checkpoints = []  # rank 0 reads them from the run's own record (run.json)
        self.windows = list(shared.get("windows", []))
        if exact:
            self._resumed_rng = extra["rng"]
        else:
            log.warning(
                "%s was written on nodes %s; resharding to %s: RNG streams restart from the seed",
                source,
                list(meta["layout"]),
                self.topology.ranks_per_node,
                extra=ONCE,
            )
            # fresh streams, distinct per rank and per epoch of the resume (7919: a prime stride)
            torch.manual_seed(self.config.trainer.seed + 1000 + self.rank + 7919 * self.epoch)
        self._resumed = True
        self._apply_config_changes(shared.get("config"), source)
        log.info("resumed from %s: epoch %d, batch %d", source, self.epoch, self.batch)

    def _apply_config_changes(self, saved: dict[str, Any] | None, source: Path) -> None:
        """Make the keys of :data:`TAKE_EFFECT` that differ from the checkpoint's config take
        effect (the LR schedule is rebuilt for them at the step reached; optimizer
        hyperparameters are set on every parameter group, which the checkpoint restored),
        and list every other difference (rank 0).

        Raises:
            CheckpointError: ``optim.name`` differs (another optimizer's state cannot load).
        """
        if saved is None:
            return
        changes = config_differences(saved, self.config.model_dump(mode="json"))
        if not changes:
            return
        names = {key for key, _, _ in changes}
        if "optim.name" in names:
            raise CheckpointError(
                f"checkpoint {source} was trained with optim.name {saved['optim']['name']!r}, "
                f"this run uses {self.config.optim.name!r}; resume with the same optimizer"
            )
        optim = self.config.optim
        own_scheduler = self._scheduler_arg is not None  # restored as saved: it is the user's
        self._replay_scheduler = bool(names & SCHEDULE_KEYS) and not own_scheduler
        for group in self.optimizer.param_groups:
            if self._replay_scheduler:
                # back to the group's base LR, scaled to the new optim.lr (each group keeps its
                # ratio to it); the rebuilt schedule starts from there
                base = group.pop("initial_lr", group["lr"])
                group["lr"] = base * optim.lr / float(saved["optim"]["lr"])
            for key in ("momentum", "weight_decay", "nesterov"):
                if f"optim.{key}" in names and key in group:
                    group[key] = getattr(optim, key)
        if self.rank != 0:
            return
        effect = TAKE_EFFECT - SCHEDULE_KEYS if own_scheduler else TAKE_EFFECT
        taking = [c for c in changes if c[0] in effect]
        other = [c for c in changes if c[0] not in effect]
        if taking:
            log.warning("resume: taking effect: %s", _changes_text(taking))
        if other:
            log.warning(
                "resume: these keys differ from the checkpoint's config and apply from here "
                "on where they are read at run time (the strategy's state, the RNG streams and "
                "the position in the data come from the checkpoint): %s",
                _changes_text(other),
            )

    def _agree_on_start(self) -> None:
        """Collective, at the start of :meth:`fit`: check that every rank starts at the same
        epoch and batch, and keep all ranks here until every one has restored its state, so no
        rank's first exchange reaches a peer whose state (an asynchronous strategy's center
        shard) is not loaded yet.

        Raises:
            CheckpointError: the ranks start at different points (they resumed different
                checkpoints, or only some found one: ``checkpoint.dir`` is not shared).
        """
        self._operation = "start of training: ranks agree on the epoch and batch"
        position = [float(self.epoch), float(self.batch)]
        sums = allreduce_sum(
            position + [v * v for v in position], self.device, self.groups.world_group
        )
        n = self.topology.world_size
        # the same decision on every rank: all agree iff each value's variance over ranks is 0
        if any(n * sq != s * s for s, sq in zip(sums[:2], sums[2:], strict=True)):
            raise CheckpointError(
                f"ranks start training at different points (rank {self.rank}: epoch "
                f"{self.epoch} batch {self.batch}): they resumed different checkpoints; put "
                "checkpoint.dir on a file system every node sees, or resume one named file"
            )
