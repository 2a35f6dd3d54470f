"""The ``daso`` command: ``train``, ``info``, ``emulate``, ``plot`` and ``config-reference``.

``daso train`` runs the same way under ``mpiexec``/``mpirun``, ``srun``, ``torchrun`` or as a
single process; the launcher is detected from its environment (:mod:`daso.topology`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Exit codes (see daso.script): 0 success; 1 a failure during the run (a dead or stuck rank,
# NaN with nan_policy: stop; the other ranks are aborted); 2 bad input (config, data,
# checkpoint); 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint (requeue it).
from daso.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED  # noqa: F401

log = logging.getLogger("daso.cli")


def build_datasets(config: Any) -> tuple[Any, Any]:
    """Training and validation datasets named by the ``data`` section of ``config``.

    Raises:
        DataError: a missing or malformed data path.
    """
    from torch.utils.data import Subset

    data = config.data
    if data.name == "text":
        from daso.data.text import char_datasets

        train, val, _ = char_datasets(data.root or None, context=data.context)
        if data.train_subset is not None:
            train = Subset(train, range(min(data.train_subset, len(train))))
        if data.val_subset is not None:
            val = Subset(val, range(min(data.val_subset, len(val))))
        return train, val
    if data.name == "mnist":
        from daso.data import mnist_datasets

        train, val = mnist_datasets(
            data.root or None, val_size=data.val_size, seed=config.trainer.seed
        )
        if data.train_subset is not None:
            train = Subset(train, range(min(data.train_subset, len(train))))
        if data.val_subset is not None:
            val = Subset(val, range(min(data.val_subset, len(val))))
        return train, val
    from daso.data import cifar10_datasets

    return cifar10_datasets(
        data.root,
        data.cache_dir,
        augment=data.augment,
        train_subset=data.train_subset,
        val_subset=data.val_subset,
        seed=config.trainer.seed,
    )


def build_optimizer(config: Any, params: Any) -> Any:
    """The optimizer named by the ``optim`` section of ``config``, over ``params``."""
    import torch

    optim = config.optim
    if optim.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            weight_decay=optim.weight_decay,
        )
    cls = torch.optim.Adam if optim.name == "adam" else torch.optim.AdamW
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _data_classes(config: Any, train_set: Any) -> int | None:
    """Classes in the training data: 10 for MNIST, the class folders of an image folder."""
    if config.data.name == "mnist":
        return 10
    if config.data.name == "text":
        from daso.data.text import CharVocab, read_text

        return len(CharVocab(read_text(config.data.root or None)))
    classes = getattr(train_set, "classes", None)
    return len(classes) if classes is not None else None


def _checkpoint_to_resume(source: str, config: Any) -> tuple[Any, Any, bool] | None:
    """The checkpoint ``--resume`` names, read, verified and checked against this run before
    any process group exists: ``(payload, path, exact)``, or ``None`` (``auto``, none yet).

    Raises:
        CheckpointError: missing or corrupt file, other model or strategy, or a world layout
            the strategy cannot be re-sharded to.
    """
    from mpi4py import MPI

    from daso.checkpoint import check_compatible, resolve_resume
    from daso.topology import detect_topology

    found = resolve_resume(source, config.checkpoint_folder())
    if found is None:
        return None
    path, checkpoint = found
    layout = detect_topology(MPI.COMM_WORLD).ranks_per_node
    exact = check_compatible(checkpoint, path, config.model.name, config.strategy.name, layout)
    return checkpoint, path, exact


def build_data_and_model(config: Any) -> tuple[Any, Any, Any]:
    """What ``daso train`` trains for a loaded ``config``: ``(model, train_set, val_set)``,
    the model seeded by ``trainer.seed``; every rank runs this.

    Raises:
        ConfigError, DataError: bad input (config, data path, a batch size the world size
            cannot feed, an unwritable output folder), before any process group exists.
    """
    import torch

    from daso.config import check_launch, check_writable
    from daso.loggers import check_loggers
    from daso.models import build_model
    from daso.topology import read_launcher_env

    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    train_set, val_set = build_datasets(config)
    check_launch(
        config,
        read_launcher_env().world_size,
        len(train_set),
        _data_classes(config, train_set),
    )
    check_writable(config)
    check_loggers(config.trainer.loggers)
    torch.manual_seed(config.trainer.seed)
    name = config.model.name
    if name == "char_transformer":
        kwargs: dict[str, Any] = {"context": config.data.context}
    else:
        kwargs = {"width": config.model.width} if name != "mnist_cnn" else {}
    model = build_model(name, num_classes=config.model.num_classes, **kwargs)
    return model, train_set, val_set


def build_trainer(config: Any, model: Any, groups: Any = None) -> Any:
    """The :class:`~daso.trainer.Trainer` ``daso train`` runs for ``config`` and ``model``:
    the config's optimizer, and the task its model implies (cross-entropy on ``(x, y)``
    batches; the language model's step on dict batches, loss in nats per character).
    ``groups``: existing process groups (default: the trainer initialises them)."""
    import torch

    from daso.trainer import Trainer

    if config.model.name == "char_transformer":
        from daso.models.charlm import lm_step

        task: dict[str, Any] = {"loss_fn": None, "step_fn": lm_step, "perplexity": True}
    else:
        task = {"loss_fn": torch.nn.functional.cross_entropy}
    loss_fn = task.pop("loss_fn")
    return Trainer(
        model,
        lambda params: build_optimizer(config, params),
        loss_fn,
        config,
        groups=groups,
        **task,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Load and validate the config and data, then train; every rank runs this.

    Bad input (config, data path, a batch size the world size cannot feed, a checkpoint)
    raises ConfigError/DataError/CheckpointError on every rank before any process group or
    output folder is created, also where only some ranks see it (see
    :func:`daso.script.agree_on_input`).
    """
    from daso.config import default_output_dir, load_config
    from daso.script import agree_on_input

    def load() -> tuple[Any, Any, Any, Any, Any]:
        config = load_config(args.config, args.set or [])
        default_output_dir(config, args.config)
        model, train_set, val_set = build_data_and_model(config)
        resume = _checkpoint_to_resume(args.resume, config) if args.resume else None
        return config, model, train_set, val_set, resume

    config, model, train_set, val_set, resume = agree_on_input(load)
    trainer = build_trainer(config, model)
    if trainer.rank == 0:
        topo = trainer.topology
        log.info(
            "topology: %d node(s), ranks per node %s, world size %d (layout from %s)",
            topo.num_nodes,
            topo.ranks_per_node,
            topo.world_size,
            topo.source,
        )
    trainer.stop_at_epoch = args.stop_at_epoch
    try:
        if resume is not None:
            trainer.load_checkpoint(*resume)
        history = trainer.fit(train_set, val_set)
    except BaseException:
        trainer.close(clean=False)  # peers may be gone: nothing that waits for them
        raise
    trainer.close()
    if trainer.stopped:
        if trainer.rank == 0:
            log.warning(
                "stopped by %s at epoch %d batch %d; checkpoint in %s; exit code %d "
                "(resume with --resume auto)",
                trainer.stopped,
                trainer.epoch,
                trainer.batch,
                trainer.checkpoint_dir,
                EXIT_PREEMPTED,
            )
        return EXIT_PREEMPTED
    if trainer.rank == 0 and history:
        last = history[-1]
        score = (
            f"final val accuracy {last['val_accuracy']:.4f}"
            if last.get("val_accuracy") is not None
            else f"final val loss {last['val_loss']:.4f}"
        )
        log.info("done: %d epochs, %s, results in %s", len(history), score, trainer.output_dir)
    return EXIT_OK


def _epoch_count(text: str) -> int:
    """``--stop-at-epoch``'s value: an integer >= 1 (argparse reports the error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of epochs >= 1")
    return value


def cmd_info(args: argparse.Namespace) -> int:
    """Print the detected topology of every rank (rank 0 prints all), with the path each rank's
    cross-node buffers take to MPI (host, CUDA-aware MPI, or staged through pinned memory)."""
    import torch.distributed as dist

    from daso.comm.cuda_aware import cross_node_path
    from daso.topology import init_distributed, shutdown_distributed

    groups = init_distributed(args.device, cuda_aware_mpi=args.cuda_aware_mpi)
    topo = groups.topology
    path = cross_node_path(groups.cuda_aware_mpi, groups.device)
    line = (
        f"{topo.describe()} backend={groups.backend} device={groups.device} "
        f"cross-node buffers: {path.description}"
    )
    if groups.mpi_world is not None:
        lines = groups.mpi_world.gather(line, root=0)
    else:  # torchrun on one node: every process is its own MPI world
        lines = [None] * topo.world_size if topo.rank == 0 else None
        dist.gather_object(line, lines, dst=0)
    if topo.rank == 0:
        print(
            f"daso topology: {topo.num_nodes} node(s), ranks per node {topo.ranks_per_node}, "
            f"world size {topo.world_size}, {topo.num_cross_groups} cross-node group(s)"
        )
        for n in range(topo.num_nodes):
            print(f"  node {n}: ranks {topo.ranks_on_node(n)}")
        for i in range(topo.num_cross_groups if topo.num_nodes > 1 else 0):
            print(f"  cross-node group C_{i}: ranks {topo.cross_group_ranks(i)}")
        for entry in lines:
            print(f"  {entry}")
    shutdown_distributed()
    return EXIT_OK


def cmd_emulate(args: argparse.Namespace) -> int:
    """Run a command on an emulated cluster of network namespaces; report the link's bytes."""
    import json

    from daso.emulate import EmulatedCluster

    layout = (
        [int(n) for n in args.layout.split(",")]
        if args.layout
        else ([args.ranks_per_node] * args.nodes)
    )
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("daso emulate: give the command to run after --, e.g. -- info")
    if command[0] in ("train", "info"):
        command = [sys.executable, "-m", "daso.cli", *command]
    with EmulatedCluster(layout, args.rate, prefix=args.prefix) as cluster:
        before = cluster.link_bytes()
        result = cluster.run(command, timeout=args.timeout, capture=False)
        after = cluster.link_bytes()
    report = {
        "nodes": len(layout),
        "ranks_per_node": layout,
        "rate": args.rate,
        "hostnames": [cluster.hostname(n) for n in range(len(layout))],
        "tx_bytes": [a - b for a, b in zip(after["tx"], before["tx"])],
        "rx_bytes": [a - b for a, b in zip(after["rx"], before["rx"])],
        "returncode": result.returncode,
    }
    log.info("cross-node link: %s", json.dumps(report))
    if args.counters:
        Path(args.counters).write_text(json.dumps(report) + "\n")
    return result.returncode


def cmd_plot(args: argparse.Namespace) -> int:
    """Render one PNG comparing the runs in the given output folders."""
    from daso.plot import plot_runs

    out = plot_runs(args.runs, args.out, title=args.title)
    log.info("plot of %d run(s) written to %s", len(args.runs), out)
    return EXIT_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    """Print every config key as a Markdown table."""
    from daso.config import reference_table

    print(reference_table())
    return EXIT_OK


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daso", description="Hierarchical data-parallel training with DASO and baselines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set strategy.max_global_skips=4 (repeatable)",
    )
    train.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint file, or 'auto': the newest valid one in the run's "
        "checkpoint folder (damaged ones are skipped; none yet = start from scratch)",
    )
    train.add_argument(
        "--stop-at-epoch",
        type=_epoch_count,
        metavar="N",
        help="stop after N epochs in all (checkpoint, exit code 75), e.g. to fit a job's time "
        "limit; --resume auto continues",
    )
    train.set_defaults(func=cmd_train)
    info = sub.add_parser("info", help="print the detected topology of every rank")
    info.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    info.add_argument(
        "--cuda-aware-mpi",
        default="auto",
        choices=["auto", "on", "off"],
        help="as trainer.cuda_aware_mpi: which path cross-node buffers take on CUDA",
    )
    info.set_defaults(func=cmd_info)
    emulate = sub.add_parser(
        "emulate", help="run a command on N emulated nodes (network namespaces, rate-limited)"
    )
    emulate.add_argument("--nodes", type=int, default=2, help="number of nodes")
    emulate.add_argument("--ranks-per-node", type=int, default=2, help="ranks on every node")
    emulate.add_argument("--layout", help="ranks per node as a list, e.g. 2,1 (overrides both)")
    emulate.add_argument(
        "--rate",
        default="unlimited",
        help="each node's egress rate: unlimited, or e.g. 1gbit, 200mbit",
    )
    emulate.add_argument("--timeout", type=float, default=None, help="seconds before killing")
    emulate.add_argument("--counters", help="write the link's byte counters (JSON) here")
    emulate.add_argument("--prefix", help="name prefix of namespaces and links (default unique)")
    emulate.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="after --: the command for every rank ('train ...'/'info ...' run daso's own)",
    )
    emulate.set_defaults(func=cmd_emulate)
    plot = sub.add_parser(
        "plot",
        help="PNG of runs side by side: validation score against time and epoch, cross-node "
        "bytes, schedule knobs",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="a run's output folder")
    plot.add_argument("--out", default="runs.png", help="the PNG to write (default runs.png)")
    plot.add_argument("--title", help="the figure's title (default: the run folders' names)")
    plot.set_defaults(func=cmd_plot)
    ref = sub.add_parser("config-reference", help="print all config keys as Markdown")
    ref.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``daso`` console script; returns the exit code."""
    args = make_parser().parse_args(argv)
    from daso.script import exit_code

    return exit_code(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
