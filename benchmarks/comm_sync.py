"""Cross-node sync benchmark: blocking sum, 16-bit reduction op, overlap with compute.

Measures the cross-node layer of DASO (:class:`daso.comm.mpi.CrossNodeSum`) on the
cross-node communicator ``C_0`` (local rank 0 of every node) for a flat float32 vector of
``--numel`` elements, for each wire dtype (float32, bfloat16, float16):

``mpi_allreduce``
    Raw ``MPI_Allreduce`` (in place) of a wire buffer already cast to the wire dtype, with the
    datatype and op that :func:`daso.comm.mpi.mpi_sum` picks (bfloat16: a user-defined op;
    float16: MPICH's native ``MPIX_C_FLOAT16``; float32: ``MPI_FLOAT``).
``sync_allreduce``
    ``CrossNodeSum.allreduce(flat)``: downcast into the wire buffer, the collective on the
    communication thread (``poll_interval`` 0: MPI's blocking call; > 0: ``MPI_Iallreduce`` +
    ``MPI_Test`` + sleep), upcast of the result. One row per poll interval.
``reduce_local``
    The reduction op alone on one rank (others idle): ``op.Reduce_local(in, inout)`` on two
    local buffers of ``numel`` elements, i.e. what MPI calls for each received chunk.
``torch_add``
    Reference for ``reduce_local``: ``inout.add_(in)`` in torch, the same arithmetic without MPI.
``compute``
    One compute step alone (``--step-mm`` products of 256x256 float32 matrices, 1 torch thread,
    calibrated to about ``--step-ms`` milliseconds when ``--step-mm`` is 0).
``overlap``
    ``--steps`` compute steps run while a ``CrossNodeSum.start(flat)`` is in flight, then
    ``wait()``; paired with a window of the same steps and no sync, repeat by repeat.

Units and statistics: ``seconds`` is the median over ``--repeats`` timed repeats (after one
untimed warm-up) of the slowest rank of ``C_0`` in each repeat (``reduce_local``/``torch_add``:
rank 0 alone; ``compute``/``overlap``: the mean step time of the window). Timed regions run by
all of ``C_0`` start after a barrier on it; clocks are ``time.perf_counter``.
``gbytes_per_second`` is 1e9 bytes per second of *one buffer in the measured dtype*
(``numel * element size``): the wire payload for the sync rows, one input operand for
``reduce_local``/``torch_add``; it is not a measure of wire traffic, which depends on
MPI's algorithm. ``ratio`` (``overlap`` only) is the mean step time with the sync in flight over
the mean step time without, over the whole window; ``inflight_ratio`` the same over only the
steps begun before the sum completed. ``completed_before_wait`` is the fraction of
(repeat, rank) pairs in which ``pending.done()`` was already true when the window ended, before
``wait()`` was called: the collective progressed while the main thread computed without calling
MPI. ``sync_seconds`` is the median time from ``start()`` to the sum's completion on the
communication thread while the main thread computes; ``wait_seconds`` the median time then spent
in ``wait()`` (which includes the upcast of the result into float32). The downcast in
``start()`` and the upcast in ``wait()`` run on the main thread but outside the compute steps, so
the ratios leave them out (``sync_allreduce`` includes them). Nothing here asserts on timings; a
wrong sum (beyond 2 ulp of the wire dtype) is an error.

Run from the repository root (2 emulated nodes x 1 rank, or 2 x 2 where only ``C_0`` runs the
benchmark and the other ranks sleep)::

    DASO_RANKS_PER_NODE=1 .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/comm_sync.py
    DASO_RANKS_PER_NODE=2 .venv/bin/mpiexec -n 4 .venv/bin/python benchmarks/comm_sync.py

Rank 0 prints a table and writes ``<out-dir>/comm_sync.csv`` (one row per measurement) and
``<out-dir>/comm_sync.png`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from mpi4py import MPI

try:
    import daso  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daso.comm.mpi import WIRE_DTYPES, CrossNodeSum, mpi_buffer, mpi_sum
from daso.log import configure_logging
from daso.topology import detect_topology

log = logging.getLogger("daso.benchmarks.comm_sync")

#: Side of the square float32 matrices multiplied by one unit of compute.
MATRIX_SIDE = 256
#: Seconds an idle rank sleeps between tests of a non-blocking barrier (it must not spin).
IDLE_POLL_SECONDS = 0.002

CSV_COLUMNS = (
    "measure",
    "wire_dtype",
    "poll_interval",
    "numel",
    "nodes",
    "repeats",
    "seconds",
    "gbytes_per_second",
    "ratio",
    "inflight_ratio",
    "sync_seconds",
    "wait_seconds",
    "completed_before_wait",
)


@dataclasses.dataclass
class Row:
    """One measurement: a row of the CSV (see the module docstring for the units)."""

    measure: str
    wire_dtype: str
    poll_interval: float | None
    numel: int
    nodes: int
    repeats: int
    seconds: float
    gbytes_per_second: float | None = None
    ratio: float | None = None
    inflight_ratio: float | None = None
    sync_seconds: float | None = None
    wait_seconds: float | None = None
    completed_before_wait: float | None = None

    def csv_values(self) -> list[str]:
        values = []
        for name in CSV_COLUMNS:
            value = getattr(self, name)
            if value is None:
                values.append("")
            elif isinstance(value, float):
                values.append(f"{value:.6g}")
            else:
                values.append(str(value))
        return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--numel",
        type=int,
        default=10_000_000,
        help="elements of the flat float32 vector summed over nodes",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed repeats of every measurement (plus 1 untimed warm-up)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder of comm_sync.csv and comm_sync.png (written by rank 0)",
    )
    parser.add_argument(
        "--wire-dtypes",
        nargs="+",
        default=list(WIRE_DTYPES),
        choices=list(WIRE_DTYPES),
        help="wire dtypes to measure",
    )
    parser.add_argument(
        "--poll-intervals",
        nargs="+",
        type=float,
        default=[0.0, 0.001, 0.005],
        help="CrossNodeSum poll_interval values in seconds (0 = blocking MPI call)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="compute steps per overlap window (the sync is waited after them)",
    )
    parser.add_argument(
        "--step-ms",
        type=float,
        default=10.0,
        help="target duration of one compute step, milliseconds",
    )
    parser.add_argument(
        "--step-mm",
        type=int,
        default=0,
        help="matrix products per compute step (0: calibrate to --step-ms)",
    )
    args = parser.parse_args(argv)
    if args.numel < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--numel, --repeats and --steps must be positive")
    if any(p < 0 for p in args.poll_intervals):
        parser.error("--poll-intervals must be >= 0")
    return args


def idle_barrier(comm: Any) -> None:
    """Barrier that sleeps instead of spinning, so waiting ranks leave the cores to the others."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(IDLE_POLL_SECONDS)


def slowest_median(comm: Any, times: Sequence[float]) -> float:
    """Median over repeats of the slowest rank's time in each repeat (collective over comm)."""
    per_rank = comm.allgather(list(times))
    return statistics.median(max(column) for column in zip(*per_rank))


def timed(
    comm: Any,
    run: Callable[[], Any],
    repeats: int,
    setup: Callable[[], Any] | None = None,
    barrier: bool = True,
) -> list[float]:
    """``repeats`` timings (seconds) of ``run()``, after one untimed warm-up.

    ``setup()`` runs before each, outside the timed region, followed by a barrier on ``comm``.
    """
    times = []
    for index in range(repeats + 1):
        if setup is not None:
            setup()
        if barrier:
            comm.Barrier()
        begin = time.perf_counter()
        run()
        elapsed = time.perf_counter() - begin
        if index > 0:
            times.append(elapsed)
    return times


def gbytes_per_second(numel: int, dtype: torch.dtype, seconds: float) -> float:
    return numel * torch.empty(0, dtype=dtype).element_size() / seconds / 1e9


def check_sum(sync: CrossNodeSum, comm: Any, numel: int) -> None:
    """Sum ``(rank + 1) * base`` over nodes and compare with the exact sum (2 ulp of the wire)."""
    generator = torch.Generator().manual_seed(1234)
    base = torch.rand(numel, generator=generator) * 0.5 + 0.5
    size = comm.Get_size()
    got = sync.allreduce(base * (comm.Get_rank() + 1))
    expected = base * (size * (size + 1) / 2)
    eps = torch.finfo(sync.wire_dtype).eps
    error = ((got - expected).abs() / expected).max().item()
    if not error <= 2 * eps:
        raise RuntimeError(
            f"cross-node sum with wire dtype {sync.wire_dtype} is wrong: max relative error "
            f"{error:.3g} > {2 * eps:.3g} (2 ulp) over {size} nodes"
        )


def measure_sync(
    comm: Any, args: argparse.Namespace, syncs: dict[str, CrossNodeSum], flat: torch.Tensor
) -> list[Row]:
    """Rows ``mpi_allreduce`` and ``sync_allreduce`` (one per poll interval) for every dtype."""
    rows = []
    nodes, numel = comm.Get_size(), args.numel
    for name, sync in syncs.items():
        dtype = WIRE_DTYPES[name]
        check_sum(sync, comm, numel)
        wire = torch.empty(numel, dtype=dtype)  # refilled before each repeat: sums in place
        times = timed(
            comm,
            functools.partial(comm.Allreduce, MPI.IN_PLACE, mpi_buffer(wire), op=mpi_sum(dtype)[1]),
            args.repeats,
            setup=functools.partial(wire.copy_, flat),
        )
        seconds = slowest_median(comm, times)
        rows.append(
            Row(
                "mpi_allreduce",
                name,
                None,
                numel,
                nodes,
                args.repeats,
                seconds,
                gbytes_per_second(numel, dtype, seconds),
            )
        )
        del wire
        for poll in args.poll_intervals:
            sync.poll_interval = poll
            times = timed(comm, functools.partial(sync.allreduce, flat), args.repeats)
            seconds = slowest_median(comm, times)
            rows.append(
                Row(
                    "sync_allreduce",
                    name,
                    poll,
                    numel,
                    nodes,
                    args.repeats,
                    seconds,
                    gbytes_per_second(numel, dtype, seconds),
                )
            )
        log.info("sync %s done", name)
    return rows


def measure_reduce_op(comm: Any, args: argparse.Namespace) -> list[Row]:
    """Rows ``reduce_local`` and ``torch_add`` per dtype, run on rank 0 of ``comm`` alone."""
    rows: list[Row] = []
    numel = args.numel
    if comm.Get_rank() != 0:
        idle_barrier(comm)
        return rows
    generator = torch.Generator().manual_seed(99)
    source = torch.rand(numel, generator=generator)
    for name in args.wire_dtypes:
        dtype = WIRE_DTYPES[name]
        inbuf = (source * 1e-3).to(dtype)
        inout = torch.empty(numel, dtype=dtype)
        op = mpi_sum(dtype)[1]
        expected = (source.to(dtype) + inbuf).float()
        for measure, run in (
            (
                "reduce_local",
                functools.partial(op.Reduce_local, mpi_buffer(inbuf), mpi_buffer(inout)),
            ),
            ("torch_add", functools.partial(inout.add_, inbuf)),
        ):
            reset = functools.partial(inout.copy_, source)
            times = timed(comm, run, args.repeats, setup=reset, barrier=False)
            seconds = statistics.median(times)
            rows.append(
                Row(
                    measure,
                    name,
                    None,
                    numel,
                    1,
                    args.repeats,
                    seconds,
                    gbytes_per_second(numel, dtype, seconds),
                )
            )
            if not torch.allclose(inout.float(), expected, rtol=2 * torch.finfo(dtype).eps):
                raise RuntimeError(f"{measure} computed a wrong {name} sum")
    idle_barrier(comm)
    return rows


class Compute:
    """One training-like compute step: ``count`` products of ``MATRIX_SIDE``-square matrices."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(7)
        self.a = torch.randn(MATRIX_SIDE, MATRIX_SIDE, generator=generator)
        self.b = torch.randn(MATRIX_SIDE, MATRIX_SIDE, generator=generator) / MATRIX_SIDE
        self.out = torch.empty(MATRIX_SIDE, MATRIX_SIDE)
        self.count = count

    def step(self) -> None:
        for _ in range(self.count):
            torch.mm(self.a, self.b, out=self.out)

    @classmethod
    def calibrated(cls, comm: Any, step_ms: float) -> Compute:
        """Products per step so that a step takes about ``step_ms`` on the slowest rank.

        A product's time is the fastest of several probes, so that a probe preempted by another
        process does not shorten the step.
        """
        probe = cls(5)
        probe.step()
        probes = []
        for _ in range(7):
            begin = time.perf_counter()
            probe.step()
            probes.append((time.perf_counter() - begin) / probe.count)
        per_mm = min(probes)
        count = max(1, round(step_ms / 1000 / per_mm))
        return cls(comm.allreduce(count, op=MPI.MAX))


@dataclasses.dataclass
class Window:
    """Timings of one overlap window on one rank (seconds)."""

    step_seconds: list[float]
    inflight_steps: int  # steps begun before the sum completed
    sync_seconds: float  # start() returned -> sum complete on the communication thread
    completed_before_wait: bool
    wait_seconds: float

    @property
    def mean_step(self) -> float:
        return statistics.fmean(self.step_seconds)

    @property
    def mean_inflight_step(self) -> float:
        return statistics.fmean(self.step_seconds[: max(1, self.inflight_steps)])


def run_window(
    comm: Any,
    compute: Compute,
    steps: int,
    sync: CrossNodeSum | None = None,
    flat: torch.Tensor | None = None,
) -> Window:
    """``steps`` compute steps, with ``sync.start(flat)`` in flight if ``sync`` is given.

    The main thread makes no MPI call between ``start`` and ``wait``; the moment the sum
    completes is taken by a done-callback, which runs on the communication thread.
    """
    comm.Barrier()
    completed_at: list[float] = []
    if sync is not None:
        pending = sync.start(flat)
        pending.future.add_done_callback(lambda _: completed_at.append(time.perf_counter()))
    step_begins, step_seconds = [], []
    for _ in range(steps):
        begin = time.perf_counter()
        compute.step()
        step_begins.append(begin)
        step_seconds.append(time.perf_counter() - begin)
    if sync is None:
        return Window(step_seconds, 0, 0.0, False, 0.0)
    completed = pending.done()
    begin = time.perf_counter()
    sync.wait()
    wait_seconds = time.perf_counter() - begin
    while not completed_at:  # the future wakes wait() before it runs its callbacks
        time.sleep(0)
    done = completed_at[0]
    inflight = sum(1 for b in step_begins if b < done)
    return Window(step_seconds, inflight, done - pending.started, completed, wait_seconds)


def measure_overlap(
    comm: Any, args: argparse.Namespace, syncs: dict[str, CrossNodeSum], flat: torch.Tensor
) -> list[Row]:
    """Rows ``compute`` and ``overlap`` (per dtype and poll interval)."""
    nodes, numel = comm.Get_size(), args.numel
    compute = Compute(args.step_mm) if args.step_mm > 0 else Compute.calibrated(comm, args.step_ms)
    log.info(
        "compute step: %d products of %dx%d float32 matrices",
        compute.count,
        MATRIX_SIDE,
        MATRIX_SIDE,
    )
    configs = [(name, poll) for name in syncs for poll in args.poll_intervals]
    baseline: list[float] = []
    windows: dict[tuple[str, float], list[Window]] = {config: [] for config in configs}
    for index in range(args.repeats + 1):
        alone = run_window(comm, compute, args.steps)
        for name, poll in configs:
            syncs[name].poll_interval = poll
            window = run_window(comm, compute, args.steps, syncs[name], flat)
            if index > 0:
                windows[name, poll].append(window)
        if index > 0:
            baseline.append(alone.mean_step)
    rows = [
        Row(
            "compute",
            "",
            None,
            numel,
            nodes,
            args.repeats,
            slowest_median(comm, baseline),
            ratio=1.0,
        )
    ]
    for name, poll in configs:
        runs = windows[name, poll]
        ratios = [w.mean_step / b for w, b in zip(runs, baseline)]
        inflight = [w.mean_inflight_step / b for w, b in zip(runs, baseline)]
        completed = comm.allreduce(sum(w.completed_before_wait for w in runs))
        rows.append(
            Row(
                "overlap",
                name,
                poll,
                numel,
                nodes,
                args.repeats,
                seconds=slowest_median(comm, [w.mean_step for w in runs]),
                ratio=slowest_median(comm, ratios),
                inflight_ratio=slowest_median(comm, inflight),
                sync_seconds=slowest_median(comm, [w.sync_seconds for w in runs]),
                wait_seconds=slowest_median(comm, [w.wait_seconds for w in runs]),
                completed_before_wait=completed / (len(runs) * comm.Get_size()),
            )
        )
    return rows


def _cell(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value)


def print_table(rows: Sequence[Row]) -> None:
    header = (
        "measure",
        "wire",
        "poll s",
        "ms",
        "GB/s",
        "ratio",
        "inflight",
        "sync ms",
        "wait ms",
        "done",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.measure,
                row.wire_dtype or "-",
                "-" if row.poll_interval is None else f"{row.poll_interval:g}",
                _cell(row.seconds, 1e3, 2),
                _cell(row.gbytes_per_second, digits=2),
                _cell(row.ratio, digits=2),
                _cell(row.inflight_ratio, digits=2),
                _cell(row.sync_seconds, 1e3, 1),
                _cell(row.wait_seconds, 1e3, 2),
                _cell(row.completed_before_wait, digits=2),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for number, line in enumerate(lines):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        if number == 0:
            print("  ".join("-" * width for width in widths))


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(row.csv_values() for row in rows)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.wire_dtype for r in rows if r.wire_dtype))
    polls = sorted({r.poll_interval for r in rows if r.measure == "overlap"})

    def value(measure: str, dtype: str, poll: float | None, field: str) -> float:
        for r in rows:
            if (r.measure, r.wire_dtype, r.poll_interval) == (measure, dtype, poll):
                return getattr(r, field)
        return math.nan

    def bars(axis: Any, series: list[tuple[str, list[float]]]) -> None:
        width = 0.8 / len(series)
        for offset, (label, heights) in enumerate(series):
            xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(dtypes))]
            drawn = axis.bar(xs, heights, width, label=label)
            axis.bar_label(drawn, fmt="%.2f", fontsize=7)
        axis.set_xticks(range(len(dtypes)), dtypes)
        axis.legend(fontsize=7)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    sync = [
        (
            "raw MPI_Allreduce",
            [value("mpi_allreduce", d, None, "gbytes_per_second") for d in dtypes],
        )
    ]
    sync += [
        (
            f"CrossNodeSum poll={p:g} s",
            [value("sync_allreduce", d, p, "gbytes_per_second") for d in dtypes],
        )
        for p in polls
    ]
    bars(axes[0], sync)
    axes[0].set_title("blocking cross-node sum")
    axes[0].set_ylabel("GB/s of wire buffer")
    bars(
        axes[1],
        [
            (
                "op.Reduce_local",
                [value("reduce_local", d, None, "gbytes_per_second") for d in dtypes],
            ),
            ("torch add_", [value("torch_add", d, None, "gbytes_per_second") for d in dtypes]),
        ],
    )
    axes[1].set_title("reduction op alone (1 rank)")
    axes[1].set_ylabel("GB/s of one input buffer")
    axes[2].axhline(1.10, color="black", linestyle="--", linewidth=1, label="goal 1.10")
    bars(
        axes[2],
        [(f"poll={p:g} s", [value("overlap", d, p, "ratio") for d in dtypes]) for p in polls],
    )
    axes[2].set_title("compute step time, sync in flight / none")
    axes[2].set_ylabel("step-time ratio")
    axes[2].set_xlabel("wire dtype")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    configure_logging(world.Get_rank())
    torch.set_num_threads(1)
    topo = detect_topology(world)
    if topo.num_nodes < 2:
        raise SystemExit(
            f"comm_sync needs at least 2 nodes, found {topo.num_nodes} ({topo.describe()}); "
            "emulate them with DASO_RANKS_PER_NODE"
        )
    in_cross = topo.local_rank == 0
    cross = world.Split(0 if in_cross else MPI.UNDEFINED, key=topo.node_rank)
    if not in_cross:
        idle_barrier(world)
        return
    log.info(
        "%s; C_0 has %d ranks, numel %d, %d repeats; load average %.2f",
        topo.describe(),
        cross.Get_size(),
        args.numel,
        args.repeats,
        os.getloadavg()[0],
    )
    flat = torch.rand(args.numel, generator=torch.Generator().manual_seed(cross.Get_rank()))
    syncs = {name: CrossNodeSum(cross, args.numel, WIRE_DTYPES[name]) for name in args.wire_dtypes}
    try:
        rows = measure_sync(cross, args, syncs, flat)
        rows += measure_reduce_op(cross, args)
        rows += measure_overlap(cross, args, syncs, flat)
    finally:
        for sync in syncs.values():
            sync.close()
    if world.Get_rank() == 0:
        title = (
            f"{topo.num_nodes} nodes x {topo.ranks_per_node} ranks, C_0 of "
            f"{cross.Get_size()} ranks, numel {args.numel:,}, median of {args.repeats}"
        )
        print(title)
        print_table(rows)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out_dir / "comm_sync.csv")
        plot(rows, args.out_dir / "comm_sync.png", title)
        log.info(
            "wrote %s and %s; load average %.2f (other processes disturb the timings)",
            args.out_dir / "comm_sync.csv",
            args.out_dir / "comm_sync.png",
            os.getloadavg()[0],
        )
    idle_barrier(world)


if __name__ == "__main__":
    main()
