"""The training loop users call: wrap a model, ``fit`` it, read the metrics.

The trainer owns the loop contract (epochs, samplers, the strategy's hooks, the last batch of
an epoch), so user code never has to tell a strategy where an epoch ends.

Example (run under ``mpiexec -n 4`` with ``DASO_RANKS_PER_NODE=2``, or as one process)::

    import torch, daso
    from daso.data import mnist_datasets
    from daso.models import build_model

    config = daso.load_config("configs/mnist_cnn_daso.yaml", ["trainer.epochs=2"])
    torch.manual_seed(config.trainer.seed)
    model = build_model("mnist_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = daso.Trainer(model, optimizer, torch.nn.functional.cross_entropy, config)
    history = trainer.fit(*mnist_datasets())
    trainer.close()
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

from daso import checkpoint as ckpt
from daso.comm import allreduce_sum, broadcast_tensors, model_state_tensors, unwrap
from daso.comm.control import Heartbeat, NodeStopVote, StopVote
from daso.errors import CommTimeoutError, DasoError, PeerFailureError
from daso.faults import NonFiniteGuard, PreemptionSignals, describe_peer_failure
from daso.log import configure_logging
from daso.resume import Checkpointing
from daso.strategies import build_strategy
from daso.topology import ProcessGroups, init_distributed, shutdown_distributed

if TYPE_CHECKING:  # the config layer sits above the trainer; only its type is needed here
    from daso.config import Config

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerLike = (
    torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
)
SchedulerLike = (
    torch.optim.lr_scheduler.LRScheduler
    | Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    | None
)


def scheduler_from_config(
    optimizer: torch.optim.Optimizer, optim: Any, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The LR scheduler named by the ``optim`` config section (stepped once per epoch)."""
    lr = torch.optim.lr_scheduler
    if optim.scheduler == "cosine":
        return lr.CosineAnnealingLR(optimizer, T_max=epochs)
    if optim.scheduler == "step":
        return lr.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    if optim.scheduler == "multistep":
        return lr.MultiStepLR(optimizer, milestones=list(optim.milestones), gamma=optim.gamma)
    return None


class ResumableSampler(Sampler[int]):
    """A :class:`DistributedSampler`'s order for the epoch, optionally from ``start`` samples in
    (a mid-epoch resume skips the samples already trained on without loading them)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)


def _signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15; a vote from another rank whose signal this rank did not see."""
    return signal.Signals(signum).name if signum else "a signal on another rank"


def _empty_partial() -> dict[str, float]:
    """This rank's running totals of an epoch in progress."""
    return {
        "loss_sum": 0.0,
        "samples": 0,
        "cross_node_bytes": 0,
        "comm_wait_seconds": 0.0,
        "skipped_steps": 0,
    }


class Trainer(Checkpointing):
    """Data-parallel training of ``model`` with the strategy the config names (DASO by default).

    Args:
        model: the user's ``torch.nn.Module``; rank 0's parameters and buffers are broadcast
            to every rank (so pretrained weights survive), nothing is re-initialised.
        optimizer: an optimizer over ``model``'s parameters, or a factory
            ``params -> optimizer``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` with mean reduction, e.g.
            ``torch.nn.functional.cross_entropy`` on ``output[B, C]`` float and ``target[B]``
            int64.
        config: a :class:`daso.config.Config` (from :func:`daso.load_config`).
        lr_scheduler: an LR scheduler, or a factory ``optimizer -> scheduler``, stepped once
            per epoch; default: the one ``config.optim.scheduler`` names.
        groups: process groups from :func:`daso.topology.init_distributed` (default: created
            here from the launcher's environment).

    Attributes:
        epoch: epochs completed; ``batch``: batches done of the next (after a mid-epoch resume).
        history: the per-epoch metric rows (see :meth:`fit`).
        checkpoint_dir: where :meth:`save_checkpoint` writes (``config.checkpoint_folder()``).
        stop_at_epoch: set to stop (checkpoint, :attr:`stopped`) after that many epochs.
        stopped: why :meth:`fit` returned before the last epoch (a signal's name), or ``None``.
        heartbeat, stop_vote: the control traffic (:mod:`daso.comm.control`).

    Resume with :meth:`resume` before :meth:`fit`; see :mod:`daso.resume`.

    Raises:
        TopologyError: the launcher's environment describes an impossible cluster.
        ConfigError: the strategy's options are inconsistent.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerLike,
        loss_fn: LossFn,
        config: Config,
        lr_scheduler: SchedulerLike = None,
        groups: ProcessGroups | None = None,
    ) -> None:
        self.config = config
        tcfg = config.trainer
        if tcfg.num_threads:
            torch.set_num_threads(tcfg.num_threads)
        self.owns_groups = groups is None
        self.groups = groups or init_distributed(tcfg.device, tcfg.timeout_seconds)
        self.topology = self.groups.topology
        self.rank = self.topology.rank
        configure_logging(self.rank)
        self.device = self.groups.device
        self.loss_fn = loss_fn
        model.to(self.device)
        broadcast_tensors(model_state_tensors(model), src=0)
        self.module = model
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = optimizer(model.parameters())
        self.strategy = build_strategy(
            config.strategy.name,
            self.groups,
            tcfg.epochs,
            config.strategy_options(),
            timeout_seconds=tcfg.timeout_seconds,
        )
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.strategy.deterministic = tcfg.deterministic
        self.model = self.strategy.wrap(model, self.optimizer)
        self.optimizer = self.strategy.optimizer  # the same object, or the strategy's wrapper
        if lr_scheduler is None:
            self.lr_scheduler = scheduler_from_config(self.optimizer, config.optim, tcfg.epochs)
        elif isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            self.lr_scheduler = lr_scheduler
        else:
            self.lr_scheduler = lr_scheduler(self.optimizer)
        cuda = self.device.type == "cuda"
        self.amp_dtype = torch.float16 if cuda else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=tcfg.amp and cuda)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.output_dir = Path(tcfg.output_dir or "runs/default")
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.checkpoint_dir = config.checkpoint_folder()
        self.batch = 0  # batches of ``self.epoch`` already trained (after a mid-epoch resume)
        self.partial = _empty_partial()
        self.guard = NonFiniteGuard(tcfg.nan_policy, self.device, self.rank)
        self.stopped: str | None = None  # why the run stopped before its last epoch
        self.stop_at_epoch: int | None = None  # stop (with a checkpoint) after this many epochs
        self._resumed_rng: dict[str, Any] | None = None
        self._resumed = False
        self._stop_requested = False
        self._operation = "setup"
        self.heartbeat, self.stop_vote = self._control(tcfg.timeout_seconds)

    def _control(self, timeout: float) -> tuple[Heartbeat | None, StopVote | NodeStopVote]:
        """Heartbeats and the stop vote, over Gloo groups of their own (one per node, one of the
        node leaders): a per-batch vote for strategies in lockstep, a store-based one (nodes
        never wait for each other during an epoch) for those whose nodes run on their own
        clocks."""
        topo = self.topology
        self._control_groups: list[Any] = []
        if topo.world_size == 1:
            return None, StopVote(None, None, True, timeout)
        delta = datetime.timedelta(seconds=timeout)
        nodes = [topo.ranks_on_node(n) for n in range(topo.num_nodes)]
        node, _ = dist.new_subgroups_by_enumeration(nodes, timeout=delta, backend="gloo")
        leaders = dist.new_group([r[0] for r in nodes], timeout=delta, backend="gloo")
        self._control_groups = [node, leaders] if topo.local_rank == 0 else [node]
        node = node if topo.local_world_size > 1 else None
        leaders = leaders if topo.local_rank == 0 and topo.num_nodes > 1 else None
        address = self.groups.store_address
        heartbeat = Heartbeat(*address, self.rank, topo.world_size) if address else None
        if self.strategy.lockstep or heartbeat is None:
            return heartbeat, StopVote(node, leaders, topo.local_rank == 0, timeout)
        if self.config.checkpoint.every_batches:
            log.warning(
                "checkpoint.every_batches is ignored by %s: its nodes run on their own clocks, "
                "so checkpoints are taken at epoch ends (and on SIGTERM/SIGUSR1)",
                self.strategy.name,
            )
        return heartbeat, NodeStopVote(node, leaders, heartbeat, timeout)

    # -- data ----------------------------------------------------------------------------------
    def _train_loader(self, dataset: Dataset) -> DataLoader:
        world = self.topology.world_size
        if len(dataset) < world:
            raise ValueError(
                f"the training set has {len(dataset)} samples, fewer than the {world} ranks; "
                "use more data or fewer ranks"
            )
        sampler = DistributedSampler(
            dataset,
            num_replicas=world,
            rank=self.rank,
            shuffle=True,
            seed=self.config.trainer.seed,
            drop_last=True,
        )
        return DataLoader(
            dataset,
            batch_size=self.config.data.batch_size,
            sampler=ResumableSampler(sampler),
            num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _val_loader(self, dataset: Dataset) -> DataLoader:
        shard = Subset(dataset, range(self.rank, len(dataset), self.topology.world_size))
        return DataLoader(
            shard,
            batch_size=self.config.data.val_batch_size,
            shuffle=False,
            num_workers=self.config.data.num_workers,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.config.trainer.amp
        )

    # -- loop ----------------------------------------------------------------------------------
    def fit(
        self, train_dataset: Dataset, val_dataset: Dataset | None = None
    ) -> list[dict[str, Any]]:
        """Train until ``config.trainer.epochs`` epochs are done; evaluate after each if
        ``val_dataset``. After :meth:`resume`, continues where the checkpoint stopped; with
        :attr:`stop_at_epoch` set, stops (after a checkpoint) once that many epochs are done.

        Every rank must call it with the same datasets (each reads its own shard). Samples are
        ``(input, target)`` pairs; batches are moved to the trainer's device. Checkpoints are
        written as the ``checkpoint`` config section says; SIGTERM or SIGUSR1 on any rank makes
        all ranks stop after the same batch, write a checkpoint and return early with
        :attr:`stopped` saying why.

        Returns:
            One dict per epoch (also appended by rank 0 to ``<output_dir>/metrics.jsonl``):
            ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy`` (fraction in [0, 1]),
            ``global_skips``, ``local_skips``, ``batches_to_wait``, ``cross_node_bytes``
            (bytes handed to cross-node collectives this epoch, summed over ranks),
            ``comm_wait_seconds`` (mean over ranks), ``skipped_steps`` (non-finite steps
            skipped, summed over ranks), ``train_seconds`` (the epoch's training loop, without
            evaluation), ``epoch_seconds``, ``wall_seconds`` (since the run first started),
            ``lr``, ``strategy``.

        Raises:
            ValueError: fewer training samples than ranks.
            NumericalError: a NaN/Inf loss or gradient with ``trainer.nan_policy: stop``.
            PeerFailureError: a collective failed or timed out because a rank died or hangs.
            CheckpointError: rank 0 could not write a checkpoint, or the ranks resumed
                different checkpoints (checked before the first batch).
        """
        loader = self._train_loader(train_dataset)
        val_loader = self._val_loader(val_dataset) if val_dataset is not None else None
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self._resumed:
            torch.manual_seed(self.config.trainer.seed + 1000 + self.rank)  # augment, dropout
        done = self.history[-1]["wall_seconds"] if self.history else 0.0
        start = time.perf_counter() - done
        with PreemptionSignals() as signals:
            try:
                self._agree_on_start()
                while self.epoch < self.config.trainer.epochs and not self.stopped:
                    self._run_epoch(loader, val_loader, start, signals)
            except (RuntimeError, TimeoutError) as err:
                self._raise_if_peer_failure(err)
                raise
        return self.history

    def _raise_if_peer_failure(self, err: BaseException) -> None:
        """Turn a communication failure into :class:`PeerFailureError`: always for a
        ``torch.distributed`` error or an MPI timeout, and for any other runtime error (e.g.
        DDP's reducer reporting a reset connection) when some rank's heartbeat has stopped."""
        if isinstance(err, DasoError) and not isinstance(err, CommTimeoutError):
            return
        comm_error = isinstance(err, (dist.DistError, CommTimeoutError))
        silent = self.heartbeat.silent_ranks() if self.heartbeat is not None else None
        if comm_error or silent:
            message = describe_peer_failure(self.rank, self._operation, err, silent)
            raise PeerFailureError(message) from err

    def _run_epoch(
        self,
        loader: DataLoader,
        val_loader: DataLoader | None,
        start: float,
        signals: PreemptionSignals,
    ) -> None:
        epoch = self.epoch
        begin = time.perf_counter()
        if not self._train_epoch(epoch, loader, signals):
            self.stopped = _signal_name(signals.received)
            self.save_checkpoint()
            return
        train_loss, metrics = self._close_epoch(epoch)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_seconds": time.perf_counter() - begin,
        }
        self._operation = f"epoch {epoch}: validation"
        if val_loader is not None:
            row["val_loss"], row["val_accuracy"] = self._evaluate(val_loader)
        else:
            row["val_loss"] = row["val_accuracy"] = None
        row.update(metrics)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        row["epoch_seconds"] = time.perf_counter() - begin
        row["wall_seconds"] = time.perf_counter() - start
        row["strategy"] = self.strategy.name
        self.epoch, self.batch = epoch + 1, 0
        self.history.append(row)
        self._report(row)
        self._operation = f"epoch {epoch}: stop vote"
        # in lockstep the per-batch vote is the same everywhere; otherwise only finish() is
        stop = bool(self.stop_vote.finish()) or (self._stop_requested and self.strategy.lockstep)
        self._stop_requested = False
        if stop:
            self.stopped = _signal_name(signals.received)
        elif self.stop_at_epoch is not None and self.epoch >= self.stop_at_epoch:
            self.stopped = f"stop_at_epoch={self.stop_at_epoch}"
        every = self.config.checkpoint.every_epochs
        due = every and self.epoch % every == 0
        if due or self.stopped or self.epoch == self.config.trainer.epochs:
            self.save_checkpoint()

    def _num_batches(self, loader: DataLoader) -> int:
        return math.ceil(len(loader.sampler.sampler) / self.config.data.batch_size)

    def _train_epoch(self, epoch: int, loader: DataLoader, signals: PreemptionSignals) -> bool:
        """Train (the rest of) ``epoch``; ``False`` if all ranks agreed to stop before its end."""
        batch_size = self.config.data.batch_size
        loader.sampler.set_epoch(epoch, start=self.batch * batch_size)
        self.model.train()
        num_batches = self._num_batches(loader)
        self.strategy.begin_window(epoch, num_batches)
        batches = iter(loader)  # draws the loader's base seed: before the RNG is restored
        if self._resumed_rng is not None:
            ckpt.restore_rng_state(self._resumed_rng)
            self._resumed_rng = None
        loss_sum = torch.tensor(self.partial["loss_sum"], dtype=torch.float64, device=self.device)
        every = self.config.checkpoint.every_batches
        lockstep_every = every if self.strategy.lockstep else None
        bar = tqdm(
            total=num_batches,
            initial=self.batch,
            desc=f"epoch {epoch}",
            leave=False,
            dynamic_ncols=True,
            disable=self.rank != 0 or not self.config.trainer.progress,
        )
        for batch, (inputs, targets) in enumerate(batches, start=self.batch):
            loss = self._train_step(epoch, batch, inputs, targets)
            if loss is not None:
                loss_sum += loss.detach().double() * len(targets)
                self.partial["samples"] += len(targets)
            self.batch = batch + 1
            bar.update()
            self._operation = f"epoch {epoch} batch {batch}: stop vote"
            if self.stop_vote.exchange(1 if signals.received else 0):
                self._stop_requested = True
            if self.batch == num_batches:
                break
            if self._stop_requested and not self.strategy.lockstep:
                break  # a node on its own clock ends its epoch here; all stop at the epoch end
            if self._stop_requested or (lockstep_every and self.batch % every == 0):
                self.partial["loss_sum"] = loss_sum.item()
                if self._stop_requested:
                    bar.close()
                    return False
                self.save_checkpoint()
        bar.close()
        self.partial["loss_sum"] = loss_sum.item()
        return True

    def _train_step(
        self, epoch: int, batch: int, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """One batch; its loss, or ``None`` if the step was skipped as non-finite
        (``nan_policy: skip``)."""
        where = f"epoch {epoch} batch {batch}"
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's takes no argument
        self._operation = f"{where}: forward/backward with node-local gradient averaging"
        with self.strategy.sync_context(batch):
            with self._autocast():
                loss = self.loss_fn(self.model(inputs), targets)
            self.scaler.scale(loss).backward()
        self._operation = f"{where}: gradient communication ({self.strategy.name})"
        self.strategy.after_backward(batch)
        norm = None
        clip = self.config.trainer.grad_clip_norm
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        if self.scaler.is_enabled():  # overflowing fp16 gradients are GradScaler's to skip
            norm = loss.new_zeros(())
        bad = self.guard.nonfinite(loss, self.module.parameters(), norm)
        skip = self.guard.should_skip(bad, epoch, batch)
        self.guard.sanitize(self.module.parameters())
        if skip:
            self.partial["skipped_steps"] += 1
        else:
            with self.strategy.step_context():
                self.scaler.step(self.optimizer)
            self.scaler.update()
        self._operation = f"{where}: cross-node synchronisation ({self.strategy.name})"
        self.strategy.after_step(batch)
        return None if skip else loss

    def _take_partial_metrics(self) -> dict[str, Any]:
        """Fold the strategy's counters so far into :attr:`partial` (they reset on read)."""
        metrics = self.strategy.window_metrics()
        self.partial["cross_node_bytes"] += metrics["cross_node_bytes"]
        self.partial["comm_wait_seconds"] += metrics["comm_wait_seconds"]
        return metrics

    def _close_epoch(self, epoch: int) -> tuple[float, dict[str, Any]]:
        self._operation = f"epoch {epoch}: end-of-epoch metrics allreduce"
        self.guard.check()
        metrics = self._take_partial_metrics()
        part = self.partial
        totals = allreduce_sum(
            [
                part["loss_sum"],
                part["samples"],
                part["cross_node_bytes"],
                part["comm_wait_seconds"],
                part["skipped_steps"],
            ],
            self.device,
        )
        train_loss = totals[0] / max(totals[1], 1)
        metrics["cross_node_bytes"] = int(totals[2])
        metrics["comm_wait_seconds"] = totals[3] / self.topology.world_size
        metrics["skipped_steps"] = int(totals[4])
        self.partial = _empty_partial()
        self.strategy.end_window(epoch, train_loss)
        return train_loss, metrics

    def _evaluate(self, loader: DataLoader) -> tuple[float, float]:
        module = unwrap(self.model)
        module.eval()
        loss_sum, correct, count = 0.0, 0, 0
        with torch.no_grad(), self._autocast(), self.strategy.evaluation():
            for inputs, targets in loader:
                inputs = inputs.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                output = module(inputs)
                loss_sum += float(self.loss_fn(output, targets)) * len(targets)
                correct += int((output.argmax(dim=1) == targets).sum())
                count += len(targets)
        loss_sum, correct, count = allreduce_sum([loss_sum, correct, count], self.device)
        return loss_sum / max(count, 1), correct / max(count, 1)

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Loss and accuracy of the current model on ``dataset``, over all ranks' shards.

        Returns:
            ``{"val_loss": mean loss, "val_accuracy": fraction correct}``.
        """
        loss, accuracy = self._evaluate(self._val_loader(dataset))
        return {"val_loss": loss, "val_accuracy": accuracy}

    def _report(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        val = (
            f"val loss {row['val_loss']:.4f} val acc {row['val_accuracy']:.4f}"
            if row["val_accuracy"] is not None
            else "no validation"
        )
        log.info(
            "epoch %d | train loss %.4f | %s | global_skips %s local_skips %s "
            "batches_to_wait %s | cross-node %.2f MB | %.1f s",
            row["epoch"],
            row["train_loss"],
            val,
            row.get("global_skips", "-"),
            row.get("local_skips", "-"),
            row.get("batches_to_wait", "-"),
            row["cross_node_bytes"] / 1e6,
            row["epoch_seconds"],
        )
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def close(self, clean: bool = True) -> None:
        """Stop the strategy's communication threads and the heartbeat; leave
        ``torch.distributed`` if the trainer joined it (that is, no ``groups`` were passed in).

        Args:
            clean: ``False`` after a failure: skip everything that waits for other ranks (they
                may be gone); the process should then exit (the CLI aborts the MPI job).
        """
        if self.heartbeat is not None:
            self.heartbeat.close()
        if not clean:
            return
        self.stop_vote.finish()
        self.strategy.close()
        for group in self._control_groups:
            dist.destroy_process_group(group)
        if self.owns_groups:
            shutdown_distributed()


#: Alias kept for readers of the DASO paper and Heat's ``DASO`` class.
DASOTrainer = Trainer
