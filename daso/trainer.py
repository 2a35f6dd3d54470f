"""The training loop users call: wrap a model, ``fit`` it, read the metrics.

:class:`Trainer` is the loop around :class:`daso.Distributed` (the step-level API): epochs,
samplers, validation, checkpoints, the stop vote. Any task: batches of any structure, a loss
given as ``loss_fn(output, target)`` or as ``step_fn(model, batch)``, metrics of the user's.

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

import logging
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
)

from daso import checkpoint as ckpt
from daso.comm import allreduce_sum, unwrap
from daso.comm.control import ControlPlane
from daso.data.batches import batch_size, move_to, split_pair
from daso.data.loaders import epoch_batches, train_loader, val_loader
from daso.distributed import Distributed, register_open, unregister_open
from daso.errors import (
    CheckpointError,
    ConfigError,
    DasoError,
    DataError,
    PeerFailureError,
    RecordError,
    raise_agreed,
    reported_elsewhere,
)
from daso.faults import (
    PreemptionSignals,
    note_run_folder,
    peer_failure,
    record_preemption,
)
from daso.log import ONCE, configure_logging
from daso.loggers import check_loggers
from daso.metrics import MetricsLog, StepLog
from daso.progress import Progress
from daso.resume import Checkpointing
from daso.run_record import RunFolder, new_run_id
from daso.topology import ProcessGroups, init_distributed, shutdown_distributed

if TYPE_CHECKING:  # the config layer sits above the trainer; only its type is needed here
    from daso.config import Config

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]
#: ``step_fn(model, batch) -> loss`` or ``-> (loss, output)``.
StepFn = Callable[[torch.nn.Module, Any], Any]
#: ``metrics_fn(output, batch) -> {name: mean over the batch}``.
MetricsFn = Callable[[Any, Any], dict[str, float]]
OptimizerLike = (
    torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
)
SchedulerLike = (
    torch.optim.lr_scheduler.LRScheduler
    | Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    | None
)
#: The stop vote's value for "the run's record cannot be written" (1 is a stop signal).
RECORD_FAILED = 2
#: Window metrics that add up over an epoch's windows (the rest: the last window's value).
ADDITIVE_METRICS = (
    "cross_node_bytes",
    "comm_wait_seconds",
    "skipped_steps",
    "sends",
    "merges",
    "blocking_averages",
)


def scheduler_from_config(
    optimizer: torch.optim.Optimizer, optim: Any, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The LR scheduler the ``optim`` config section names, counting epochs or optimizer
    steps as ``optim.scheduler_interval`` says (``step_size`` and ``milestones`` in that unit),
    after ``optim.warmup_steps`` steps of linear warm-up (step interval only)."""
    lr = torch.optim.lr_scheduler
    per_step = optim.scheduler_interval == "step"
    length = epochs * steps_per_epoch if per_step else epochs
    warmup = optim.warmup_steps if per_step else 0
    if optim.scheduler == "cosine":
        main = lr.CosineAnnealingLR(optimizer, T_max=max(length - warmup, 1))
    elif optim.scheduler == "step":
        main = lr.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    elif optim.scheduler == "multistep":
        main = lr.MultiStepLR(optimizer, milestones=list(optim.milestones), gamma=optim.gamma)
    elif warmup:
        main = lr.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        return None
    if not warmup:
        return main
    ramp = lr.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return lr.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15; a vote from another rank whose signal this rank did not see."""
    return signal.Signals(signum).name if signum else "a signal on another rank"


def _accuracy_applies(output: Any, target: Any) -> bool:
    """Accuracy is counted only for logits ``[B, C]`` against integer classes ``[B]``."""
    return (
        isinstance(output, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and output.dim() == 2
        and output.is_floating_point()
        and target.dim() == 1
        and not target.is_floating_point()
        and output.shape[0] == target.shape[0]
    )


def epoch_row(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch's metrics from its windows' rows: the loss over all of them, the additive
    counters summed, the schedule's knobs as in the last window; ``windows`` itself when
    there is more than one."""
    row = {k: v for k, v in windows[-1].items() if k not in ("window", "loss_sum", "samples")}
    if len(windows) > 1:
        samples = sum(w["samples"] for w in windows)
        row["train_loss"] = sum(w["loss_sum"] for w in windows) / samples if samples else None
        for key in ADDITIVE_METRICS:
            if key in row:
                row[key] = sum(w[key] for w in windows)
        row["windows"] = [
            {k: v for k, v in w.items() if k not in ("loss_sum", "samples")} for w in windows
        ]
    return row


class Trainer(Checkpointing):
    """Data-parallel training of ``model`` with the strategy the config names (DASO by default).

    Args:
        model: the user's ``torch.nn.Module`` (its output may be a tensor, a tuple or a dict);
            rank 0's parameters and buffers are broadcast to every rank (so pretrained weights
            survive), nothing is re-initialised.
        optimizer: an optimizer over ``model``'s parameters, or a factory
            ``params -> optimizer``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` (mean over the batch) for
            ``(inputs, target)`` batches, e.g. ``torch.nn.functional.cross_entropy`` on
            ``output[B, C]`` float and ``target[B]`` int64; ``None`` with ``step_fn``.
        config: a :class:`daso.config.Config` (from :func:`daso.load_config`).
        lr_scheduler: an LR scheduler, or a factory ``optimizer -> scheduler``, stepped per
            epoch or per optimizer step (``optim.scheduler_interval``); default: the one
            ``config.optim`` names.
        groups: process groups from :func:`daso.topology.init_distributed` (default: created
            here from the launcher's environment).
        step_fn: ``step_fn(model, batch) -> loss`` or ``-> (loss, output)``, for batches of
            any structure (dicts, nested tuples); used for training and validation.
        metrics_fn: ``metrics_fn(output, batch) -> {name: mean over the batch}``, validation
            metrics reported as ``val_<name>`` (weighted by batch size over all ranks).
        perplexity: also report ``val_perplexity = exp(val_loss)`` (a loss in nats per token).

    Attributes:
        epoch: epochs completed; ``batch``: micro-batches done of the next (mid-epoch resume).
        history: the per-epoch metric rows (see :meth:`fit`).
        dist: the :class:`~daso.distributed.Distributed` the loop steps (``model``,
            ``optimizer``, ``strategy`` are its).
        checkpoint_dir: where :meth:`save_checkpoint` writes (``config.checkpoint_folder()``).
        stop_at_epoch: set to stop (checkpoint, :attr:`stopped`) after that many epochs.
        stopped: why :meth:`fit` returned before the last epoch (a signal's name), or ``None``.
        control: heartbeats and the stop vote (:class:`~daso.comm.control.ControlPlane`).

    Resume with :meth:`resume` before :meth:`fit`; see :mod:`daso.resume`.

    Raises:
        TopologyError: the launcher's environment describes an impossible cluster.
        ConfigError: the strategy's options are inconsistent, or neither ``loss_fn`` nor
            ``step_fn`` is given.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerLike,
        loss_fn: LossFn | None,
        config: Config,
        lr_scheduler: SchedulerLike = None,
        groups: ProcessGroups | None = None,
        *,
        step_fn: StepFn | None = None,
        metrics_fn: MetricsFn | None = None,
        perplexity: bool = False,
    ) -> None:
        if (loss_fn is None) == (step_fn is None):
            raise ConfigError("Trainer: give exactly one of loss_fn and step_fn")
        self.config = config
        tcfg = config.trainer
        if tcfg.num_threads:
            torch.set_num_threads(tcfg.num_threads)
        self.owns_groups = groups is None
        self.groups = groups or init_distributed(
            tcfg.device, tcfg.timeout_seconds, cuda_aware_mpi=tcfg.cuda_aware_mpi
        )
        self.topology = self.groups.topology
        self.rank = self.topology.rank
        configure_logging(self.rank)
        self.device = self.groups.device
        self.loss_fn, self.step_fn, self.metrics_fn = loss_fn, step_fn, metrics_fn
        self.perplexity = perplexity
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model.parameters())
        self.dist = Distributed(
            model,
            optimizer,
            config.strategy.name,
            config.strategy_options(),
            steps_per_epoch=None,
            epochs=tcfg.epochs,
            accumulate_steps=tcfg.accumulate_steps,
            grad_clip_norm=tcfg.grad_clip_norm,
            amp=tcfg.amp,
            nan_policy=tcfg.nan_policy,
            max_skipped_steps=tcfg.max_skipped_steps,
            deterministic=tcfg.deterministic,
            timeout_seconds=tcfg.timeout_seconds,
            groups=self.groups,
            preemption=False,
        )
        self._scheduler_arg = lr_scheduler
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._scheduler_state: dict[str, Any] | None = None  # loaded before fit builds it
        self.epoch = 0
        self.batch = 0  # micro-batches of ``self.epoch`` already trained (mid-epoch resume)
        self.windows: list[dict[str, Any]] = []  # the current epoch's closed windows
        self.history: list[dict[str, Any]] = []
        check_loggers(tcfg.loggers)  # on every rank, before any work
        self.run_id = self._agree_on_run_id()
        if not tcfg.output_dir:  # the Python API's default: a folder of the run's own
            tcfg.output_dir = str(Path("runs") / self.run_id)
        self.output_dir = Path(tcfg.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.metrics_log = MetricsLog(self.output_dir, self.rank, tcfg.loggers)
        self.checkpoint_dir = config.checkpoint_folder()
        self.own_checkpoints: list[str] = []  # this run's files there, newest first
        self.run_folder = RunFolder(self.output_dir, self.checkpoint_dir, self.run_id)
        self._replay_scheduler = False  # a resume changed what the LR schedule depends on
        self._progress_line: float | None = None  # when rank 0 last logged a progress line
        self.stopped: str | None = None  # why the run stopped before its last epoch
        self.stop_at_epoch: int | None = None  # stop (with a checkpoint) after this many epochs
        self._resumed_rng: dict[str, Any] | None = None
        self._resumed = False
        self._stop_requested = False
        self.control = ControlPlane(self.groups, self.strategy.lockstep, tcfg.timeout_seconds)
        self._closed = False
        register_open(self)
        if not self.control.lockstep and config.checkpoint.every_batches:
            log.warning(
                "checkpoint.every_batches is ignored by %s: its nodes run on their own clocks, "
                "so checkpoints are taken at epoch ends (and on SIGTERM/SIGUSR1)",
                self.strategy.name,
                extra=ONCE,
            )

    def _agree_on_run_id(self) -> str:
        """Rank 0's new run id, on every rank (a resume later takes the checkpoint's)."""
        box = [new_run_id()]
        if dist.is_initialized() and self.topology.world_size > 1:
            dist.broadcast_object_list(box, src=0, group=self.groups.world_group)
        return box[0]

    def _collective(self) -> bool:
        return dist.is_initialized() and self.topology.world_size > 1

    def _prepare(
        self, train_dataset: Dataset, val_dataset: Dataset | None
    ) -> tuple[DataLoader, DataLoader | None]:
        """Collective, at the start of :meth:`fit`: the loaders, the run's length, the LR
        schedule; rank 0 claims the output folder (lock; a new run refuses another run's
        results), writes ``run.json`` and opens the loggers. A problem on any rank stops every
        rank, printed once.

        Raises:
            ConfigError, DataError, CheckpointError: on every rank, if any rank found one.
        """
        self._operation = "start of training: loaders, schedule and the output folder"
        hosts: list[Any] = [self.topology.hostname]
        if self._collective():
            hosts = [None] * self.topology.world_size
            dist.all_gather_object(hosts, self.topology.hostname, group=self.groups.world_group)
        error: DasoError | None = None
        loaders: Any = None
        try:
            loader, steps_per_epoch = self._train_loader(train_dataset)
            self.dist.set_steps_per_epoch(steps_per_epoch)
            self.dist.step_count = (
                self.epoch * steps_per_epoch + self.batch // self.dist.accumulate_steps
            )
            self._build_scheduler(steps_per_epoch)
            val_loader = self._val_loader(val_dataset) if val_dataset is not None else None
            loaders = (loader, val_loader)
            if self.rank == 0:
                self.run_folder.run_id = self.run_id  # a resume took the checkpoint's
                self.run_folder.claim(self._resumed, self.config.trainer.overwrite)
                self.own_checkpoints = self.run_folder.recorded_checkpoints()
                config = self.config.model_dump(mode="json")
                layout = self.topology.ranks_per_node
                self.run_folder.write_record(config, layout, hosts, self._resumed)
                self.metrics_log.open(self.run_id, config, self.history, self.dist.step_count)
        except (ConfigError, DataError, CheckpointError) as err:
            error = err
        messages: list[Any] = [str(error) if error is not None else None]
        if self._collective():
            messages = [None] * self.topology.world_size
            dist.all_gather_object(
                messages, str(error) if error is not None else None, group=self.groups.world_group
            )
        raise_agreed(error, messages, self.rank)
        note_run_folder(self.output_dir)
        return loaders

    # -- what the loop steps -------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.dist.model

    @property
    def module(self) -> torch.nn.Module:
        return self.dist.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.dist.optimizer

    @property
    def strategy(self) -> Any:
        return self.dist.strategy

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.dist.scaler

    @property
    def _operation(self) -> str:
        return self.dist.operation

    @_operation.setter
    def _operation(self, value: str) -> None:
        self.dist.operation = value

    # -- data ----------------------------------------------------------------------------------
    def _train_loader(self, dataset: Dataset) -> tuple[DataLoader, int]:
        cfg = self.config
        world = self.topology.world_size
        return train_loader(dataset, self.rank, world, cfg.data, cfg.trainer, self.device)

    def _val_loader(self, dataset: Dataset) -> DataLoader:
        return val_loader(dataset, self.rank, self.topology.world_size, self.config.data)

    def _build_scheduler(self, steps_per_epoch: int) -> None:
        arg, optim = self._scheduler_arg, self.config.optim
        if isinstance(arg, torch.optim.lr_scheduler.LRScheduler):
            self.lr_scheduler = arg
        elif arg is not None:
            self.lr_scheduler = arg(self.optimizer)
        else:
            epochs = self.config.trainer.epochs
            self.lr_scheduler = scheduler_from_config(
                self.optimizer, optim, epochs, steps_per_epoch
            )
        state, self._scheduler_state = self._scheduler_state, None
        if self.lr_scheduler is None or state is None:
            return
        if self._replay_scheduler and arg is None:
            # the resume changed trainer.epochs, optim.lr or the schedule: the new schedule,
            # stepped to where the checkpoint was (what a run with the new config would have)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                for _ in range(int(state.get("last_epoch", 0))):
                    self.lr_scheduler.step()
            log.info("LR schedule rebuilt for the new config: lr %.6g", self._lr())
        else:
            self.lr_scheduler.load_state_dict(state)

    # -- loop ----------------------------------------------------------------------------------
    def fit(
        self, train_dataset: Dataset, val_dataset: Dataset | None = None
    ) -> list[dict[str, Any]]:
        """Train until ``config.trainer.epochs`` epochs are done; evaluate after each if
        ``val_dataset``. After :meth:`resume`, continues where the checkpoint stopped; with
        :attr:`stop_at_epoch` set, stops (after a checkpoint) once that many epochs are done.

        Every rank must call it with the same datasets (each reads its own shard: a sampler's
        for a sized dataset, every ``world_size``-th item of an ``IterableDataset``, which is
        re-iterated when it ends before ``trainer.steps_per_epoch`` steps). Batches are moved
        to the device whatever their structure. Checkpoints are written as the ``checkpoint``
        config section says; SIGTERM or SIGUSR1 on any rank makes all ranks stop after the
        same step, write a checkpoint and return early with :attr:`stopped` saying why.

        Returns:
            One dict per epoch (also appended by rank 0 to ``<output_dir>/metrics.jsonl``):
            ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy`` (fraction in [0, 1],
            only for logits ``[B, C]`` against integer targets ``[B]``, else ``None``),
            ``val_<name>`` for each metric of ``metrics_fn``, the strategy's metrics (e.g.
            DASO's ``phase``, ``global_skips``, ``local_skips``, ``batches_to_wait``, ``sends``,
            ``merges``), ``cross_node_bytes`` (bytes handed to cross-node collectives this
            epoch, summed over ranks), ``comm_wait_seconds`` (mean over ranks),
            ``skipped_steps`` (non-finite steps skipped, summed over ranks), ``train_seconds``,
            ``epoch_seconds``, ``wall_seconds`` (since the run first started), ``lr``,
            ``strategy``, and ``windows`` (each window's row) when an epoch has several.

        Raises:
            ValueError: fewer training samples than ranks.
            ConfigError: an IterableDataset without ``trainer.steps_per_epoch``, or a schedule
                that does not fit the run's windows.
            NumericalError: a NaN/Inf loss or gradient with ``trainer.nan_policy: stop``.
            PeerFailureError: a collective failed or timed out because a rank died or hangs.
            CheckpointError: rank 0 could not write a checkpoint, or the ranks resumed
                different checkpoints (checked before the first batch).
        """
        loader, val_loader = self._prepare(train_dataset, val_dataset)
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
        if self.stopped:
            record_preemption(self.stopped)
        return self.history

    def _raise_if_ranks_lost(self, signum: int) -> None:
        """A stop signal while ranks are lost is the launcher's failure notice (MPICH's
        ``-disable-auto-cleanup`` sends SIGUSR1 to the survivors), not a pre-emption.

        Raises:
            PeerFailureError: naming the lost ranks.
        """
        lost = self.control.lost_ranks()
        if lost:
            raise PeerFailureError(
                f"rank {self.rank}: {_signal_name(signum)} came while rank(s) {lost} stopped "
                "answering (no heartbeat): a failure notice from the launcher, not a "
                "pre-emption; no checkpoint is written"
            )

    def _raise_if_peer_failure(self, err: BaseException) -> None:
        """Turn a communication failure into :class:`PeerFailureError` naming the lost ranks
        (see :func:`daso.faults.peer_failure`)."""
        failure = peer_failure(err, self.control, self.rank, self._operation)
        if failure is not None:
            raise failure from err

    def _validates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with validation (``trainer.eval_every_epochs``;
        the last epoch always does)."""
        every = self.config.trainer.eval_every_epochs
        last = epoch + 1 == self.config.trainer.epochs
        return last or (every > 0 and (epoch + 1) % every == 0)

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
        row: dict[str, Any] = {"epoch": epoch, **epoch_row(self.windows)}
        row["train_seconds"] = time.perf_counter() - begin
        self.windows = []
        self._operation = f"epoch {epoch}: validation"
        if val_loader is not None and self._validates(epoch):
            row.update(self._evaluate(val_loader))
        else:
            row["val_loss"] = row["val_accuracy"] = None
        row["lr"] = self._lr()
        if self.lr_scheduler is not None and self.config.optim.scheduler_interval == "epoch":
            self.lr_scheduler.step()
        row["epoch_seconds"] = time.perf_counter() - begin
        row["wall_seconds"] = time.perf_counter() - start
        row["strategy"] = self.strategy.name
        row["run_id"] = self.run_id
        self.epoch, self.batch = epoch + 1, 0
        self.history.append(row)
        self.metrics_log.write(row)
        self._operation = f"epoch {epoch}: stop vote"
        # in lockstep the per-step vote is the same everywhere; otherwise only finish() is;
        # rank 0 votes RECORD_FAILED when the run's record (metrics.jsonl) cannot be written
        vote = self.control.stop_vote.finish(RECORD_FAILED if self.metrics_log.failure else 0)
        if vote >= RECORD_FAILED:
            self.save_checkpoint()
            failure = RecordError(
                self.metrics_log.failure or "rank 0 could not write the run's record"
            )
            raise failure if self.rank == 0 else reported_elsewhere(failure)
        stop = bool(vote) or (self._stop_requested and self.control.lockstep)
        self._stop_requested = False
        if stop:
            self._raise_if_ranks_lost(signals.received)
            self.stopped = _signal_name(signals.received)
        elif self.stop_at_epoch is not None and self.epoch >= self.stop_at_epoch:
            self.stopped = f"stop_at_epoch={self.stop_at_epoch}"
        every = self.config.checkpoint.every_epochs
        due = every and self.epoch % every == 0
        if due or self.stopped or self.epoch == self.config.trainer.epochs:
            self.save_checkpoint()

    def _train_epoch(self, epoch: int, loader: DataLoader, signals: PreemptionSignals) -> bool:
        """Train (the rest of) ``epoch``; ``False`` if all ranks agreed to stop before its end."""
        dist_, acc = self.dist, self.dist.accumulate_steps
        micro_batches = dist_.steps_per_epoch * acc
        self.model.train()
        # draws the loader's seed: before the RNG restore
        batches = epoch_batches(loader, epoch, self.batch, self.config.data.batch_size)
        if self._resumed_rng is not None:
            ckpt.restore_rng_state(self._resumed_rng)
            self._resumed_rng = None
        every = self.config.checkpoint.every_batches if self.control.lockstep else None
        tcfg = self.config.trainer
        bar = Progress(
            dist_.steps_per_epoch,
            self.batch // acc,
            f"epoch {epoch}",
            enabled=self.rank == 0 and tcfg.progress is not False,
            interval=tcfg.progress_seconds,
            terminal=None if tcfg.progress is True else tcfg.progress == "bar",
            last_line=self._progress_line,
        )
        steps_log = StepLog(tcfg.log_every_steps, self.metrics_log, self.run_id, epoch)
        for batch in batches:
            batch = move_to(batch, self.device)
            with dist_.micro_batch():
                dist_.backward(self._loss(self.model, batch), samples=batch_size(batch))
            self.batch += 1
            if not dist_.ready:
                continue
            window = dist_.step()
            if window is not None:
                self.windows.append(window)
            lr = self._lr()
            if self.lr_scheduler is not None and self.config.optim.scheduler_interval == "step":
                self.lr_scheduler.step()
            steps_log.step(dist_, lr, batch_size(batch) * acc, self.rank == 0)
            bar.update(lambda: dist_.last_step_loss)
            steps = self.batch // acc
            self._operation = f"epoch {epoch} step {steps - 1}: stop vote"
            if self.control.stop_vote.exchange(1 if signals.received else 0):
                self._stop_requested = True
            if self.batch == micro_batches:
                break
            if self._stop_requested and not self.control.lockstep:
                # a node on its own clock ends its epoch here; all stop at the epoch end
                self.windows.append(dist_.end_epoch_early())
                break
            if self._stop_requested:
                bar.close()
                return False
            if every and steps % every == 0:
                self.save_checkpoint()
        bar.close()
        self._progress_line = bar.last
        return True

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self._forward(model, batch)[0]

    def _forward(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, Any, Any]:
        """``(loss, output, target)`` of ``batch`` (``output``/``target`` ``None`` where a
        ``step_fn`` does not return them)."""
        if self.step_fn is not None:
            result = self.step_fn(model, batch)
            if isinstance(result, tuple):
                return result[0], result[1], None
            return result, None, None
        inputs, target = split_pair(batch)
        output = model(inputs)
        return self.loss_fn(output, target), output, target

    def _evaluate(self, loader: DataLoader) -> dict[str, Any]:
        """``val_loss``, ``val_accuracy`` (or ``None``) and ``val_<metric>`` over all ranks."""
        module = unwrap(self.model)
        sums: dict[str, float] = {}
        loss_sum = correct = scored = count = 0.0
        with self.dist.evaluation():
            for batch in loader:
                batch = move_to(batch, self.device)
                n = batch_size(batch)
                loss, output, target = self._forward(module, batch)
                loss_sum += float(loss) * n
                count += n
                if _accuracy_applies(output, target):
                    correct += int((output.argmax(dim=1) == target).sum())
                    scored += n
                if self.metrics_fn is not None:
                    for name, value in self.metrics_fn(output, batch).items():
                        sums[name] = sums.get(name, 0.0) + float(value) * n
        names = sorted(sums)  # the same keys on every rank (one per metric of metrics_fn)
        totals = allreduce_sum(
            [loss_sum, count, correct, scored, *(sums[k] for k in names)], self.device
        )
        count = max(totals[1], 1)
        row: dict[str, Any] = {"val_loss": totals[0] / count}
        row["val_accuracy"] = totals[2] / count if totals[1] and totals[3] == totals[1] else None
        if self.perplexity:
            row["val_perplexity"] = math.exp(min(row["val_loss"], 700.0))
        row.update({f"val_{k}": v / count for k, v in zip(names, totals[4:], strict=True)})
        return row

    def evaluate(self, dataset: Dataset) -> dict[str, Any]:
        """Validation metrics of the current model on ``dataset``, over all ranks' shards.

        Returns:
            ``{"val_loss": mean loss, "val_accuracy": fraction correct or None, ...}``.
        """
        return self._evaluate(self._val_loader(dataset))

    def close(self, clean: bool = True) -> None:
        """Stop the strategy's communication threads and the heartbeat; leave
        ``torch.distributed`` if the trainer joined it (that is, no ``groups`` were passed in).

        Args:
            clean: ``False`` after a failure: skip everything that waits for other ranks (they
                may be gone); the process should then exit (the CLI aborts the MPI job).
        """
        if self._closed:
            return
        self._closed = True
        unregister_open(self)
        self.control.close(clean)
        self.metrics_log.close()
        self.run_folder.release()
        self.dist.close(clean)  # the strategy's threads (no groups of its own)
        if clean and self.owns_groups:
            shutdown_distributed()


#: Alias kept for readers of the DASO paper and Heat's ``DASO`` class.
DASOTrainer = Trainer
