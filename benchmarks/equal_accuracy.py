"""Equal-accuracy suite: is DASO (or PASSM) faster than the strongest synchronous baseline at
the same accuracy?

Every variant trains the same workload (``configs/cifar10_bench.yaml``: ResNet-20 on real
CIFAR-10, batch 32 per rank, SGD momentum 0.9, cosine LR) with the same seeds; a seed fixes
the initial weights, the data order and the augmentation, so the runs of one seed are
**paired**. Accuracy is scored once, after the last epoch, on CIFAR-10's full 10,000-image
test split. Time is training time: the sum of the epochs' ``train_seconds`` (validation and
start-up left out), measured in this invocation for every variant.

``--suite daso`` (default), on ``--nodes`` x ``--ranks-per-node`` emulated nodes (``daso
emulate``: a network namespace per node, ``tc tbf`` on each node's egress; needs root):

1. the main table at ``--rate``: every variant of :data:`DASO_VARIANTS` with every seed for
   ``--epochs`` epochs; the target is the best synchronous variant's mean final accuracy minus
   ``--margin`` (0.5 points); per variant the mean final accuracy, the mean and 95 % confidence
   interval (Student's t over the seeds) of its paired difference to the strongest synchronous
   baseline (the fastest of ``hierarchical``, ``horovod``, ``ddp``), and the time ratios to it
   and to ``no_comm`` (every rank alone: the bound without communication);
2. time to accuracy: ``--budget-variants`` also run for each of ``--budgets`` epochs (each its
   own full LR schedule); a variant's time to the target is, per seed, the training time of its
   shortest budget whose final accuracy reaches it;
3. the link-rate sweep: ``--sweep-variants`` at each of ``--sweep-rates``, ``--epochs``
   epochs, the first seed (the main table's runs at ``--rate`` are reused), with ``no_comm``;
   and ``hierarchical`` without overlap (``overlap: false``, the scheme before the DDP hook)
   at ``--rate`` for the step time against the overlapped one.

``no_comm``'s time for more epochs than the main table's is its per-epoch time there times the
epochs (a rank alone does the same work every epoch).

``--suite passm``: 1 node x 2 ranks under ``mpiexec`` (no link, no root), :data:`PASSM_VARIANTS`
against ``ddp`` in the same terms (main table, budgets), no sweep.

DASO's windows are ``--window-steps`` optimizer steps (4 windows an epoch here), so its plateau
controller sees window losses that fall by less than ``stability_level`` and acts; the CSV's
``phase`` and ``global_skips`` columns show what it did.

Writes under ``--out-dir``: ``equal_accuracy.csv`` (one row per run and epoch),
``summary.md`` (the tables), ``equal_accuracy.png`` (final accuracy against training time, per
run; and the sweep's time ratios). A finished run (its folder under ``runs/`` holds
``done.json``) is read back instead of trained again, unless ``--fresh``.

Usage (as root, from the repository root; about 60 minutes on 2 cores)::

    .venv/bin/python benchmarks/equal_accuracy.py
    .venv/bin/python benchmarks/equal_accuracy.py --suite passm
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, steps_per_epoch, train_emulated  # noqa: E402

#: Synchronous variants: the same SGD (equal to float rounding); the fastest is the baseline.
SYNCHRONOUS = ("hierarchical", "horovod", "ddp")

#: DASO's schedule keys in the suite (warm-up and cool-down in windows of --window-steps).
DASO_PAPER = ["strategy.merge=staleness", "strategy.outer_optimizer=none"]

#: label -> (strategy, extra ``--set`` values); ``{warmup}``/``{cooldown}``/``{window}`` and
#: ``{warmup_steps}`` are filled from the arguments.
DASO_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "hierarchical": ("hierarchical", []),
    "horovod": ("horovod", []),
    "ddp": ("ddp", []),
    "no_comm": ("no_comm", []),
    "local_sgd": ("local_sgd", ["strategy.period=4", "strategy.warmup_steps={warmup_steps}"]),
    # the paper's algorithm: staleness merge, plain mean; the reference's wire (float32 in
    # cycling, bfloat16 in blocking phases)
    "daso_paper": (
        "daso",
        [*DASO_PAPER, "strategy.cycling_downcast=float32", "strategy.downcast=bfloat16"],
    ),
    "daso": ("daso", []),  # the defaults
    "daso_bf16_cycling": ("daso", ["strategy.cycling_downcast=bfloat16"]),  # the old wire
    "daso_nesterov": ("daso", ["strategy.outer_optimizer=nesterov"]),
    # means to close the gap (issue 21): momentum sent with each sync; global_skips from the LR
    "daso_momentum": ("daso", ["strategy.sync_momentum=true"]),
    "daso_lr": ("daso", ["strategy.controller=lr"]),
    "hierarchical_after_backward": ("hierarchical", ["strategy.overlap=false"]),
}
DASO_WINDOWED = ("daso",)

PASSM_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ddp": ("ddp", []),
    "passm": ("passm", []),
    "hogwild": ("passm", ["strategy.full_model_windows={epochs}"]),
}

COLUMNS = [
    "suite",
    "variant",
    "strategy",
    "seed",
    "budget",
    "link_rate",
    "epoch",
    "train_seconds",
    "elapsed_train_seconds",
    "train_loss",
    "val_accuracy",
    "phase",
    "global_skips",
    "local_skips",
    "batches_to_wait",
    "window_phases",
    "window_global_skips",
    "sends",
    "cross_node_bytes",
    "comm_wait_seconds",
    "link_tx_bytes",
]


def variant_sets(label: str, variants: dict, args: argparse.Namespace, epochs: int) -> list[str]:
    """``--set`` values of one variant for a run of ``epochs`` epochs."""
    strategy, extra = variants[label]
    windows_per_epoch = max(1, args.steps // args.window_steps)
    fill = {
        "warmup": args.warmup_epochs * windows_per_epoch,
        "cooldown": args.cooldown_epochs * windows_per_epoch,
        "window": args.window_steps,
        "warmup_steps": args.warmup_epochs * args.steps,
        "epochs": epochs,
    }
    sets = [f"strategy.name={strategy}", *[item.format(**fill) for item in extra]]
    if strategy in DASO_WINDOWED:
        sets += [
            f"strategy.window_steps={fill['window']}",
            f"strategy.warmup_windows={fill['warmup']}",
            f"strategy.cooldown_windows={fill['cooldown']}",
        ]
    return sets


def run_one(
    args: argparse.Namespace, variants: dict, label: str, seed: int, epochs: int, rate: str
) -> list[dict]:
    """Train (or read back) one run; return its CSV rows."""
    out = args.out_dir / "runs" / f"{label}_s{seed}_e{epochs}_{rate}"
    done = out / "done.json"
    if done.exists() and not args.fresh:
        record = json.loads(done.read_text())
        rows, link = record["rows"], record["link"]
    else:
        sets = [
            f"trainer.epochs={epochs}",
            f"trainer.seed={seed}",
            "trainer.eval_every_epochs=0",
            "trainer.overwrite=true",  # the suite's own folder: a rerun replaces the run in it
            *variant_sets(label, variants, args, epochs),
            *args.set,
        ]
        print(f"== {label} seed {seed}, {epochs} epochs, {rate}", flush=True)
        begin = time.perf_counter()
        if args.suite == "passm":
            rows, link = train_local(args, out, sets), {"tx_bytes": [0]}
        else:
            rows, link = train_emulated(
                args.nodes, args.ranks_per_node, rate, args.config, out, sets
            )
        done.write_text(json.dumps({"rows": rows, "link": link}))
        print(
            f"   {time.perf_counter() - begin:.0f} s, final accuracy "
            f"{rows[-1]['val_accuracy']:.4f}",
            flush=True,
        )
    strategy = variants[label][0]
    elapsed = 0.0
    result = []
    for row in rows:
        elapsed += row["train_seconds"]
        windows = row.get("windows") or [row]  # an epoch of several windows lists them
        result.append(
            {
                **{k: row.get(k) for k in COLUMNS},
                "window_phases": "/".join(str(w.get("phase", "")) for w in windows),
                "window_global_skips": "/".join(str(w.get("global_skips", "")) for w in windows),
                "suite": args.suite,
                "variant": label,
                "strategy": strategy,
                "seed": seed,
                "budget": epochs,
                "link_rate": rate,
                "elapsed_train_seconds": elapsed,
                "link_tx_bytes": sum(link["tx_bytes"]),
            }
        )
    return result


def train_local(args: argparse.Namespace, out: Path, sets: list[str]) -> list[dict]:
    """``daso train`` as ``--ranks-per-node`` ranks of one node under the venv's mpiexec."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    command = [
        str(Path(sys.executable).parent / "mpiexec"),
        "-n",
        str(args.ranks_per_node),
        sys.executable,
        "-m",
        "daso.cli",
        "train",
        "--config",
        str(args.config),
    ]
    for item in [f"trainer.output_dir={out}", "checkpoint.every_epochs=0", *sets]:
        command += ["--set", item]
    env = {**os.environ, "DASO_RANKS_PER_NODE": str(args.ranks_per_node), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def paired_interval(differences: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided ``level`` confidence interval (Student's t
    with ``n - 1`` degrees of freedom; ``(mean, nan, nan)`` for one pair)."""
    from scipy import stats

    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(differences) / n**0.5
    return mean, mean - half, mean + half


def final(runs: dict, label: str, seed: int, budget: int, rate: str) -> dict | None:
    rows = runs.get((label, seed, budget, rate))
    return rows[-1] if rows else None


def main_table(runs: dict, args: argparse.Namespace, variants: list[str]) -> dict:
    """The main table's numbers (see the module docstring)."""
    rate, epochs, seeds = args.rate, args.epochs, args.seeds

    def acc(label: str, seed: int) -> float:
        return final(runs, label, seed, epochs, rate)["val_accuracy"]

    def seconds(label: str, seed: int) -> float:
        return final(runs, label, seed, epochs, rate)["elapsed_train_seconds"]

    sync = [v for v in variants if v in args.synchronous]
    mean_acc = {v: statistics.fmean(acc(v, s) for s in seeds) for v in variants}
    mean_time = {v: statistics.fmean(seconds(v, s) for s in seeds) for v in variants}
    baseline = min(sync, key=lambda v: mean_time[v])
    target = max(mean_acc[v] for v in sync) - args.margin
    bound = "no_comm" if "no_comm" in variants else None
    table = []
    for v in variants:
        diff = paired_interval([acc(v, s) - acc(baseline, s) for s in seeds])
        rows = [final(runs, v, s, epochs, rate) for s in seeds]
        table.append(
            {
                "variant": v,
                "accuracy": mean_acc[v],
                "range": (min(acc(v, s) for s in seeds), max(acc(v, s) for s in seeds)),
                "difference": diff,
                "seconds": mean_time[v],
                "vs_baseline": statistics.fmean(
                    seconds(v, s) / seconds(baseline, s) for s in seeds
                ),
                "vs_bound": statistics.fmean(seconds(v, s) / seconds(bound, s) for s in seeds)
                if bound
                else None,
                "cross_node_mb": statistics.fmean(
                    sum(r["cross_node_bytes"] or 0 for r in runs[(v, s, epochs, rate)])
                    for s in seeds
                )
                / 1e6,
                "link_mb": statistics.fmean(r["link_tx_bytes"] for r in rows) / 1e6,
                "skips": sorted(
                    {
                        int(k)
                        for s in seeds
                        for r in runs[(v, s, epochs, rate)]
                        for k in r["window_global_skips"].split("/")
                        if k not in ("", "None")
                    }
                ),
            }
        )
    return {"baseline": baseline, "target": target, "rows": table, "bound": bound}


def time_to_accuracy(runs: dict, args: argparse.Namespace, target: float) -> list[dict]:
    """Per variant with several budgets, and per seed: the shortest budget reaching
    ``target`` and its training time (``None`` if no budget reaches it)."""
    out = []
    for label in args.variants:
        budgets = sorted({b for lab, _, b, rate in runs if lab == label and rate == args.rate})
        per_seed = []
        for seed in args.seeds:
            hit = None
            for budget in budgets:
                row = final(runs, label, seed, budget, args.rate)
                if row is not None and row["val_accuracy"] >= target:
                    hit = (budget, row["elapsed_train_seconds"])
                    break
            per_seed.append(hit)
        out.append({"variant": label, "budgets": budgets, "per_seed": per_seed})
    return out


def variants_strategy(args: argparse.Namespace, label: str) -> str:
    """The strategy a variant label runs."""
    return (PASSM_VARIANTS if args.suite == "passm" else DASO_VARIANTS)[label][0]


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def write_summary(runs: dict, args: argparse.Namespace, variants: list[str], path: Path) -> dict:
    main = main_table(runs, args, variants)
    base = main["baseline"]
    lines = [
        f"# Equal-accuracy suite ({args.suite})",
        "",
        f"Command: `{' '.join(args.argv)}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU. "
        f"{args.nodes} node(s) x {args.ranks_per_node} ranks"
        + (f", link {args.rate} per node (tc tbf)" if args.suite == "daso" else "")
        + f". Workload: `{args.config.relative_to(ROOT)}` with {args.train_images} training "
        f"images ({args.steps} steps an epoch per rank), scored on the full 10,000-image test "
        f"split after the last epoch; seeds {args.seeds} (paired).",
        "",
        f"Baseline (the fastest synchronous variant): `{base}`. Target: the best synchronous "
        f"mean final accuracy minus {args.margin * 100:.1f} points = {main['target']:.4f}. "
        "Time: training seconds (validation and start-up excluded); ratios are means of "
        "per-seed ratios.",
        "",
        f"## {args.epochs} epochs",
        "",
        f"| variant | final accuracy (mean) | range | difference to {base} (mean, 95% CI) "
        f"| training time (s) | vs {base} | vs no_comm | cross-node MB (counted) "
        "| link MB (tc) | global_skips seen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in main["rows"]:
        d = r["difference"]
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.4f} | {r['range'][0]:.4f}-{r['range'][1]:.4f} "
            f"| {d[0] * 100:+.2f} pts [{fmt(d[1] * 100, '+.2f')}, {fmt(d[2] * 100, '+.2f')}] "
            f"| {r['seconds']:.1f} | {r['vs_baseline']:.2f} | {fmt(r['vs_bound'])} "
            f"| {r['cross_node_mb']:.1f} | {r['link_mb']:.1f} "
            f"| {', '.join(str(s) for s in r['skips']) or '-'} |"
        )
    controlled = [v for v in variants if variants_strategy(args, v) == "daso"]
    if controlled:
        lines += [
            "",
            f"DASO's controller, seed {args.seeds[0]}: `global_skips` of every window "
            "(0: blocking; epochs separated by `|`):",
            "",
        ]
        for v in controlled:
            rows = runs[(v, args.seeds[0], args.epochs, args.rate)]
            lines.append(f"- `{v}`: " + " | ".join(r["window_global_skips"] for r in rows))
    ttt = time_to_accuracy(runs, args, main["target"])
    base_time = {
        s: final(runs, base, s, args.epochs, args.rate)["elapsed_train_seconds"] for s in args.seeds
    }
    bound = main["bound"]
    lines += [
        "",
        f"## Time to {main['target']:.4f} (each budget its own LR schedule)",
        "",
        "Per seed: the shortest budget (epochs) whose final accuracy reaches the target, and its "
        f"training time; ratios to `{base}`'s {args.epochs}-epoch run of the same seed"
        + (" and to `no_comm` for the same epochs" if bound else "")
        + ".",
        "",
        f"| variant | budgets run | per seed: epochs, seconds | mean s (seeds reached) | vs {base} "
        "| vs no_comm, same epochs |",
        "|---|---|---|---|---|---|",
    ]
    for t in ttt:
        hits = [(s, h) for s, h in zip(args.seeds, t["per_seed"]) if h is not None]
        cells = ", ".join(
            f"s{s}: {h[0]} ep {h[1]:.0f} s" if h else f"s{s}: -"
            for s, h in zip(args.seeds, t["per_seed"])
        )
        ratio = [h[1] / base_time[s] for s, h in hits]
        vs_bound = []
        for s, h in hits:
            b = final(runs, "no_comm", s, args.epochs, args.rate) if bound else None
            if b is not None:  # the bound's per-epoch time times the budget's epochs
                vs_bound.append(h[1] / (b["elapsed_train_seconds"] * h[0] / args.epochs))
        lines.append(
            f"| {t['variant']} | {', '.join(map(str, t['budgets']))} | {cells} | "
            f"{fmt(statistics.fmean(h[1] for _, h in hits) if hits else None, '.1f')} "
            f"({len(hits)}/{len(args.seeds)}) | "
            f"{fmt(statistics.fmean(ratio) if ratio else None)} | "
            f"{fmt(statistics.fmean(vs_bound) if vs_bound else None)} |"
        )
    sweep = sweep_table(runs, args)
    if sweep:
        lines += [
            "",
            f"## Link-rate sweep ({args.epochs} epochs, seed {args.seeds[0]}; `no_comm` from "
            f"the {args.rate} table: it sends nothing)",
            "",
            "| link rate | variant | training time (s) | s per step | vs no_comm "
            "| vs hierarchical | final accuracy | link MB (tc) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sweep:
            lines.append(
                f"| {r['rate']} | {r['variant']} | {r['seconds']:.1f} | {r['step']:.3f} "
                f"| {fmt(r['vs_bound'])} | {fmt(r['vs_hier'])} | {r['accuracy']:.4f} "
                f"| {r['link_mb']:.1f} |"
            )
    path.write_text("\n".join(lines) + "\n")
    return main


def sweep_table(runs: dict, args: argparse.Namespace) -> list[dict]:
    if args.suite != "daso" or not args.sweep_rates:
        return []
    seed, epochs = args.seeds[0], args.epochs
    bound = final(runs, "no_comm", seed, epochs, args.rate)
    table = []
    for rate in args.sweep_rates:
        hier = final(runs, "hierarchical", seed, epochs, rate)
        extra = ["hierarchical_after_backward"] if rate == args.rate else []
        for label in [*args.sweep_variants, *extra]:
            row = final(runs, label, seed, epochs, rate)
            if row is None:
                continue
            seconds = row["elapsed_train_seconds"]
            table.append(
                {
                    "rate": rate,
                    "variant": label,
                    "seconds": seconds,
                    "step": seconds / (epochs * args.steps),
                    "vs_bound": seconds / bound["elapsed_train_seconds"] if bound else None,
                    "vs_hier": seconds / hier["elapsed_train_seconds"] if hier else None,
                    "accuracy": row["val_accuracy"],
                    "link_mb": row["link_tx_bytes"] / 1e6,
                }
            )
    return table


def plot(runs: dict, args: argparse.Namespace, main: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sweep_table(runs, args)
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = dict.fromkeys(label for label, _, _, rate in runs if rate == args.rate)
    for label in labels:
        points = sorted(
            (rows[-1]["elapsed_train_seconds"], rows[-1]["val_accuracy"], budget)
            for (lab, _, budget, rate), rows in runs.items()
            if lab == label and rate == args.rate
        )
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=label, s=18)
    ax.axhline(main["target"], color="grey", linewidth=0.8, label="target")
    ax.set(
        title=f"{args.suite}: final test accuracy per run ({args.rate}, seeds {args.seeds})",
        xlabel="training time (s)",
        ylabel="test accuracy (10,000 images)",
    )
    ax.legend(fontsize=7)
    if sweep:
        ax = axes[0][1]
        for label in args.sweep_variants:
            points = [r for r in sweep if r["variant"] == label]
            ax.plot(
                [r["rate"] for r in points],
                [r["vs_bound"] for r in points],
                marker="o",
                label=label,
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(title="training time / no_comm's", xlabel="link rate per node", ylabel="ratio")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=["daso", "passm"], default="daso")
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="the main table's budget")
    parser.add_argument("--budgets", type=int, nargs="*", default=[8], help="more epochs to try")
    parser.add_argument("--budget-variants", nargs="*", default=None)
    parser.add_argument("--rate", default="50mbit")
    parser.add_argument(
        "--sweep-rates", nargs="*", default=["10mbit", "50mbit", "200mbit", "unlimited"]
    )
    parser.add_argument("--sweep-variants", nargs="*", default=["hierarchical", "daso"])
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--window-steps", type=int, default=8)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--cooldown-epochs", type=int, default=1)
    parser.add_argument("--margin", type=float, default=0.005, help="accuracy below the best")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/cifar10_bench.yaml")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--fresh", action="store_true", help="train every run again")
    args = parser.parse_args()
    args.argv = ["benchmarks/equal_accuracy.py", *sys.argv[1:]]
    args.config = args.config.resolve()
    passm = args.suite == "passm"
    variants = PASSM_VARIANTS if passm else DASO_VARIANTS
    if args.variants is None:
        args.variants = (
            list(variants) if passm else [v for v in variants if v != "hierarchical_after_backward"]
        )
    if args.budget_variants is None:
        args.budget_variants = ["passm"] if passm else ["daso"]
    args.nodes, args.ranks_per_node = (1, 2) if passm else (2, 2)
    args.synchronous = ("ddp",) if passm else SYNCHRONOUS
    if passm:
        args.rate, args.sweep_rates = "local", []
    args.out_dir = args.out_dir or ROOT / f"benchmarks/results/equal_accuracy_{args.suite}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.set = [f"data.train_subset={args.train_images}", "data.val_subset=null", *args.set]
    from daso.config import load_config

    config = load_config(args.config, args.set)
    args.steps = steps_per_epoch(config, args.nodes * args.ranks_per_node)

    runs: dict[tuple, list[dict]] = {}

    def take(label: str, seed: int, epochs: int, rate: str) -> None:
        if (label, seed, epochs, rate) not in runs:
            runs[(label, seed, epochs, rate)] = run_one(args, variants, label, seed, epochs, rate)

    for seed in args.seeds:
        for label in args.variants:
            take(label, seed, args.epochs, args.rate)
    for seed in args.seeds:
        for budget in args.budgets:
            for label in args.budget_variants:
                take(label, seed, budget, args.rate)
    if args.sweep_rates:
        take("hierarchical_after_backward", args.seeds[0], args.epochs, args.rate)
        for rate in args.sweep_rates:
            for label in args.sweep_variants:
                take(label, args.seeds[0], args.epochs, rate)
    rows = [row for run in runs.values() for row in run]
    with (args.out_dir / "equal_accuracy.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    main_numbers = write_summary(runs, args, args.variants, args.out_dir / "summary.md")
    plot(runs, args, main_numbers, args.out_dir / "equal_accuracy.png")
    print((args.out_dir / "summary.md").read_text())


if __name__ == "__main__":
    main()
