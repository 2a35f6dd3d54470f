"""A cost model of a training run, fitted on the equal-accuracy suite's emulated runs, checked
against every one of them, and used to project DASO against the overlapped synchronous
baseline to 16-1024 nodes.

Model (a run of ``n`` steps, per node ``b`` bytes on a link of ``B`` bytes/s):

* ``no_comm``: ``T = n T_c`` (measured: ``T_c``, the step time of a rank alone);
* every byte sent costs link time ``b / (eta B)`` (``eta``: the share of the nominal rate the
  transport achieves) and CPU time ``c b`` on the compute cores (Gloo, MPI and the copies share
  the cores with the ranks' compute; 0 on a machine with spare cores);
* ``hierarchical`` without overlap (``overlap: false``): ``T = n T_c + b / (eta B) + c b``;
* ``hierarchical`` (overlapped per bucket): the transfer hides behind the backward pass, a
  share ``psi`` of the step: ``T = n T_c + max(0, b / (eta B) - psi n T_c) + c b``;
* ``daso``: the bytes of blocking windows (warm-up, cool-down, window ends: ``b_block``) wait
  on the link; each of its ``k`` cycling sends (``b_cyc / k`` bytes) hides behind ``phi``
  steps of compute before its merge and the rest waits:
  ``T = n T_c + b_block / (eta B) + k max(0, b_cyc / (k eta B) - phi t_c) + c b``, ``t_c``
  the bound's step time.

``eta``, ``c``, ``psi`` and ``phi`` are fitted by least squares of the relative error over every
run of the suite at every link rate (``unlimited`` is taken as ``--unlimited-rate``); the check
table gives each run's error. The bytes are the emulated links' own counters (``tc``), split
into blocking and cycling by the strategy's per-epoch counts.

The projection uses an allreduce over ``N`` nodes of ``t(b, N) = 2 (N - 1) / N * b / (eta B) +
2 (N - 1) alpha`` (reduce-scatter then allgather), the fitted ``psi`` and ``phi``, and stated
assumptions (options; this machine has no GPU): the GPU step time of ResNet-50 (25.6M
parameters) and of a 1B-parameter model, link latency ``alpha``, DASO's ``global_skips`` and its
blocking share (the paper's 8 of 90 epochs plus one window-end average per ``--window-steps``).
``c`` is left out of the projection (GPU nodes have cores to spare for communication).

    .venv/bin/python benchmarks/scaling_model.py      # reads results/equal_accuracy_daso/

Output (``--out-dir``): ``scaling_check.csv`` (every run, measured and modelled seconds, error),
``scaling_model.csv`` (projections), ``scaling_model.png``, ``scaling_model.md``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATES = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
MODELLED = ("hierarchical", "hierarchical_after_backward", "daso", "daso_paper")


def bytes_per_second(rate: str) -> float:
    """``"50mbit"`` -> 6.25e6 bytes/s."""
    for unit in ("gbit", "mbit", "kbit", "bit"):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * RATES[unit] / 8
    raise ValueError(f"rate {rate!r}: use e.g. 50mbit")


def read_runs(path: Path, nodes: int) -> list[dict]:
    """One record per run of the suite's CSV: variant, seed, rate, steps, seconds, and per node
    its link bytes split into blocking and cycling (by the strategy's counted bytes)."""
    runs: dict[tuple, list[dict]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            key = (row["variant"], int(row["seed"]), int(row["budget"]), row["link_rate"])
            runs.setdefault(key, []).append(row)
    records = []
    for (variant, seed, budget, rate), rows in runs.items():
        counted = [float(r["cross_node_bytes"] or 0) for r in rows]
        link = float(rows[0]["link_tx_bytes"]) / nodes
        cycling = sum(c for c, r in zip(counted, rows) if r["phase"] == "cycling")
        share = cycling / sum(counted) if sum(counted) else 0.0
        sends = sum(int(float(r["sends"])) for r in rows if r.get("sends") not in (None, ""))
        records.append(
            {
                "variant": variant,
                "seed": seed,
                "epochs": budget,
                "rate": rate,
                "seconds": float(rows[-1]["elapsed_train_seconds"]),
                "link_bytes": link,
                "cycling_share": share,
                "sends": sends,
                "steps": None,
            }
        )
    return records


def modelled_seconds(run: dict, t_c: float, params: dict, bandwidth: float) -> float:
    """The model's training seconds for ``run`` (module docstring), ``t_c`` the bound's
    seconds for the same epochs."""
    eta, cpu, psi, phi = params["eta"], params["cpu"], params["psi"], params["phi"]
    b = run["link_bytes"]
    link = b / (eta * bandwidth)
    variant = run["variant"]
    if variant == "hierarchical_after_backward":
        extra = link
    elif variant == "hierarchical":
        extra = max(0.0, link - psi * t_c)
    else:  # daso variants: each cycling send hides behind phi steps of compute
        sends = max(run["sends"], 1)
        per_send = link * run["cycling_share"] / sends
        step = t_c / run["steps"]
        extra = link * (1 - run["cycling_share"]) + sends * max(0.0, per_send - phi * step)
    return t_c + extra + cpu * b


def fit(runs: list[dict], bounds: dict, rate_of: dict) -> dict:
    """``eta``, ``cpu``, ``psi``, ``phi`` minimising the squared relative errors over ``runs``
    (SciPy's bounded least squares; ``cpu`` in ns per byte internally)."""
    from scipy.optimize import least_squares

    def unpack(x):  # noqa: ANN001, ANN202
        return {"eta": x[0], "cpu": x[1] * 1e-9, "psi": x[2], "phi": x[3]}

    def residuals(x):  # noqa: ANN001, ANN202
        params = unpack(x)
        return [
            modelled_seconds(r, bounds[r["seed"], r["epochs"]], params, rate_of[r["rate"]])
            / r["seconds"]
            - 1
            for r in runs
        ]

    result = least_squares(
        residuals, x0=[0.9, 5.0, 0.3, 0.8], bounds=([0.2, 0.0, 0.0, 0.0], [1.5, 1000.0, 1.0, 8.0])
    )
    return unpack(result.x)


def allreduce_seconds(nbytes: float, nodes: int, bandwidth: float, alpha: float) -> float:
    """Reduce-scatter + allgather of ``nbytes`` per node over ``nodes`` nodes, in seconds."""
    if nodes <= 1:
        return 0.0
    return 2 * (nodes - 1) / nodes * nbytes / bandwidth + 2 * (nodes - 1) * alpha


def project(args: argparse.Namespace, params: dict) -> list[dict]:
    """Step seconds of the overlapped synchronous baseline and of DASO, per workload, link and
    node count (module docstring)."""
    workloads = {"resnet50": (25.6e6, args.resnet50_step), "1b_model": (1e9, args.billion_step)}
    rows = []
    for (name, (p, t_c)), gbit, exponent in itertools.product(
        workloads.items(), args.link_gbit, range(4, 11)
    ):
        nodes = 2**exponent
        bandwidth = params["eta"] * gbit * 1e9 / 8
        grads = allreduce_seconds(4 * p, nodes, bandwidth, args.alpha)
        sync = t_c + max(0.0, grads - params["psi"] * t_c)
        send = allreduce_seconds(4 * p, nodes, bandwidth, args.alpha)  # float32 cycling
        blocking = allreduce_seconds(2 * p, nodes, bandwidth, args.alpha)  # bfloat16
        window_end = allreduce_seconds(2 * 2 * p, nodes, bandwidth, args.alpha)  # + momentum
        exposed = max(0.0, send - params["phi"] * t_c)  # per send, hidden behind phi steps
        cycling = t_c + exposed / args.global_skips + window_end / args.window
        daso = args.blocking_share * (t_c + blocking) + (1 - args.blocking_share) * cycling
        rows.append(
            {
                "workload": name,
                "link_gbit": gbit,
                "nodes": nodes,
                "gpus": 4 * nodes,
                "sync_step_seconds": sync,
                "daso_step_seconds": daso,
                "speedup_daso": sync / daso,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--suite-csv",
        type=Path,
        default=ROOT / "benchmarks/results/equal_accuracy_daso/equal_accuracy.csv",
    )
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes of the suite")
    parser.add_argument("--steps-per-epoch", type=int, default=32, help="of the suite's runs")
    parser.add_argument("--unlimited-rate", default="10gbit", help="what 'unlimited' stands for")
    parser.add_argument("--link-gbit", type=float, nargs="+", default=[10, 25, 100])
    parser.add_argument("--alpha", type=float, default=10e-6, help="link latency, s")
    parser.add_argument("--resnet50-step", type=float, default=0.10, help="GPU s per step")
    parser.add_argument("--billion-step", type=float, default=1.5, help="GPU s per step")
    parser.add_argument("--global-skips", type=int, default=4)
    parser.add_argument("--window", type=int, default=500, help="steps per window (epoch)")
    parser.add_argument("--blocking-share", type=float, default=8 / 90)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    runs = read_runs(args.suite_csv, args.nodes)
    bounds = {}
    for run in runs:
        if run["variant"] == "no_comm":
            bounds[run["seed"], run["epochs"]] = run["seconds"]
    checked = [r for r in runs if r["variant"] in MODELLED and (r["seed"], r["epochs"]) in bounds]
    for run in checked:
        run["steps"] = run["epochs"] * args.steps_per_epoch
    rate_of = {
        r["rate"]: bytes_per_second(args.unlimited_rate if r["rate"] == "unlimited" else r["rate"])
        for r in checked
    }
    params = fit(checked, bounds, rate_of)
    check = []
    for run in checked:
        model = modelled_seconds(
            run, bounds[run["seed"], run["epochs"]], params, rate_of[run["rate"]]
        )
        check.append({**run, "model_seconds": model, "relative_error": model / run["seconds"] - 1})
    projections = project(args, params)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("scaling_check.csv", check), ("scaling_model.csv", projections)):
        with (args.out_dir / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    worst = max(abs(r["relative_error"]) for r in check)
    lines = [
        "# Scaling model",
        "",
        f"Fitted on {len(check)} runs of `{args.suite_csv.relative_to(ROOT)}`: eta "
        f"{params['eta']:.3f} (share of the nominal rate), c {params['cpu'] * 1e9:.1f} ns per "
        f"byte (CPU), psi {params['psi']:.2f} (share of a step the overlapped allreduce hides "
        f"behind), phi {params['phi']:.2f} (steps of compute a DASO cycling send hides "
        "behind). Largest "
        f"error over the runs checked: {worst:.1%} (mean absolute "
        f"{statistics.fmean(abs(r['relative_error']) for r in check):.1%}).",
        "",
        "| variant | seed | epochs | link | measured s | model s | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(check, key=lambda r: (r["rate"], r["variant"], r["seed"], r["epochs"])):
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['epochs']} | {r['rate']} | {r['seconds']:.1f} "
            f"| {r['model_seconds']:.1f} | {r['relative_error']:+.1%} |"
        )
    lines += [
        "",
        f"Projection (assumed GPU step: ResNet-50 {args.resnet50_step} s, 1B model "
        f"{args.billion_step} s; latency {args.alpha * 1e6:.0f} us; DASO global_skips "
        f"{args.global_skips}, a window-end average every {args.window} steps, blocking share "
        f"{args.blocking_share:.3f}): step time of the overlapped synchronous allreduce over "
        "DASO's.",
        "",
        "| workload | link Gbit/s | " + " | ".join(f"{2**e} nodes" for e in range(4, 11)) + " |",
        "|---|---|" + "---|" * 7,
    ]
    for name, gbit in itertools.product(("resnet50", "1b_model"), args.link_gbit):
        cells = [
            f"{r['speedup_daso']:.2f}"
            for r in projections
            if r["workload"] == name and r["link_gbit"] == gbit
        ]
        lines.append(f"| {name} | {gbit:g} | " + " | ".join(cells) + " |")
    (args.out_dir / "scaling_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(projections, args)


def plot(projections: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, gbit in itertools.product(("resnet50", "1b_model"), args.link_gbit):
        rows = [r for r in projections if r["workload"] == name and r["link_gbit"] == gbit]
        ax.plot(
            [r["nodes"] for r in rows],
            [r["speedup_daso"] for r in rows],
            marker="o",
            label=f"{name}, {gbit:g} Gbit/s",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(
        xscale="log",
        xlabel="nodes (x4 GPUs)",
        ylabel="step time: overlapped synchronous / DASO",
        title="projected speed-up of DASO",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out_dir / "scaling_model.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
