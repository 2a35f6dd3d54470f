"""The language-model workload on emulated nodes: ``ddp``, ``daso`` (windows of steps) and
``local_sgd`` train the character transformer on Tiny Shakespeare for the same optimizer steps.

Each strategy runs its config (``configs/tinyshakespeare_char_<strategy>.yaml``) under
``daso emulate`` (network namespaces, optionally rate-limited links; needs root), one after the
other in one invocation. Writes, to ``--out-dir``:

- ``language_model.csv``: one row per strategy and epoch (wall time, train and validation
  loss in nats per character, perplexity, cross-node bytes);
- ``language_model.png``: validation loss against wall time;
- ``language_model.md``: final validation loss, its gap to ``ddp``, whole-run time and
  cross-node bytes as ratios to ``ddp``.

Usage (about 25 minutes on 2 cores for the three strategies)::

    sudo .venv/bin/python benchmarks/language_model.py --rate unlimited
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, train_emulated  # noqa: E402

COLUMNS = [
    "strategy",
    "epoch",
    "wall_seconds",
    "train_loss",
    "val_loss",
    "val_perplexity",
    "cross_node_bytes",
    "link_rate",
]


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for strategy in args.strategies:
        config = ROOT / "configs" / f"tinyshakespeare_char_{strategy}.yaml"
        out = args.out_dir / "runs" / strategy
        print(f"== {strategy} at {args.rate}", flush=True)
        history, _ = train_emulated(
            args.nodes, args.ranks_per_node, args.rate, config, out, list(args.set)
        )
        last = history[-1]
        print(
            f"   {last['wall_seconds']:.0f} s, final val loss {last['val_loss']:.4f}",
            flush=True,
        )
        rows += [
            {**{k: row.get(k) for k in COLUMNS}, "strategy": strategy, "link_rate": args.rate}
            for row in history
        ]
    return rows


def summary(rows: list[dict], args: argparse.Namespace) -> str:
    final = {}
    for row in rows:
        final[row["strategy"]] = row  # the last epoch's row of each strategy
    base = final.get("ddp")
    lines = [
        "# Language model: character transformer on Tiny Shakespeare",
        "",
        f"{args.nodes} emulated nodes x {args.ranks_per_node} ranks, link {args.rate}; the same "
        "optimizer steps for every strategy (configs/tinyshakespeare_char_*.yaml"
        + (f", with {' '.join(args.set)}" if args.set else "")
        + ").",
        "",
        "| strategy | final val loss (nats/char) | vs ddp | perplexity | run time (s) "
        "| time vs ddp | cross-node bytes vs ddp |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in final.items():
        gap = f"{row['val_loss'] - base['val_loss']:+.4f}" if base else "-"
        time_ratio = f"{row['wall_seconds'] / base['wall_seconds']:.2f}x" if base else "-"
        total_bytes = sum(r["cross_node_bytes"] for r in rows if r["strategy"] == name)
        base_bytes = sum(r["cross_node_bytes"] for r in rows if r["strategy"] == "ddp")
        bytes_ratio = f"{total_bytes / base_bytes:.2f}x" if base_bytes else "-"
        lines.append(
            f"| {name} | {row['val_loss']:.4f} | {gap} | {row['val_perplexity']:.2f} "
            f"| {row['wall_seconds']:.0f} | {time_ratio} | {bytes_ratio} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == name]
        ax.plot([r["wall_seconds"] for r in mine], [r["val_loss"] for r in mine], "o-", label=name)
    ax.axhline(2.0, color="grey", linestyle=":", label="2.0 nats/char")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Character transformer on Tiny Shakespeare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["ddp", "daso", "local_sgd"])
    parser.add_argument("--rate", default="unlimited", help="link rate, e.g. 50mbit")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra --set for every run")
    parser.add_argument(
        "--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "language_model"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    with (args.out_dir / "language_model.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out_dir / "language_model.png")
    text = summary(rows, args)
    (args.out_dir / "language_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
