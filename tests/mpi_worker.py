"""Scenarios run on every rank by ``tests/mpi_harness.py`` (``python mpi_worker.py NAME OUT``).

Each scenario builds the real process groups, runs real library code, and saves what the
test needs to check (tensors, hashes, flags) to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from daso.comm import CrossNodeSum, FlatBuffer, model_state_tensors, optimizer_state_tensors
from daso.config import load_config
from daso.schedule import SyncParams
from daso.strategies import DASOStrategy
from daso.topology import ProcessGroups

from mpi_harness import ROOT, worker_main


def tiny_model(batch_norm: bool = True) -> torch.nn.Module:
    norm = torch.nn.BatchNorm1d(16) if batch_norm else torch.nn.Identity()
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), norm, torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


def digest(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes: equal digests mean bitwise-identical values."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def topology_info(groups: ProcessGroups) -> dict[str, Any]:
    t = groups.topology
    return {
        "rank": t.rank,
        "node": t.node_rank,
        "local_rank": t.local_rank,
        "node_ranks": t.node_ranks,
        "num_nodes": t.num_nodes,
    }


def scenario_merge(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """One send and merge (or blocking average for W = 0) with known per-node values (the
    ranks of a node agree, as node-local gradient averaging keeps them)."""
    node = groups.topology.node_rank
    cases = []
    for downcast in ("float32", "bfloat16"):
        for w in (0, 1, 2):
            torch.manual_seed(0)
            model = tiny_model()
            strategy = DASOStrategy(
                groups,
                epochs=1,
                warmup_windows=0,
                cooldown_windows=0,
                downcast=downcast,
                merge="staleness",
            )
            strategy.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
            state = FlatBuffer(model_state_tensors(model))
            anchor = strategy.averager.anchor.clone()  # the initial model, on every rank

            def fill(seed: int, state: FlatBuffer = state) -> torch.Tensor:
                values = torch.randn(state.numel, generator=torch.Generator().manual_seed(seed))
                state.unpack(values)
                return values.clone()

            sent = fill(100 * (w + 1) + node)
            strategy.begin_window(0, 10)
            if w == 0:
                strategy.schedule.params = SyncParams(0, 1, 0, "warmup")
                strategy.after_step(0)
                local = sent
            else:
                strategy.schedule.params = SyncParams(4, 1, w, "cycling")
                strategy.after_step(0)
                local = fill(1000 * (w + 1) + node)
                for batch in range(1, w + 1):
                    strategy.after_step(batch)
            assert strategy.pending is None
            cases.append(
                {
                    "downcast": downcast,
                    "w": w,
                    "sent": sent,
                    "anchor": anchor,
                    "local": local,
                    "final": state.pack().clone(),
                }
            )
            strategy.close()
    return {"topology": topology_info(groups), "cases": cases}


def scenario_consistency(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """Train DASO through the Trainer; record state digests per batch and per epoch."""
    from daso.cli import build_datasets
    from daso.models import build_model
    from daso.trainer import Trainer

    config = load_config(
        None,
        [
            "trainer.epochs=6",
            "trainer.progress=false",
            "trainer.num_threads=1",
            f"trainer.output_dir={params['out']}",
            "data.batch_size=16",
            "data.train_subset=1024",
            "data.val_size=256",
            "strategy.warmup_windows=0",
            "strategy.cooldown_windows=1",
            "strategy.max_global_skips=8",
            "strategy.patience=0",
            "strategy.stability_level=0.99",
        ],
    )
    train_set, val_set = build_datasets(config)
    torch.manual_seed(0)
    model = build_model("mnist_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, optimizer, torch.nn.functional.cross_entropy, config, groups=groups)
    strategy = trainer.strategy
    batches: list[dict[str, Any]] = []
    epochs: list[str] = []
    after_step, end_window = strategy.after_step, strategy.end_window

    def record_batch(batch: int) -> None:
        p = strategy.schedule.params
        after_step(batch)
        batches.append(
            {
                "epoch": strategy.schedule.window,
                "batch": batch,
                "local_skips": p.local_skips,
                "global_skips": p.global_skips,
                "local_sync": p.is_local_sync_batch(batch),
                "params": digest(list(model.parameters())),
            }
        )

    def record_epoch(epoch: int, loss: float) -> None:
        epochs.append(digest(model_state_tensors(model) + optimizer_state_tensors(optimizer)))
        end_window(epoch, loss)

    strategy.after_step, strategy.end_window = record_batch, record_epoch
    history = trainer.fit(train_set, val_set)
    trainer.close()
    return {
        "topology": topology_info(groups),
        "batches": batches,
        "epochs": epochs,
        "history": history,
        "synced_numel": strategy.averager.state.numel,
        "optimizer_numel": sum(t.numel() for t in optimizer_state_tensors(optimizer)),
    }


def scenario_progress(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """Start a non-blocking cross-node sum, compute without calling MPI, see if it finished."""
    results = []
    for poll in (0.0, 0.002):
        cross = CrossNodeSum(groups.cross_comm, 2_000_000, torch.bfloat16, poll_interval=poll)
        values = torch.full((2_000_000,), float(groups.topology.rank + 1))
        pending = cross.start(values)
        a = torch.randn(256, 256)
        deadline = time.perf_counter() + 1.5
        while time.perf_counter() < deadline and not pending.done():
            a = torch.tanh(a @ a)  # compute only: no MPI call on this thread
        done_before_wait = pending.done()
        total = cross.wait()
        results.append(
            {
                "poll": poll,
                "done_before_wait": done_before_wait,
                "sum": float(total[0]),
                "all_equal": bool((total == total[0]).all()),
            }
        )
        cross.close()
    return {"topology": topology_info(groups), "results": results}


def scenario_trainer_features(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's weights survive wrapping; AMP (bf16 autocast), clipping and a StepLR run."""
    from daso.cli import build_datasets
    from daso.trainer import Trainer

    config = load_config(
        None,
        [
            "trainer.epochs=3",
            "trainer.progress=false",
            f"trainer.output_dir={params['out']}",
            "trainer.amp=true",
            "trainer.grad_clip_norm=1.0",
            "optim.scheduler=step",
            "optim.step_size=1",
            "optim.gamma=0.5",
            "data.batch_size=32",
            "data.train_subset=1024",
            "data.val_size=500",
            "strategy.warmup_windows=1",
            "strategy.cooldown_windows=1",
            "strategy.downcast=float16",
        ],
    )
    train_set, val_set = build_datasets(config)
    torch.manual_seed(groups.topology.rank)  # a different "pretrained" model on every rank
    model = tiny_image_model()
    before = [t.clone() for t in model_state_tensors(model)]
    trainer = Trainer(
        model,
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        torch.nn.functional.cross_entropy,
        config,
        groups=groups,
    )
    after_wrap = [t.clone() for t in model_state_tensors(model)]
    history = trainer.fit(train_set, val_set)
    state = trainer.state_dict()
    trainer.close()
    return {
        "before": before,
        "after_wrap": after_wrap,
        "history": history,
        "final": digest(model_state_tensors(model)),
        "schedule": state["strategy"],
    }


def tiny_image_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 13 * 13, 10),
    )


def scenario_equivalence(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """Run each strategy for a few steps on fixed per-rank data; record parameters after every
    step and the cross-node bytes counted. A strategy entry is ``(label, name, options)``
    (plain SGD, lr 0.1) or ``(label, name, options, "adam")`` (Adam, lr 0.01, no BatchNorm)."""
    from daso.strategies import build_strategy

    rank = groups.topology.rank
    data = torch.Generator().manual_seed(1234 + rank)
    batches = [
        (torch.randn(6, 8, generator=data), torch.randint(0, 4, (6,), generator=data))
        for _ in range(params.get("steps", 8))
    ]
    runs = {}
    for label, name, options, *optimizer_name in params["strategies"]:
        torch.manual_seed(0)
        adam = optimizer_name == ["adam"]
        # Adam without BatchNorm: the gradient of a bias before BatchNorm is rounding noise,
        # which Adam's normalisation turns into steps of size lr
        model = tiny_model(batch_norm=not adam)
        if adam:
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        strategy = build_strategy(name, groups, epochs=1, options=options)
        wrapped = strategy.wrap(model, optimizer)
        strategy.begin_window(0, len(batches) + 1)  # no epoch end inside the run
        trace, before_sync, pre_step, centers = [], [], [], []
        numel = sum(p.numel() for p in model.parameters())

        def flat_params(model: torch.nn.Module = model) -> torch.Tensor:
            return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

        for batch, (inputs, targets) in enumerate(batches):
            strategy.optimizer.zero_grad()
            with strategy.sync_context(batch):
                torch.nn.functional.cross_entropy(wrapped(inputs), targets).backward()
            strategy.after_backward(batch)
            pre_step.append(flat_params())
            with strategy.step_context():
                strategy.optimizer.step()
            before_sync.append(flat_params())
            strategy.after_step(batch)
            trace.append(flat_params())
            if hasattr(strategy, "center"):  # parameters come first in the center's layout
                centers.append(strategy.center[:numel].clone())
        runs[label] = {
            "trace": trace,
            "before_sync": before_sync,
            "pre_step": pre_step,
            "centers": centers,
            "metrics": strategy.window_metrics(),
            "numel": sum(p.numel() for p in model.parameters()),
            "state_numel": sum(t.numel() for t in model_state_tensors(model)),
        }
        strategy.close()
    return {"topology": topology_info(groups), "runs": runs}


def center_strategies(groups: ProcessGroups, params: dict[str, Any]) -> Iterator[tuple]:
    """For each ``(label, name, options)`` of ``params["strategies"]``: a fresh tiny model
    wrapped by that parameter-server strategy, its flat state, and a step function that runs
    one training step on this rank's next batch and returns ``(pre_step, before_sync)``."""
    from daso.strategies import build_strategy

    data = torch.Generator().manual_seed(1234 + groups.topology.rank)
    for label, name, options in params["strategies"]:
        torch.manual_seed(0)
        model = tiny_model()
        strategy = build_strategy(name, groups, epochs=1, options=options)
        wrapped = strategy.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
        state = FlatBuffer(model_state_tensors(model))
        strategy.begin_window(0, 10**9)

        def step(batch: int, strategy=strategy, wrapped=wrapped, state=state) -> tuple:
            inputs = torch.randn(6, 8, generator=data)
            targets = torch.randint(0, 4, (6,), generator=data)
            strategy.optimizer.zero_grad()
            with strategy.sync_context(batch):
                torch.nn.functional.cross_entropy(wrapped(inputs), targets).backward()
            strategy.after_backward(batch)
            pre_step = state.pack().clone()
            strategy.optimizer.step()
            before_sync = state.pack().clone()
            return pre_step, before_sync

        yield label, strategy, state, step


def scenario_center_round_robin(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """The paper's round-robin scheme: on turn t only node t % p steps (and exchanges when its
    own clock says so); world barriers around it, then every node pulls the center. Then a
    state_dict round trip: perturb, load, restore."""
    import torch.distributed as dist

    topo = groups.topology
    runs = {}
    for label, strategy, state, step in center_strategies(groups, params):
        initial = state.pack().clone()
        turns = []
        for turn in range(params["turns"]):
            active = turn % topo.num_nodes
            record: dict[str, Any] = {"active": active}
            if topo.node_rank == active:
                record["pre_step"], record["before_sync"] = step(turn)
                reference = getattr(strategy, "reference", None)
                record["reference"] = None if reference is None else reference.clone()
                strategy.after_step(turn)
                record["after"] = state.pack().clone()
            dist.barrier()  # the active node's exchange has been applied by every server
            record["center"] = strategy.pull_center().clone()
            dist.barrier()  # nobody starts the next turn before everyone has pulled
            turns.append(record)
        saved = strategy.state_dict()
        changed = {
            key: value + 1 if isinstance(value, torch.Tensor) else value
            for key, value in saved.items()
        }
        changed["step"] = saved["step"] + 5
        strategy.load_state_dict(changed)
        dist.barrier()
        changed_center = strategy.pull_center().clone()
        dist.barrier()
        strategy.load_state_dict(saved)
        restored = strategy.state_dict()
        dist.barrier()
        restored_center = strategy.pull_center().clone()
        runs[label] = {
            "initial": initial,
            "turns": turns,
            "saved": saved,
            "restored": restored,
            "changed_center": changed_center,
            "restored_center": restored_center,
        }
        strategy.close()
    return {"topology": topology_info(groups), "runs": runs}


def scenario_center_slow_node(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """Every node steps for ``seconds`` of wall time; the last node sleeps ``sleep`` seconds in
    each of its steps. Records each node's step count and the sums the conservation laws need:
    DOWNPOUR's pushed updates, and the local moves (everything but the elastic term) of
    asynchronous EASGD, both in float64."""
    import torch.distributed as dist

    from daso.comm import broadcast

    topo = groups.topology
    slow = topo.node_rank == topo.num_nodes - 1
    leader = topo.global_rank(topo.node_rank, 0)
    runs = {}
    for label, strategy, state, step in center_strategies(groups, params):
        initial = state.pack().clone()
        local_moves = torch.zeros(state.numel, dtype=torch.float64)
        pushed = torch.zeros(state.numel, dtype=torch.float64)
        previous = initial.clone()
        steps = 0
        dist.barrier()
        start = time.perf_counter()
        while True:
            go = torch.tensor([float(time.perf_counter() - start < params["seconds"])])
            broadcast(go, leader, groups.node_group)  # the node stops as one
            if not go.item():
                break
            if slow:
                time.sleep(params["sleep"])
            _, before_sync = step(steps)
            local_moves += (before_sync - previous).double()
            if strategy.name == "downpour" and strategy.is_exchange_step():
                pushed += (before_sync - strategy.reference).double()
            strategy.after_step(steps)
            previous = state.pack().clone()
            steps += 1
        elapsed = time.perf_counter() - start
        dist.barrier()
        center = strategy.pull_center().clone()
        runs[label] = {
            "steps": steps,
            "exchanges": strategy.exchanges,
            "elapsed": elapsed,
            "initial": initial,
            "final": state.pack().clone(),
            "center": center,
            "local_moves": local_moves,
            "pushed": pushed,
            "state": strategy.state_dict(),
        }
        dist.barrier()
        strategy.close()
    return {"topology": topology_info(groups), "runs": runs}


def scenario_resume_disagreement(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """One epoch with a checkpoint in a shared folder; then rank 0 resumes it while rank 1's
    folder is empty (a checkpoint folder not shared by the nodes): ``fit`` must refuse on both."""
    from daso.cli import build_datasets
    from daso.errors import CheckpointError
    from daso.trainer import Trainer

    def trainer(folder: str) -> Trainer:
        config = load_config(
            None,
            [
                "strategy.name=ddp",
                "trainer.epochs=2",
                "trainer.progress=false",
                f"trainer.output_dir={Path(params['out']) / folder}",
                "data.batch_size=16",
                "data.train_subset=64",
                "data.val_size=32",
            ],
        )
        model = tiny_image_model()
        return Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.nn.functional.cross_entropy,
            config,
            groups=groups,
        )

    first = trainer("shared")
    first.stop_at_epoch = 1
    data = build_datasets(first.config)
    first.fit(*data)
    first.close()
    second = trainer("shared" if groups.topology.rank == 0 else f"own{groups.topology.rank}")
    resumed = second.resume("auto")
    try:
        second.fit(*data)
        error = None
    except CheckpointError as err:
        error = str(err)
    second.close()
    return {"resumed": None if resumed is None else resumed.name, "error": error}


def daso_on(groups: ProcessGroups, model: torch.nn.Module, **options: Any) -> DASOStrategy:
    """A DASO strategy wrapped around ``model`` (plain SGD), no warm-up or cool-down."""
    strategy = DASOStrategy(groups, epochs=1, warmup_windows=0, cooldown_windows=0, **options)
    strategy.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return strategy


def blocking_daso(
    groups: ProcessGroups, model: torch.nn.Module, value: float, downcast: str
) -> DASOStrategy:
    """``model``'s weight set to ``value`` everywhere, under DASO blocking after every batch."""
    torch.nn.init.constant_(model.weight, value)
    strategy = daso_on(groups, model, downcast=downcast)
    strategy.begin_window(0, 1000)
    strategy.schedule.params = SyncParams(0, 1, 0, "warmup")
    return strategy


@contextlib.contextmanager
def counting_broadcasts() -> Iterator[list[int]]:
    """Inside the block, every node-local broadcast of the averager is recorded (its element
    count) in the list yielded."""
    from daso.strategies import averaging

    calls: list[int] = []
    real = averaging.broadcast

    def counted(tensor: torch.Tensor, src: int, group: Any = None) -> None:
        calls.append(tensor.numel())
        real(tensor, src, group)

    averaging.broadcast = counted
    try:
        yield calls
    finally:
        averaging.broadcast = real


def seeded(numel: int, *seed: int) -> torch.Tensor:
    """Reproducible float32 normal values of ``numel`` elements for a tuple of ints."""
    generator = torch.Generator().manual_seed(hash(seed) % (2**31))
    return torch.randn(numel, generator=generator)


def scenario_anchor(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """The delta wire on the real averager: small-update drift over 100 blocking averages, one
    average of large weights, the epoch-end average of a node whose ranks differ, and the
    rotation of senders with and without the outer optimizer. Values are recorded; the test
    computes the expectations with NumPy."""
    topo = groups.topology
    out: dict[str, Any] = {"topology": topology_info(groups)}

    drift = {}
    for downcast in ("bfloat16", "float32"):
        model = torch.nn.Linear(8, 8, bias=False)
        strategy = blocking_daso(groups, model, 0.05, downcast)
        for batch in range(100):
            with torch.no_grad():
                model.weight.add_(5e-5)
            strategy.after_step(batch)
        drift[downcast] = model.weight.detach().clone()
        strategy.close()
    out["drift"] = drift

    large = {}
    for downcast in ("bfloat16", "float32"):
        model = torch.nn.Linear(64, 8, bias=False)
        strategy = blocking_daso(groups, model, 1000.0, downcast)
        delta = 1e-3 * seeded(model.weight.numel(), 7, topo.node_rank)
        with torch.no_grad():
            model.weight.add_(delta.view_as(model.weight))
        strategy.after_step(0)
        large[downcast] = {"delta": delta, "final": model.weight.detach().clone().reshape(-1)}
        strategy.close()
    out["large"] = large

    torch.manual_seed(0)
    model = tiny_model()
    strategy = daso_on(groups, model, downcast="float32", sync_optimizer_state=False)
    state = FlatBuffer(model_state_tensors(model))
    strategy.begin_window(0, 4)
    strategy.schedule.params = SyncParams(8, 8, 1, "cycling")
    strategy.sync_context(1)  # a batch without node-local sync: the node's ranks may differ
    mine = seeded(state.numel, 11, topo.rank)
    state.unpack(mine)
    strategy.after_step(3)  # the last batch: the blocking epoch-end average
    out["epoch_end"] = {"mine": mine, "final": state.pack().clone()}
    strategy.close()

    rotation = []
    for outer in (
        ("none", 0.7, 0.9, "staleness"),
        ("nesterov", 1.0, 0.0, "staleness"),
        ("nesterov", 0.7, 0.9, "staleness"),
        ("nesterov", 0.7, 0.9, "progress"),
    ):
        torch.manual_seed(0)
        model = tiny_model()
        strategy = daso_on(
            groups,
            model,
            downcast="float32",
            outer_optimizer=outer[0],
            outer_lr=outer[1],
            outer_momentum=outer[2],
            merge=outer[3],
            outer_step_at="every_sync",
        )
        state = FlatBuffer(model_state_tensors(model))
        anchor = strategy.averager.anchor.clone()
        strategy.begin_window(0, 100)
        strategy.schedule.params = SyncParams(2, 1, 1, "cycling")
        sends = []
        for i in range(4):
            # every rank its own values: the node's ranks differ, as after local skips
            sent = seeded(state.numel, 21, i, topo.rank)
            state.unpack(sent)
            strategy.after_step(2 * i)
            local = seeded(state.numel, 22, i, topo.rank)
            state.unpack(local)
            with counting_broadcasts() as broadcasts:
                strategy.after_step(2 * i + 1)
            sends.append(
                {
                    "sent": sent,
                    "local": local,
                    "final": state.pack().clone(),
                    "anchor": strategy.averager.anchor.clone(),
                    "broadcasts": broadcasts,
                }
            )
        rotation.append(
            {
                "outer": outer,
                "initial_anchor": anchor,
                "param_numel": strategy.averager.param_numel,
                "sends": sends,
            }
        )
        strategy.close()
    out["rotation"] = rotation

    steps = {}
    for placement in ("every_sync", "window_end"):
        torch.manual_seed(0)
        model = tiny_model()
        strategy = daso_on(
            groups, model, downcast="float32", outer_optimizer="nesterov", outer_step_at=placement
        )
        outer = strategy.averager.outer
        calls = []
        real_step = outer.step
        outer.step = lambda start, mean, real_step=real_step, calls=calls: (
            calls.append(1) or real_step(start, mean)
        )
        strategy.begin_window(0, 4)
        # sends on steps 0 and 2, each merged 2 steps later: the second on the last step (3)
        strategy.schedule.params = SyncParams(2, 1, 2, "cycling")
        for batch in range(4):
            state.unpack(seeded(state.numel, 31, batch, topo.rank))
            strategy.after_step(batch)
        steps[placement] = {"outer_steps": len(calls), "merges": strategy.syncs["merges"]}
        strategy.close()
    out["outer_steps"] = steps

    # sync_momentum: the momentum buffers travel with the send and merge like the state
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = DASOStrategy(
        groups, epochs=1, warmup_windows=0, cooldown_windows=0, sync_momentum=True
    )
    strategy.wrap(model, optimizer)
    for p in model.parameters():  # one step creates the momentum buffers
        p.grad = torch.ones_like(p)
    optimizer.step()
    strategy.averager.anchor.copy_(FlatBuffer(strategy.averager.state.tensors).pack())
    momentum = FlatBuffer(optimizer_state_tensors(optimizer))
    state = strategy.averager.state
    strategy.begin_window(0, 100)
    strategy.schedule.params = SyncParams(4, 1, 1, "cycling")
    anchor = strategy.averager.anchor.clone()
    sent = seeded(state.numel, 41, topo.rank)
    sent_momentum = seeded(momentum.numel, 42, topo.rank)
    state.unpack(sent)
    momentum.unpack(sent_momentum)
    strategy.after_step(0)
    local = seeded(state.numel, 43, topo.rank)
    local_momentum = seeded(momentum.numel, 44, topo.rank)
    state.unpack(local)
    momentum.unpack(local_momentum)
    strategy.after_step(1)
    out["sync_momentum"] = {
        "anchor": anchor,
        "sent": sent,
        "sent_momentum": sent_momentum,
        "local": local,
        "local_momentum": local_momentum,
        "final": state.pack().clone(),
        "final_momentum": momentum.pack().clone(),
        "bytes": strategy.window_metrics()["cross_node_bytes"],
        "numel": (state.numel, momentum.numel),
    }
    strategy.close()
    return out


def scenario_finetune(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning from a trained linear model at a learning rate whose updates are far below
    half a bfloat16 ulp of the weights: DASO, blocking every step, bfloat16 and float32 wires,
    driven step by step (forward, backward, optimizer step, ``after_step``)."""
    topo = groups.topology
    gen = torch.Generator().manual_seed(5)
    trained = torch.randn(1, 16, generator=gen).add_(2.0)  # |w| ~ 2: half an ulp is 2^-8
    target = trained + 0.01  # the new task's optimum, a small move away
    inputs = torch.randn(64, 16, generator=torch.Generator().manual_seed(100 + topo.rank))
    labels = inputs @ target.T
    runs = {}
    for downcast in ("bfloat16", "float32"):
        model = torch.nn.Linear(16, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(trained)
        optimizer = torch.optim.SGD(model.parameters(), lr=float(params.get("lr", 2e-3)))
        strategy = DASOStrategy(
            groups, epochs=1, warmup_windows=1, cooldown_windows=0, downcast=downcast
        )
        wrapped = strategy.wrap(model, optimizer)
        steps = int(params.get("steps", 60))
        strategy.begin_window(0, steps + 1)
        losses, updates = [], []
        for batch in range(steps):
            optimizer.zero_grad()
            with strategy.sync_context(batch):
                loss = torch.nn.functional.mse_loss(wrapped(inputs), labels)
                loss.backward()
            losses.append(loss.item())
            before = model.weight.detach().clone()
            optimizer.step()
            updates.append((model.weight.detach() - before).abs().max().item())
            strategy.after_step(batch)
        with torch.no_grad():
            final_loss = torch.nn.functional.mse_loss(model(inputs), labels).item()
        runs[downcast] = {
            "losses": losses,
            "final_loss": final_loss,
            "max_update": max(updates),
            "weight": model.weight.detach().clone(),
        }
        strategy.close()
    return {"topology": topology_info(groups), "trained": trained, "runs": runs}


def scenario_eamsgd(groups: ProcessGroups, params: dict[str, Any]) -> dict[str, Any]:
    """EAMSGD (period 2, alpha 0.3, delta 0.9, lr 0.05) on a least-squares model with this
    rank's own data, driven through the strategy's hooks for 6 steps."""
    from daso.strategies import EAMSGDStrategy

    rank = groups.topology.rank
    gen = torch.Generator().manual_seed(30 + rank)
    inputs = torch.randn(8, 4, generator=gen)
    labels = torch.randn(8, 1, generator=gen)
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.2, 0.1, 0.3]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    strategy = EAMSGDStrategy(groups, epochs=1, period=2, moving_rate=0.3, momentum=0.9)
    wrapped = strategy.wrap(model, optimizer)
    initial = model.weight.detach().clone()
    params_after, centers = [], []
    strategy.begin_window(0, 6)
    for batch in range(6):
        optimizer.zero_grad()
        with strategy.sync_context(batch):
            torch.nn.functional.mse_loss(wrapped(inputs), labels).backward()
        strategy.after_backward(batch)
        optimizer.step()
        strategy.after_step(batch)
        params_after.append(model.weight.detach().clone().reshape(-1))
        centers.append(strategy.center.clone())
    strategy.close()
    return {
        "inputs": inputs,
        "labels": labels,
        "initial": initial.reshape(-1),
        "params": params_after,
        "centers": centers,
    }


def scenario_train_config(groups: ProcessGroups, params: dict[str, Any]) -> list[dict[str, Any]]:
    """``daso train`` in this process, on the job's process groups: the config
    ``configs/<params['config']>`` with ``params['overrides']``, built as the CLI builds it;
    the run's metrics rows as ``metrics.jsonl`` holds them."""
    import json

    from daso.cli import build_data_and_model, build_trainer

    out = Path(params["out"]) / "run"
    config = load_config(
        ROOT / "configs" / params["config"],
        ["trainer.progress=false", f"trainer.output_dir={out}", *params.get("overrides", [])],
    )
    model, train_set, val_set = build_data_and_model(config)
    trainer = build_trainer(config, model, groups=groups)
    trainer.fit(train_set, val_set)
    trainer.close()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SCENARIOS = {
    "train_config": scenario_train_config,
    "eamsgd": scenario_eamsgd,
    "anchor": scenario_anchor,
    "finetune": scenario_finetune,
    "resume_disagreement": scenario_resume_disagreement,
    "merge": scenario_merge,
    "consistency": scenario_consistency,
    "progress": scenario_progress,
    "trainer_features": scenario_trainer_features,
    "equivalence": scenario_equivalence,
    "center_round_robin": scenario_center_round_robin,
    "center_slow_node": scenario_center_slow_node,
}


if __name__ == "__main__":
    worker_main(SCENARIOS)
