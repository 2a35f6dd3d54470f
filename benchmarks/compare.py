"""Compare training strategies on identical work over an emulated, rate-limited cluster.

Every strategy trains the same model on the same data with the same seeds, epochs, batch size
and LR schedule (``configs/cifar10_bench.yaml``: ResNet-20 on 4,000 real CIFAR-10 images, 5
epochs, 2 emulated nodes x 2 ranks), once per link rate. Each run is ``daso emulate`` (one
network namespace per node, ``tc tbf`` on each node's egress; see ``daso/emulate.py``). The
``no_comm`` bound (every rank trains alone on its shard) runs once, with no link traffic, and
its rows are repeated under every link rate. Per-strategy keys (``strategy_overrides``): DASO
and ``local_sgd`` get a one-epoch synchronous warm-up; ``local_sgd``, ``easgd``, ``eamsgd`` and
``async_easgd`` exchange every 4 steps; ``eamsgd`` uses the others' momentum 0.9 (as Nesterov);
``downpour`` (period 1: asynchronous SGD) runs at LR / nodes, since every node's update lands on
the center.

Output, under ``--out-dir`` (default ``benchmarks/results``):

* ``compare.csv``: one row per strategy, link rate and epoch: ``strategy``, ``link_rate``,
  ``epoch``, ``wall_seconds`` (cumulative since training started), ``epoch_seconds``,
  ``train_loss``, ``val_accuracy`` (fraction), ``cross_node_bytes`` (this epoch, as the strategy
  reports it: bytes handed to cross-node collectives, all ranks), ``comm_wait_seconds`` (this
  epoch, mean over ranks, blocked in MPI waits; 0 for ddp and horovod, whose waits happen inside
  ``backward()``/``step()``), ``epoch_time_vs_no_comm`` (epoch seconds / the bound's), and the
  run's ``link_tx_bytes`` (kernel counters of the nodes' links, whole run);
* ``compare_accuracy.png`` (validation accuracy against wall time, one panel per link rate),
  ``compare_time_to_target.png``, ``compare_bytes.png``;
* ``summary.md``: time to ``--target`` accuracy and final accuracy per strategy and rate, with
  ratios to ``hierarchical`` and ``ddp`` measured in the same run.

Run as root (network namespaces), from the repository root::

    .venv/bin/python benchmarks/compare.py --rates unlimited 50mbit

``--full`` trains ResNet-20 on all of CIFAR-10 (50,000 images) for ``--epochs`` (default 40).
No timing is asserted anywhere; read the ratios.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STRATEGIES = [
    "ddp",
    "hierarchical",
    "local_sgd",
    "daso",
    "horovod",
    "easgd",
    "eamsgd",
    "async_easgd",
    "downpour",
]
DEFAULT_RATES = ["unlimited", "1gbit", "200mbit", "50mbit"]
COLUMNS = [
    "strategy",
    "link_rate",
    "epoch",
    "wall_seconds",
    "epoch_seconds",
    "train_loss",
    "val_accuracy",
    "cross_node_bytes",
    "comm_wait_seconds",
    "epoch_time_vs_no_comm",
    "link_tx_bytes",
]


def strategy_overrides(
    name: str, epochs: int, batches_per_epoch: int, lr: float, nodes: int
) -> list[str]:
    """``--set`` values of one strategy: its name and the keys that make the runs comparable
    (``lr``: the config's learning rate, ``nodes``: the number of emulated nodes)."""
    sets = [f"strategy.name={name}"]
    warmup = 1 if epochs < 20 else 4
    if name == "daso":  # blocking warm-up and cool-down, as in the paper, scaled to the run
        sets += [f"strategy.warmup_windows={warmup}", f"strategy.cooldown_windows={warmup}"]
    if name == "local_sgd":  # the same synchronous warm-up as DASO, then average every 4 steps
        sets += ["strategy.period=4", f"strategy.warmup_steps={warmup * batches_per_epoch}"]
    if name in ("easgd", "eamsgd", "async_easgd"):  # the elastic exchange every 4 steps too
        sets += ["strategy.period=4"]
    if name == "eamsgd":  # the others' momentum (0.9), as Nesterov: delta 0.99 diverges at LR 0.1
        sets += ["strategy.momentum=0.9"]
    if name == "downpour":  # p nodes push: the center moves p times per round; lr / p keeps
        sets += [f"optim.lr={lr / nodes}"]  # synchronous SGD's step per sample
    return sets


def train_emulated(
    nodes: int, ranks_per_node: int, rate: str, config: Path, out: Path, sets: list[str]
) -> tuple[list[dict], dict]:
    """``daso train`` on an emulated cluster; returns (metrics rows, link counters).

    Writes to ``out``; every ``sets`` item is a ``--set`` override. Exits on failure.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    counters = out / "link.json"
    command = [
        sys.executable,
        "-m",
        "daso.cli",
        "emulate",
        "--nodes",
        str(nodes),
        "--ranks-per-node",
        str(ranks_per_node),
        "--rate",
        rate,
        "--counters",
        str(counters),
        "--",
        "train",
        "--config",
        str(config),
    ]
    # one checkpoint at the end: per-epoch ones would add their writes to the timed epochs
    for item in [f"trainer.output_dir={out}", "checkpoint.every_epochs=0", *sets]:
        command += ["--set", item]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads(counters.read_text())


def run_one(args: argparse.Namespace, strategy: str, rate: str, work: Path) -> list[dict]:
    """Train ``strategy`` over a link of ``rate``; return its per-epoch rows."""
    sets = [
        f"trainer.epochs={args.epochs}",
        *strategy_overrides(strategy, args.epochs, args.steps, args.lr, args.nodes),
        *args.set,
    ]
    print(f"== {strategy} at {rate}", flush=True)
    begin = time.perf_counter()
    rows, link = train_emulated(
        args.nodes, args.ranks_per_node, rate, args.config, work / f"{strategy}_{rate}", sets
    )
    print(
        f"   {time.perf_counter() - begin:.0f} s, final val accuracy "
        f"{rows[-1]['val_accuracy']:.3f}, link {sum(link['tx_bytes']) / 1e6:.1f} MB",
        flush=True,
    )
    return [
        {
            **{k: row.get(k) for k in COLUMNS},
            "strategy": strategy,
            "link_rate": rate,
            "link_tx_bytes": sum(link["tx_bytes"]),
        }
        for row in rows
    ]


def steps_per_epoch(config: Any, world_size: int) -> int:
    """Optimizer steps of an epoch per rank for ``config`` on ``world_size`` ranks, from the
    training loader itself (``DistributedSampler`` drops the remainder over ranks; the last
    batch of a rank may be short, e.g. 8,000 images on 4 ranks of 32 give 63 steps, not 62)."""
    import torch

    from daso.data.loaders import train_loader

    images = config.data.train_subset or 50_000
    _, steps = train_loader(
        list(range(images)), 0, world_size, config.data, config.trainer, torch.device("cpu")
    )
    return steps


def time_to_target(rows: list[dict], target: float) -> float | None:
    """Wall seconds at the end of the first epoch reaching ``target`` accuracy (or None)."""
    for row in rows:
        if row["val_accuracy"] >= target:
            return row["wall_seconds"]
    return None


def by_run(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        runs.setdefault((row["strategy"], row["link_rate"]), []).append(row)
    return runs


def write_summary(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    runs = by_run(rows)
    lines = [
        "# Strategy comparison",
        "",
        f"Command: `{' '.join(args.argv)}`",
        "",
        f"Machine: {platform.machine()}, {args.cores} cores, no GPU, Linux "
        f"{platform.release()}; {args.nodes} emulated nodes x {args.ranks_per_node} ranks "
        "(network namespaces, `tc tbf` per node egress). "
        f"Workload: `{args.config.relative_to(ROOT)}` for {args.epochs} epochs"
        f"{' (full CIFAR-10)' if args.full else ''}.",
        "",
        f"Target validation accuracy: {args.target:.2f}. Ratios are time-to-target divided by "
        "the reference's in the same link rate (below 1: faster). `vs no_comm`: mean epoch "
        "time over the no-communication bound's.",
        "",
        "| link rate | strategy | time to target (s) | final val acc | total (s) | vs no_comm "
        "| vs hierarchical | vs ddp | cross-node MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in args.rates:
        refs = {
            ref: time_to_target(runs.get((ref, rate), []), args.target)
            for ref in ("hierarchical", "ddp")
        }
        for strategy in [*args.strategies, "no_comm"]:
            run = runs.get((strategy, rate))
            if not run:
                continue
            ttt = time_to_target(run, args.target)
            ratios = [
                f"{ttt / refs[ref]:.2f}" if ttt and refs[ref] else "-"
                for ref in ("hierarchical", "ddp")
            ]
            vs_bound = sum(r["epoch_time_vs_no_comm"] for r in run) / len(run)
            lines.append(
                f"| {rate} | {strategy} | {f'{ttt:.1f}' if ttt else 'not reached'} | "
                f"{run[-1]['val_accuracy']:.3f} | {run[-1]['wall_seconds']:.1f} | "
                f"{vs_bound:.2f} | {ratios[0]} | {ratios[1]} | "
                f"{sum(r['cross_node_bytes'] for r in run) / 1e6:.1f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = by_run(rows)
    strategies = [*args.strategies, "no_comm"]
    fig, axes = plt.subplots(1, len(args.rates), figsize=(5 * len(args.rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], args.rates):
        for strategy in strategies:
            run = runs.get((strategy, rate))
            if run:
                ax.plot(
                    [r["wall_seconds"] for r in run],
                    [r["val_accuracy"] for r in run],
                    marker="o",
                    label=strategy,
                    linestyle="--" if strategy == "no_comm" else "-",
                )
        ax.axhline(args.target, color="grey", linewidth=0.8)
        ax.set(title=f"link {rate}", xlabel="wall time (s)", ylabel="validation accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "compare_accuracy.png", dpi=110)
    plt.close(fig)

    width = 0.8 / len(strategies)
    for name, value, ylabel in (
        (
            "compare_time_to_target.png",
            lambda run: time_to_target(run, args.target) or 0.0,
            f"seconds to {args.target:.2f} val accuracy (0: not reached)",
        ),
        (
            "compare_bytes.png",
            lambda run: sum(r["cross_node_bytes"] for r in run) / len(run) / 1e6,
            "cross-node MB per epoch (reported)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(2 + 1.6 * len(args.rates), 4))
        for i, strategy in enumerate(strategies):
            values = [
                value(runs[(strategy, rate)]) if (strategy, rate) in runs else 0.0
                for rate in args.rates
            ]
            ax.bar([x + i * width for x in range(len(args.rates))], values, width, label=strategy)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(args.rates))], args.rates)
        ax.set(xlabel="link rate", ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES)
    parser.add_argument("--rates", nargs="+", default=DEFAULT_RATES)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/cifar10_bench.yaml")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.30, help="val accuracy for timing")
    parser.add_argument("--full", action="store_true", help="ResNet-20 on all of CIFAR-10")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args()
    args.out_dir = args.out_dir or ROOT / "benchmarks/results"
    args.argv = ["benchmarks/compare.py", *sys.argv[1:]]
    args.config = args.config.resolve()
    if "horovod" in args.strategies and importlib.util.find_spec("horovod") is None:
        print("horovod is not installed (make horovod): leaving it out", flush=True)
        args.strategies.remove("horovod")
    sys.path.insert(0, str(ROOT))
    from os import cpu_count

    from daso.config import load_config

    args.cores = cpu_count()
    if args.full:
        args.set = ["data.train_subset=null", "data.val_subset=null", *args.set]
        args.epochs = args.epochs or 40
    config = load_config(
        args.config, args.set + ([f"trainer.epochs={args.epochs}"] if args.epochs else [])
    )
    args.epochs = config.trainer.epochs
    args.batch_size = config.data.batch_size
    args.lr = config.optim.lr
    args.train_images = config.data.train_subset or 50_000
    args.val_images = config.data.val_subset or 10_000
    args.steps = steps_per_epoch(config, args.nodes * args.ranks_per_node)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.out_dir / "runs"
    rows = run_one(args, "no_comm", "unlimited", work)
    bound = {row["epoch"]: row["epoch_seconds"] for row in rows}
    rows = [{**row, "link_rate": rate} for rate in args.rates for row in rows]
    for rate in args.rates:
        for strategy in args.strategies:
            rows += run_one(args, strategy, rate, work)
    for row in rows:
        row["epoch_time_vs_no_comm"] = row["epoch_seconds"] / bound[row["epoch"]]
    with (args.out_dir / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_summary(rows, args, args.out_dir / "summary.md")
    plot(rows, args, args.out_dir)
    print((args.out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
