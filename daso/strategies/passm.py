"""``passm``: partitioned asynchronous SGD on one model shared by the ranks of a node.

Kungurtsev, Egan, Chatterjee, Alistarh, "Asynchronous Optimization Methods for Efficient
Training of Deep Neural Networks with Guarantees", AAAI 2021 (arXiv 1905.11845): the ranks of
a node share **one** copy of the model in shared memory (:mod:`daso.comm.shared`), read it
without locks (a read may mix old and new values of a block another rank is writing), and each
rank updates only **its own block** of the parameters, with its own optimizer state (the
user's optimizer, SGD with momentum/Nesterov/weight decay or Adam: it skips parameters without
a gradient). Blocks are contiguous in ``parameters()`` order and balanced by element count
(:func:`partition_blocks`). A rank asks autograd only for its block's gradients (the other
parameters are ``requires_grad=False`` during its forward), so backward skips the weight
gradients of the other blocks and everything below the lowest tensor of its own block.

As in the authors' follow-up code (LPP-SGD), the first ``full_model_windows`` windows are
lock-free full-model updates by every rank (Hogwild), then block-only updates, optionally
alternating with full-model steps (``alternate``). In a full-model step each of the ``p`` ranks
applies ``gradient / p`` by default (``full_model_gradient: mean``), so one step of all ranks
moves the model as far as one data-parallel step over their batches; ``sum`` is plain Hogwild
(``p`` times that step: with the data-parallel LR it diverged in our ResNet-20 benchmark).

Across nodes (and across GPUs of a node), the leader of each shared copy (its lowest local
rank) averages it with the other copies over MPI every ``period`` steps, non-blocking,
through the delta wire over a float32 anchor (as :mod:`daso.strategies.averaging`): it sends
``x - anchor`` and, when the sum arrives, adds ``mean - x_sent`` to the shared copy, so the
node's progress made meanwhile is kept. Each window ends with a blocking average while the
node's ranks wait at a barrier, so every rank of every node ends the window with
bitwise-identical parameters.

BatchNorm: the running statistics live in the shared copy and every rank updates them in
place from its own batches (a lock-free moving average over all of the node's batches); they
are averaged across nodes with the parameters. Integer buffers (``num_batches_tracked``) stay
private to each rank.

Asynchronous runs are not bitwise reproducible (the interleaving of the ranks' reads and
writes changes from run to run); a resumed run starts from exactly the saved model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from mpi4py import MPI
from pydantic import AliasChoices, Field

from daso.comm import WIRE_DTYPES, CrossNodeSum, FlatBuffer, synced_state_tensors
from daso.comm.shared import SharedVector, share_vector
from daso.errors import ConfigError, TopologyError
from daso.options import StrategyOptions, WireDtype
from daso.strategies.base import EpochCounters, Strategy
from daso.topology import ProcessGroups

log = logging.getLogger(__name__)

#: The authors' scripts run full-model updates for 30 of 300 epochs: a tenth of the run.
FULL_MODEL_FRACTION = 10


def partition_blocks(numels: Sequence[int], num_blocks: int) -> list[tuple[int, int]]:
    """Cut tensors into ``num_blocks`` contiguous blocks balanced by element count.

    Boundary ``j`` is the tensor boundary nearest to ``j / num_blocks`` of all elements (kept
    strictly increasing), so every block holds ``total / num_blocks`` elements give or take
    the largest tensor's size.

    Args:
        numels: element counts of the tensors, in ``parameters()`` order.
        num_blocks: blocks wanted (the ranks sharing the model).

    Returns:
        ``[(start, stop), ...]``: block ``b`` holds tensors ``start <= i < stop``; the blocks
        cover ``range(len(numels))`` in order, each non-empty.

    Raises:
        ConfigError: fewer tensors than blocks, or ``num_blocks < 1``.
    """
    count = len(numels)
    if num_blocks < 1 or count < num_blocks:
        raise ConfigError(
            f"passm: {num_blocks} ranks share the model but it has {count} trainable tensors; "
            "each rank needs a block of at least one: use fewer ranks per node"
        )
    cumulative = [0]
    for n in numels:
        cumulative.append(cumulative[-1] + n)
    total = cumulative[-1]
    bounds = [0]
    for j in range(1, num_blocks):
        target = total * j / num_blocks
        low, high = bounds[-1] + 1, count - (num_blocks - j)
        best = min(range(low, high + 1), key=lambda i: (abs(cumulative[i] - target), i))
        bounds.append(best)
    bounds.append(count)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class PASSMOptions(StrategyOptions):
    full_model_windows: int | None = Field(
        None,
        ge=0,
        validation_alias=AliasChoices("full_model_windows", "full_model_epochs"),
        description="First windows of lock-free full-model updates by every rank (alias "
        "full_model_epochs); empty = a tenth of the run, as the authors' scripts.",
    )
    alternate: bool = Field(
        False, description="After them, alternate block-only and full-model steps."
    )
    full_model_gradient: Literal["mean", "sum"] = Field(
        "mean",
        description="Full-model steps apply gradient / ranks sharing the model (mean: one "
        "step of all ranks moves it like one data-parallel step) or the whole gradient (sum).",
    )
    period: int = Field(
        16, ge=1, description="Steps between the non-blocking averages of the shared copies."
    )
    wire_dtype: WireDtype = Field(
        "float32", description="Wire dtype of the averages (differences from the anchor)."
    )


class PASSMStrategy(Strategy):
    """PASSM inside a node, periodic delta-wire averaging of the shared copies across nodes.

    Options (:class:`PASSMOptions`):
        full_model_windows: windows (epochs by default) of full-model updates at the start;
            ``None``: ``windows // 10``.
        alternate: after those, odd steps update the full model, even steps the block.
        full_model_gradient: ``"mean"`` (default): in a full-model step each of the ``p``
            ranks sharing the model applies ``gradient / p``, so the ``p`` lock-free updates
            of one step add up to one step along the mean gradient of their batches, as
            data-parallel SGD takes it (for SGD with momentum, linear in the gradient;
            weight decay is applied by every rank); ``"sum"``: each rank applies its whole
            gradient (plain Hogwild: ``p`` times the step).
        period: steps between non-blocking averages of the shared copies, >= 1.
        wire_dtype: dtype of ``x - anchor`` on the MPI wire.

    Memory: one float32 copy of the synced state per node (and GPU) in shared memory instead
    of one per rank; the leader of each copy keeps a float32 anchor and, while an average is
    in flight, the difference it sent (two more ``[P]``).

    Raises:
        ConfigError (from :meth:`wrap`): a parameter or floating buffer that is not float32,
            or more ranks sharing the model than it has trainable tensors.
        TopologyError (from :meth:`wrap`): the node's ranks do not share memory.
    """

    name = "passm"
    summary = "Partitioned asynchronous SGD on a node-shared model (Kungurtsev et al. 2021)."
    Options = PASSMOptions

    def __init__(self, groups: ProcessGroups, epochs: int | None, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.period = self.options.period
        self.wire_dtype = WIRE_DTYPES[self.options.wire_dtype]
        self.step = 0
        self.window = 0
        self.averages = 0
        self.counters = EpochCounters()
        self.shared: SharedVector | None = None
        self.cross: CrossNodeSum | None = None
        self.anchor: torch.Tensor | None = None
        self._sent: torch.Tensor | None = None
        self._tensors: list[torch.Tensor] = []
        self._params: list[torch.Tensor] = []
        self._arrived: torch.Tensor | None = None  # a sum collected for a checkpoint
        self._full = True
        self.block: tuple[int, int] = (0, 0)

    # -- set-up ------------------------------------------------------------------------------
    @property
    def full_model_windows(self) -> int:
        """Windows of full-model updates at the start of the run."""
        if self.options.full_model_windows is not None:
            return self.options.full_model_windows
        return (self.epochs or 0) // FULL_MODEL_FRACTION

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer, self.model = optimizer, model
        tensors, _ = synced_state_tensors(model)
        odd = [tuple(t.shape) for t in tensors if t.dtype != torch.float32]
        if odd:
            raise ConfigError(
                f"passm shares float32 state, but tensors of shapes {odd[:3]} are not float32; "
                "keep the model in float32 (use trainer.amp for mixed precision)"
            )
        self._tensors = tensors
        self._params = [t for t in tensors if t.requires_grad]  # buffers never are
        topo, device = self.topology, self.groups.device
        world = self.groups.mpi_world
        if world is None:
            raise TopologyError(
                "passm shares the model among a node's ranks through MPI (a shared-memory "
                "window on the node's communicator), but this launcher gives every process its "
                f"own MPI world (torchrun); launch passm with mpiexec -n {topo.world_size} or srun"
            )
        gpu = device.index if device.type == "cuda" and device.index is not None else 0
        share_comm = world.Split(topo.node_rank * 4096 + gpu, key=topo.rank)
        error = None
        try:
            self.blocks = partition_blocks([p.numel() for p in self._params], share_comm.Get_size())
        except ConfigError as err:
            error = err
        if not world.allreduce(error is None, op=MPI.LAND):  # every rank stops, not one node
            raise error or ConfigError(
                "passm: another node has more ranks than the model has trainable tensors; "
                "use fewer ranks per node"
            )
        self.block = self.blocks[share_comm.Get_rank()]
        initial = FlatBuffer(tensors, device=device).pack()
        self.shared = share_vector(share_comm, initial, device)
        offset = 0
        for tensor in tensors:
            n = tensor.numel()
            tensor.data = self.shared.flat[offset : offset + n].view_as(tensor)
            offset += n
        self.leader = share_comm.Get_rank() == 0
        leaders = world.Split(0 if self.leader else MPI.UNDEFINED, key=topo.rank)
        self.copies = share_comm.bcast(leaders.Get_size() if self.leader else 0, root=0)
        if self.leader and self.copies > 1:
            self.cross = CrossNodeSum(
                leaders,
                self.shared.flat.numel(),
                self.wire_dtype,
                device,
                timeout=self.timeout,
                cuda_aware_mpi=self.groups.cuda_aware_mpi,
            )
            self.anchor = self.shared.flat.clone()
        if self.leader:
            log.info("passm: %s", self.describe_blocks())
        return model

    def describe_blocks(self) -> str:
        """One line: the shared memory's kind and each block's tensors and elements."""
        parts = []
        for rank, (start, stop) in enumerate(self.blocks):
            numel = sum(p.numel() for p in self._params[start:stop])
            parts.append(f"local rank {rank}: tensors {start}-{stop - 1} ({numel} elements)")
        return (
            f"node {self.topology.node_rank} shares the model ({self.shared.kind}, "
            f"{self.shared.flat.numel()} float32); " + "; ".join(parts)
        )

    # -- the steps ---------------------------------------------------------------------------
    def _is_full_step(self) -> bool:
        if self.window < self.full_model_windows:
            return True
        return self.options.alternate and self.step % 2 == 1

    def _set_full(self, full: bool) -> None:
        """Gradients for every parameter (``full``), or for this rank's block only; a no-op
        when the mode does not change (the model starts with every gradient on)."""
        if full == self._full:
            return
        start, stop = self.block
        for index, param in enumerate(self._params):
            param.requires_grad_(full or start <= index < stop)
        self._full = full

    def after_backward(self, batch: int) -> None:
        sharing = len(self.blocks)
        if self._full and sharing > 1 and self.options.full_model_gradient == "mean":
            for param in self._params:
                if param.grad is not None:
                    param.grad.div_(sharing)

    def begin_window(self, window: int, num_steps: int) -> None:
        super().begin_window(window, num_steps)
        self.window = window
        self._set_full(self._is_full_step())

    def after_step(self, batch: int) -> None:
        self.step += 1
        if self.cross is not None:
            if self._arrived is not None:
                self._finish_average(self._arrived)
            elif self.cross.pending is not None and self.cross.pending.done():
                self._finish_average(self.cross.wait())
            last = batch + 1 == self.window_length
            if self.step % self.period == 0 and not last and self.cross.pending is None:
                self._sent = self.shared.flat - self.anchor
                self.cross.start(self._sent, tag=f"passm average, step {self.step}")
        if batch + 1 == self.window_length:
            self._average_blocking()
        else:
            self._set_full(self._is_full_step())

    def _finish_average(self, summed: torch.Tensor) -> None:
        """Apply an arrived sum ``sum_n (x_n - anchor)`` (leader): ``x += mean - x_sent``
        (the node's progress since the send is kept), ``anchor <- mean``."""
        step = summed / self.copies
        self.shared.flat.add_(step - self._sent)
        self.anchor.add_(step)
        self._sent = self._arrived = None
        self.averages += 1

    def _node_barrier(self) -> None:
        if self.topology.local_world_size > 1:
            dist.barrier(group=self.groups.node_group)

    def _average_blocking(self) -> None:
        """The window's end: the node's ranks stop; the leaders average the copies."""
        self._node_barrier()
        if self.cross is not None:
            if self._arrived is not None:
                self._finish_average(self._arrived)
            elif self.cross.pending is not None:
                self._finish_average(self.cross.wait())
            flat = self.shared.flat
            summed = self.cross.allreduce(flat - self.anchor, tag=f"passm window {self.window}")
            self.anchor.add_(summed.div_(self.copies))
            flat.copy_(self.anchor)
            self.averages += 1
        if self.shared.flat.is_cuda:
            torch.cuda.synchronize(self.shared.flat.device)
        self._node_barrier()

    # -- reporting and state -----------------------------------------------------------------
    def window_metrics(self) -> dict[str, float]:
        bytes_sent, waited = (
            (self.cross.bytes_sent, self.cross.wait_seconds) if self.cross else (0, 0.0)
        )
        full = self.window < self.full_model_windows
        return {
            "phase": "full" if full else ("alternate" if self.options.alternate else "block"),
            "averages": self.averages,  # so far in the run, this rank's copy
            **self.counters.since_last(bytes_sent, waited),
        }

    def state_dict(self) -> dict[str, Any]:
        """Step counter, averages so far and, on leaders, the anchor and an average in flight
        (waited for, and applied at the next step as it would have been); the user's optimizer
        holds this rank's block state and is saved by the caller."""
        state: dict[str, Any] = {"step": self.step, "averages": self.averages}
        if self.anchor is not None:
            if self.cross.pending is not None:
                self._arrived = self.cross.wait().clone()
            state["anchor"] = self.anchor.cpu().clone()
            if self._arrived is not None:
                state["arrived"] = self._arrived.cpu().clone()
                state["sent"] = self._sent.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.averages = int(state["averages"])
        if self.anchor is not None:
            self.anchor.copy_(state["anchor"])
            if "arrived" in state:
                self._arrived = state["arrived"].to(self.anchor.device)
                self._sent = state["sent"].to(self.anchor.device)

    def close(self) -> None:
        """Wait for an average in flight, give every tensor private memory again, free the
        shared memory (collective over the node's sharing group)."""
        if self.cross is not None:
            if self.cross.pending is not None:
                self.cross.wait()
            self.cross.close()
            self.cross = None
        if self.shared is None:
            return
        for tensor in self._tensors:
            tensor.data = tensor.data.clone()
        for param in self._params:
            param.requires_grad_(True)
        self.shared.free()
        self.shared = None
