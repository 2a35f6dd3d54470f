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
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from daso.comm import allreduce_sum, broadcast_tensors, model_state_tensors, unwrap
from daso.log import configure_logging
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


class Trainer:
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
            {**config.strategy_options(), "timeout_seconds": tcfg.timeout_seconds},
        )
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
            sampler=sampler,
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
        """Train for ``config.trainer.epochs`` epochs; evaluate after each if ``val_dataset``.

        Every rank must call it with the same datasets (each reads its own shard). Samples are
        ``(input, target)`` pairs; batches are moved to the trainer's device.

        Returns:
            One dict per epoch (also appended by rank 0 to ``<output_dir>/metrics.jsonl``):
            ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy`` (fraction in [0, 1]),
            ``global_skips``, ``local_skips``, ``batches_to_wait``, ``cross_node_bytes``
            (bytes handed to cross-node collectives this epoch, summed over ranks),
            ``comm_wait_seconds`` (mean over ranks), ``train_seconds`` (the epoch's training
            loop, without evaluation), ``epoch_seconds``, ``wall_seconds``
            (since ``fit`` started), ``lr``, ``strategy``.

        Raises:
            ValueError: fewer training samples than ranks.
            CommTimeoutError: a peer stopped answering during a cross-node sync.
        """
        loader = self._train_loader(train_dataset)
        val_loader = self._val_loader(val_dataset) if val_dataset is not None else None
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.config.trainer.seed + 1000 + self.rank)  # augmentation, dropout
        start = time.perf_counter()
        for epoch in range(self.epoch, self.config.trainer.epochs):
            begin = time.perf_counter()
            train_loss, metrics = self._train_epoch(epoch, loader)
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_seconds": time.perf_counter() - begin,
            }
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
            self.epoch = epoch + 1
            self.history.append(row)
            self._report(row)
        return self.history

    def _train_epoch(self, epoch: int, loader: DataLoader) -> tuple[float, dict[str, Any]]:
        loader.sampler.set_epoch(epoch)
        self.model.train()
        num_batches = len(loader)
        self.strategy.begin_epoch(epoch, num_batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples = 0
        clip = self.config.trainer.grad_clip_norm
        bar = tqdm(
            total=num_batches,
            desc=f"epoch {epoch}",
            leave=False,
            dynamic_ncols=True,
            disable=self.rank != 0 or not self.config.trainer.progress,
        )
        for batch, (inputs, targets) in enumerate(loader):
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            self.optimizer.zero_grad()  # set_to_none by default; Horovod's takes no argument
            with self.strategy.sync_context(batch):
                with self._autocast():
                    loss = self.loss_fn(self.model(inputs), targets)
                self.scaler.scale(loss).backward()
            self.strategy.after_backward(batch)
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            with self.strategy.step_context():
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.strategy.after_step(batch)
            loss_sum += loss.detach().double() * len(targets)
            samples += len(targets)
            bar.update()
        bar.close()
        metrics = self.strategy.epoch_metrics()
        total_loss, total_samples, sent, waited = allreduce_sum(
            [loss_sum.item(), samples, metrics["cross_node_bytes"], metrics["comm_wait_seconds"]],
            self.device,
        )
        train_loss = total_loss / max(total_samples, 1)
        metrics["cross_node_bytes"] = int(sent)
        metrics["comm_wait_seconds"] = waited / self.topology.world_size
        self.strategy.end_epoch(epoch, train_loss)
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

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, LR scheduler, GradScaler, strategy state and the epoch counter."""
        return {
            "epoch": self.epoch,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (on every rank)."""
        self.epoch = int(state["epoch"])
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])

    def close(self) -> None:
        """Stop the strategy's communication threads; leave ``torch.distributed`` if the
        trainer joined it (that is, no ``groups`` were passed in)."""
        self.strategy.close()
        if self.owns_groups:
            shutdown_distributed()


#: Alias kept for readers of the DASO paper and Heat's ``DASO`` class.
DASOTrainer = Trainer
