"""An alpha-beta cost model of one training step, fitted on emulated runs, used to extrapolate.

Model (per step, N nodes, P parameters, link bandwidth B bytes/s per node, latency alpha s):

* an allreduce of ``b`` bytes per node over N nodes (MPICH's large-message algorithm,
  reduce-scatter then allgather) takes ``t_ar(b, N) = 2 (N-1) alpha + 2 (N-1)/N * b / (eta B)``,
  with ``eta`` the fraction of the nominal rate that the transport achieves;
* ``hierarchical``: ``T = T_c + t_ar(4 P, N)``: float32 gradients, blocking after backward;
* ``daso`` while cycling (``global_skips`` S, ``batches_to_wait`` W): one bfloat16 send per S
  batches, hidden behind up to W batches of compute but for a fraction ``1 - phi`` of it:
  ``T = T_c + (t_ar(2 P, N) - phi * min(t_ar(2 P, N), W T_c)) / S``; during its blocking
  warm-up and cool-down (a fraction ``f`` of the epochs) ``T = T_c + t_ar(2 P, N)``.

``T_c`` is the measured step time of the ``no_comm`` bound at the same node count. ``eta`` and
``alpha`` are fitted (least squares) on the measured ``hierarchical`` step times, ``phi`` on the
measured ``daso`` step time at the smallest node count; the other measurements check the model
(the error is printed and written). The emulated runs use ``daso emulate`` (network namespaces,
``tc tbf``), ``--nodes`` nodes of 1 rank, ``--rate`` per node.

The fitted ``eta`` and ``phi`` are then used to predict step time and the speed-up of DASO over
hierarchical for 2 to 1024 nodes of 4 GPUs, for ResNet-50 (25.6M parameters) and a
1B-parameter transformer, on InfiniBand-class (200 Gbit/s) and Ethernet-class (25 Gbit/s)
links. GPU compute times per step and link latencies are stated assumptions (options), not
measurements: this machine has no GPU.

    .venv/bin/python benchmarks/scaling_model.py            # measures (as root), fits, predicts
    .venv/bin/python benchmarks/scaling_model.py --reuse    # fit and predict from the CSV

Output: ``scaling_measured.csv``, ``scaling_model.csv`` (predictions), ``scaling_model.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from compare import train_emulated  # noqa: E402  (the sibling script)

RATES = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def bytes_per_second(rate: str) -> float:
    """``"50mbit"`` -> 6.25e6 bytes/s."""
    for unit in ("gbit", "mbit", "kbit", "bit"):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * RATES[unit] / 8
    raise ValueError(f"rate {rate!r}: use e.g. 50mbit")


def allreduce_seconds(nbytes: float, nodes: int, bandwidth: float, alpha: float) -> float:
    """Reduce-scatter + allgather of ``nbytes`` per node over ``nodes`` nodes, in seconds."""
    if nodes <= 1:
        return 0.0
    return 2 * (nodes - 1) * alpha + 2 * (nodes - 1) / nodes * nbytes / bandwidth


def step_hierarchical(t_c: float, params: float, nodes: int, bw: float, alpha: float) -> float:
    return t_c + allreduce_seconds(4 * params, nodes, bw, alpha)


def step_daso(
    t_c: float,
    params: float,
    nodes: int,
    bw: float,
    alpha: float,
    phi: float,
    skips: int = 4,
    wait: int = 1,
    blocking_fraction: float = 0.0,
) -> float:
    sync = allreduce_seconds(2 * params, nodes, bw, alpha)
    cycling = t_c + (sync - phi * min(sync, wait * t_c)) / skips
    return (1 - blocking_fraction) * cycling + blocking_fraction * (t_c + sync)


def measure(args: argparse.Namespace) -> list[dict]:
    """Emulated runs: no_comm, hierarchical and daso (always cycling) at each node count."""
    rows = []
    for nodes in args.nodes:
        for strategy in ("no_comm", "hierarchical", "daso"):
            out = args.out_dir / "runs" / f"scaling_{strategy}_{nodes}"
            sets = [
                f"strategy.name={strategy}",
                f"trainer.epochs={args.epochs}",
                f"data.train_subset={args.train_images}",
                "data.val_subset=200",
            ]
            if strategy == "daso":  # steady state: global_skips 4, W 1
                sets += [
                    "strategy.warmup_windows=0",
                    "strategy.cooldown_windows=0",
                    "strategy.patience=100",
                ]
            print(f"== {strategy} on {nodes} nodes at {args.rate}", flush=True)
            rows_run, _ = train_emulated(
                nodes, 1, args.rate, ROOT / "configs/cifar10_bench.yaml", out, sets
            )
            last = rows_run[-1]
            batches = args.train_images // nodes // 32
            rows.append(
                {
                    "strategy": strategy,
                    "nodes": nodes,
                    "step_seconds": last["train_seconds"] / batches,
                    "cross_node_bytes_per_step": last["cross_node_bytes"] / batches,
                }
            )
    return rows


def fit(measured: list[dict], params: float, bw: float) -> dict[str, float]:
    """eta, alpha from hierarchical (grid + least squares); phi from daso at the fewest nodes."""
    t_c = {r["nodes"]: r["step_seconds"] for r in measured if r["strategy"] == "no_comm"}
    hier = [r for r in measured if r["strategy"] == "hierarchical"]
    best = (math.inf, 1.0, 0.0)
    for eta in [i / 200 for i in range(20, 201)]:
        for alpha in [i * 1e-4 for i in range(0, 101)]:
            err = sum(
                (
                    step_hierarchical(t_c[r["nodes"]], params, r["nodes"], eta * bw, alpha)
                    - r["step_seconds"]
                )
                ** 2
                for r in hier
            )
            best = min(best, (err, eta, alpha))
    _, eta, alpha = best
    daso = min((r for r in measured if r["strategy"] == "daso"), key=lambda r: r["nodes"])
    n = daso["nodes"]
    phi = min(
        (abs(step_daso(t_c[n], params, n, eta * bw, alpha, p) - daso["step_seconds"]), p)
        for p in [i / 100 for i in range(0, 101)]
    )[1]
    return {"eta": eta, "alpha": alpha, "phi": phi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--rate", default="50mbit")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=3072)
    parser.add_argument("--reuse", action="store_true", help="fit from scaling_measured.csv")
    parser.add_argument(
        "--resnet50-step",
        type=float,
        default=0.10,
        help="assumed GPU compute seconds per ResNet-50 step (batch 64, A100)",
    )
    parser.add_argument(
        "--transformer-step",
        type=float,
        default=1.5,
        help="assumed GPU compute seconds per 1B-transformer step",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    measured_csv = args.out_dir / "scaling_measured.csv"
    if args.reuse:
        with measured_csv.open() as handle:
            measured = [
                {
                    **r,
                    "nodes": int(r["nodes"]),
                    "step_seconds": float(r["step_seconds"]),
                    "cross_node_bytes_per_step": float(r["cross_node_bytes_per_step"]),
                }
                for r in csv.DictReader(handle)
            ]
    else:
        measured = measure(args)
        with measured_csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(measured[0]))
            writer.writeheader()
            writer.writerows(measured)

    sys.path.insert(0, str(ROOT))
    from daso.models import build_model

    params = sum(p.numel() for p in build_model("resnet20").parameters())
    bw = bytes_per_second(args.rate)
    fitted = fit(measured, params, bw)
    print(
        f"fitted on {args.rate}: eta {fitted['eta']:.3f} (fraction of the nominal rate), "
        f"alpha {fitted['alpha'] * 1e3:.2f} ms, phi {fitted['phi']:.2f} (hidden share of a "
        "DASO sync)"
    )
    t_c = {r["nodes"]: r["step_seconds"] for r in measured if r["strategy"] == "no_comm"}
    print(f"{'strategy':>13} {'nodes':>5} {'measured s':>10} {'model s':>8} {'error':>7}")
    check_rows = []
    for r in measured:
        if r["strategy"] == "no_comm":
            continue
        n = r["nodes"]
        args_model = (t_c[n], params, n, fitted["eta"] * bw, fitted["alpha"])
        model = (
            step_hierarchical(*args_model)
            if r["strategy"] == "hierarchical"
            else step_daso(*args_model, fitted["phi"])
        )
        error = (model - r["step_seconds"]) / r["step_seconds"]
        check_rows.append({**r, "model_seconds": model, "relative_error": error})
        print(f"{r['strategy']:>13} {n:>5} {r['step_seconds']:>10.3f} {model:>8.3f} {error:>+7.1%}")

    workloads = {
        "resnet50": (25.6e6, args.resnet50_step),
        "transformer_1b": (1e9, args.transformer_step),
    }
    links = {"infiniband_200gbit": (200e9 / 8, 5e-6), "ethernet_25gbit": (25e9 / 8, 25e-6)}
    predictions = []
    for workload, (p, t_step) in workloads.items():
        for link, (nominal, alpha) in links.items():
            for exponent in range(1, 11):
                n = 2**exponent
                hier = step_hierarchical(t_step, p, n, fitted["eta"] * nominal, alpha)
                daso = step_daso(
                    t_step,
                    p,
                    n,
                    fitted["eta"] * nominal,
                    alpha,
                    fitted["phi"],
                    blocking_fraction=8 / 90,
                )
                predictions.append(
                    {
                        "workload": workload,
                        "link": link,
                        "nodes": n,
                        "gpus": 4 * n,
                        "hierarchical_step_seconds": hier,
                        "daso_step_seconds": daso,
                        "speedup_daso": hier / daso,
                    }
                )
    with (args.out_dir / "scaling_model.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(predictions[0]))
        writer.writeheader()
        writer.writerows(predictions)
    with (args.out_dir / "scaling_check.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(check_rows[0]))
        writer.writeheader()
        writer.writerows(check_rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for workload in workloads:
        for link in links:
            rows = [r for r in predictions if r["workload"] == workload and r["link"] == link]
            label = f"{workload}, {link}"
            axes[0].plot(
                [r["nodes"] for r in rows],
                [r["speedup_daso"] for r in rows],
                marker="o",
                label=label,
            )
            axes[1].plot(
                [r["nodes"] for r in rows],
                [r["hierarchical_step_seconds"] for r in rows],
                linestyle="--",
                label=f"hierarchical, {label}",
            )
            axes[1].plot(
                [r["nodes"] for r in rows],
                [r["daso_step_seconds"] for r in rows],
                label=f"daso, {label}",
            )
    axes[0].set(
        xscale="log",
        xlabel="nodes (x4 GPUs)",
        ylabel="step time hierarchical / daso",
        title="predicted speed-up of DASO",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="nodes (x4 GPUs)",
        ylabel="step seconds",
        title="predicted step time",
    )
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(args.out_dir / "scaling_model.png", dpi=110)
    for r in predictions:
        if r["nodes"] in (2, 16, 128, 1024):
            print(
                f"{r['workload']:>15} {r['link']:>19} {r['nodes']:>5} nodes: hierarchical "
                f"{r['hierarchical_step_seconds']:.3f} s, daso {r['daso_step_seconds']:.3f} s, "
                f"speed-up {r['speedup_daso']:.2f}"
            )


if __name__ == "__main__":
    main()
