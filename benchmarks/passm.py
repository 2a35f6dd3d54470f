"""PASSM inside one node: ``ddp``, ``passm`` (block-only after a tenth of the run) and lock-free
full-model Hogwild on the same shared memory, on 1 node x 2 ranks, ResNet-20 on real CIFAR-10.

Every variant trains ``configs/cifar10_bench.yaml`` (4,000 training images, 1,000 validation
images, batch 32 per rank, SGD with momentum 0.9 and weight decay 5e-4, cosine LR) for
``--epochs`` with each seed, one run after the other in one invocation, with ``mpiexec`` on this
machine (``DASO_RANKS_PER_NODE`` makes the ranks one node; no link emulation, no root):

- ``ddp``: gradient allreduce over the two ranks every step;
- ``passm``: the shared model, block-only updates after ``full_model_windows`` (default a
  tenth of the run);
- ``hogwild``: ``passm`` with ``full_model_windows`` = all epochs: every rank updates the
  whole shared model, lock-free, every step.

A second measurement, in this process on one core, explains the speed: the seconds of one
forward + backward of ResNet-20 on a batch of 32 with every gradient, and with each block's
gradients only (what a block-only step costs each rank).

Writes, to ``--out-dir``:

- ``passm.csv``: one row per variant, seed and epoch (wall time, train seconds, samples per
  second, train loss, validation accuracy);
- ``passm.png``: validation accuracy against wall time, and samples per second per variant;
- ``passm_backward.csv``: the forward + backward seconds per gradient set;
- ``passm.md``: per variant the mean (and range over seeds) of the final accuracy, samples
  per second, whole-run time, time to ``--target`` (default: ddp's mean final accuracy minus
  1 point) and the ratios to ddp.

Usage (about 15 minutes on 2 cores with the defaults)::

    .venv/bin/python benchmarks/passm.py --epochs 12 --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, time_to_target  # noqa: E402

from daso.config import load_config  # noqa: E402
from daso.models import build_model  # noqa: E402
from daso.strategies.passm import partition_blocks  # noqa: E402

COLUMNS = [
    "variant",
    "seed",
    "epoch",
    "wall_seconds",
    "train_seconds",
    "samples_per_second",
    "train_loss",
    "val_accuracy",
    "phase",
]


def variant_sets(variant: str, epochs: int) -> list[str]:
    """The ``--set`` values of a variant."""
    if variant == "ddp":
        return ["strategy.name=ddp"]
    sets = ["strategy.name=passm"]
    if variant == "hogwild":
        sets.append(f"strategy.full_model_windows={epochs}")
    return sets


def train(args: argparse.Namespace, variant: str, seed: int) -> list[dict]:
    """One run of ``variant`` on 1 node x ``args.ranks`` ranks; its per-epoch rows."""
    out = args.out_dir / "runs" / f"{variant}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    sets = [
        f"trainer.output_dir={out}",
        f"trainer.epochs={args.epochs}",
        f"trainer.seed={seed}",
        f"data.train_subset={args.train_images}",
        "checkpoint.every_epochs=0",
        *variant_sets(variant, args.epochs),
        *args.set,
    ]
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "mpiexec"), "-n", str(args.ranks)]
    command += [sys.executable, "-m", "daso.cli", "train", "--config", str(args.config)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "DASO_RANKS_PER_NODE": str(args.ranks), "OMP_NUM_THREADS": "1"}
    print(f"== {variant}, seed {seed}", flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batch = load_config(args.config, args.set).data.batch_size
    samples = args.train_images // args.ranks // batch * batch * args.ranks  # an epoch's
    rows = []
    for row in history:
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                **{k: row.get(k) for k in COLUMNS[2:] if k in row},
                "samples_per_second": samples / row["train_seconds"],
                "phase": row.get("phase", "-"),
            }
        )
    last = rows[-1]
    print(f"   {last['wall_seconds']:.0f} s, final val accuracy {last['val_accuracy']:.3f}")
    return rows


def backward_costs(config_model: str, ranks: int, repeats: int) -> list[dict]:
    """Seconds of one forward + backward (batch 32, one thread) with every gradient and with
    each of ``ranks`` blocks' gradients only; the median of ``repeats``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(config_model)
    params = list(model.parameters())
    blocks = partition_blocks([p.numel() for p in params], ranks)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    sets = [("all", 0, len(params))] + [(f"block {b}", *blk) for b, blk in enumerate(blocks)]
    rows = []
    for label, start, stop in sets:
        for index, param in enumerate(params):
            param.requires_grad_(start <= index < stop)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            model.zero_grad(set_to_none=True)
            begin = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - begin)
        rows.append(
            {
                "gradients": label,
                "tensors": f"{start}-{stop - 1}",
                "elements": sum(p.numel() for p in params[start:stop]),
                "seconds": statistics.median(times[1:]),
            }
        )
    for row in rows:
        row["vs_all"] = row["seconds"] / rows[0]["seconds"]
    return rows


def summarise(rows: list[dict], costs: list[dict], args: argparse.Namespace) -> str:
    runs: dict[str, list[list[dict]]] = {}
    for (variant, _seed), group in _group(rows).items():
        runs.setdefault(variant, []).append(group)
    finals = {v: [g[-1]["val_accuracy"] for g in groups] for v, groups in runs.items()}
    target = args.target
    if target is None:
        target = statistics.mean(finals["ddp"]) - 0.01
    lines = [
        "# PASSM inside one node: ResNet-20 on CIFAR-10",
        "",
        f"1 node x {args.ranks} ranks (this machine's 2 cores), {args.train_images} training "
        f"images, {args.epochs} epochs, seeds {args.seeds}; configs/cifar10_bench.yaml. "
        f"Target accuracy {target:.3f} (ddp's mean final minus 1 point unless --target).",
        "",
        "| variant | final val acc, mean (range) | samples/s | vs ddp | run time (s) | vs ddp "
        "| time to target (s) | vs ddp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for variant, groups in runs.items():
        speed = statistics.mean(statistics.mean(r["samples_per_second"] for r in g) for g in groups)
        total = statistics.mean(g[-1]["wall_seconds"] for g in groups)
        reached = [time_to_target(g, target) for g in groups]
        hit = [t for t in reached if t is not None]
        to_target = statistics.mean(hit) if hit else None
        if variant == "ddp":
            base = {"speed": speed, "total": total, "target": to_target}

        def ratio(value: float | None, ref: float | None) -> str:
            return f"{value / ref:.2f}x" if value and ref else "-"

        acc = finals[variant]
        reach = f"{to_target:.0f} ({len(hit)}/{len(groups)} seeds)" if hit else "not reached"
        lines.append(
            f"| {variant} | {statistics.mean(acc):.4f} ({min(acc):.4f}-{max(acc):.4f}) "
            f"| {speed:.0f} | {ratio(speed, base.get('speed'))} | {total:.0f} "
            f"| {ratio(total, base.get('total'))} | {reach} "
            f"| {ratio(to_target, base.get('target'))} |"
        )
    lines += [
        "",
        f"One forward + backward of ResNet-20, batch 32, one thread (median of {args.repeats}):",
        "",
        "| gradients | tensors | elements | seconds | vs all |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['gradients']} | {c['tensors']} | {c['elements']} | {c['seconds']:.4f} "
        f"| {c['vs_all']:.2f} |"
        for c in costs
    ]
    return "\n".join(lines) + "\n"


def _group(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["seed"]), []).append(row)
    return groups


def plot(rows: list[dict], path: Path) -> None:
    fig, (acc_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"ddp": "tab:blue", "passm": "tab:orange", "hogwild": "tab:green"}
    for (variant, seed), group in _group(rows).items():
        style = {"color": colours.get(variant), "label": f"{variant} seed {seed}", "alpha": 0.8}
        wall = [r["wall_seconds"] for r in group]
        acc_ax.plot(wall, [r["val_accuracy"] for r in group], "o-", **style)
        epochs = [r["epoch"] for r in group]
        speed_ax.plot(epochs, [r["samples_per_second"] for r in group], "o-", **style)
    acc_ax.set_xlabel("wall time (s)")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.set_title("ResNet-20, CIFAR-10, 1 node x 2 ranks")
    speed_ax.set_xlabel("epoch")
    speed_ax.set_ylabel("training samples per second")
    speed_ax.set_title("Throughput (block-only after the full-model epochs)")
    for ax in (acc_ax, speed_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["ddp", "passm", "hogwild"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the one node")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--target", type=float, default=None, help="accuracy (fraction)")
    parser.add_argument("--repeats", type=int, default=20, help="backward-cost repeats")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar10_bench.yaml")
    parser.add_argument("--set", action="append", default=[], help="extra --set for every run")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "passm")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for seed in args.seeds for v in args.variants for r in train(args, v, seed)]
    with (args.out_dir / "passm.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    costs = backward_costs("resnet20", args.ranks, args.repeats)
    with (args.out_dir / "passm_backward.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(costs[0]))
        writer.writeheader()
        writer.writerows(costs)
    plot(rows, args.out_dir / "passm.png")
    text = summarise(rows, costs, args)
    (args.out_dir / "passm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
