"""Cross-node sums over MPI: blocking and non-blocking, with 16-bit wire formats.

One :class:`CrossNodeSum` per rank of a cross-node communicator ``C_i``. It owns a wire
buffer in the wire dtype (bfloat16 by default, as in the DASO paper section 3.2; float16 or
float32 by config), downcasts the flat parameters into it, and sums it over the nodes. The
buffer is host memory (pinned on CUDA, filled on a side stream), or GPU memory handed to a
CUDA-aware MPI (:mod:`daso.comm.cuda_aware`).

MPI libraries do not progress a non-blocking collective over TCP on their own, so every
collective runs on a dedicated communication thread (``MPI_THREAD_MULTIPLE``): the main thread
starts it and goes on computing; the thread drives it to completion, either inside MPI's own
blocking call or, with ``poll_interval > 0``, by ``MPI_Test`` followed by a sleep of that many
seconds, which leaves the core to compute on oversubscribed machines.

16-bit sums use a user-defined ``MPI_Op`` whose body is one vectorised torch add over the whole
chunk, never a per-element Python loop (MPI libraries have no bfloat16 sum, and MPICH's float16
sum is far slower than torch's).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from mpi4py import MPI

from daso.comm.cuda_aware import cross_node_path
from daso.errors import CommTimeoutError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _sum_into(dtype: torch.dtype, inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    """Body of the user-defined 16-bit MPI_SUM: ``inoutbuf += inbuf`` as one torch add."""
    if len(memoryview(inoutbuf)) == 0:
        return
    torch.frombuffer(inoutbuf, dtype=dtype).add_(torch.frombuffer(inbuf, dtype=dtype))


@functools.cache
def mpi_sum(dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """MPI datatype and sum op for a torch wire dtype.

    Returns:
        ``(datatype, op, native)``: for float32 ``MPI.FLOAT`` with ``MPI.SUM`` (native); for
        bfloat16 and float16 ``MPI.UINT16_T`` with a user-defined commutative op whose body is
        one vectorised torch add. MPICH's own ``MPIX_C_FLOAT16`` sum was measured about 150x
        slower than the torch add (``benchmarks/comm_sync.py``), and it has no bfloat16 at all.
    """
    if dtype == torch.float32:
        return MPI.FLOAT, MPI.SUM, True
    op = MPI.Op.Create(functools.partial(_sum_into, dtype), commute=True)
    return MPI.UINT16_T, op, False


def mpi_buffer(tensor: torch.Tensor) -> list[Any]:
    """``[buffer, datatype]`` for handing a contiguous tensor (float32/bf16/fp16) to MPI: a
    CPU tensor as a NumPy array, a CUDA tensor as itself (mpi4py reads its device pointer
    through DLPack / the CUDA Array Interface; only for a CUDA-aware MPI)."""
    datatype, _, _ = mpi_sum(tensor.dtype)
    if tensor.element_size() == 2:
        tensor = tensor.view(torch.int16)
    return [tensor.numpy() if tensor.device.type == "cpu" else tensor, datatype]


@dataclasses.dataclass
class PendingSum:
    """A cross-node sum in flight.

    Attributes:
        future: completes when the wire buffer holds the sum over nodes.
        started: ``time.perf_counter()`` when it was started, in seconds.
        numel: number of elements being summed.
        tag: caller's label (e.g. the batch it was sent on).
    """

    future: Future
    started: float
    numel: int
    tag: Any = None

    def done(self) -> bool:
        """Whether the sum has completed (without waiting)."""
        return self.future.done()


class CrossNodeSum:
    """Sum a flat float32 vector over the ranks of a cross-node communicator.

    Args:
        comm: mpi4py communicator ``C_i`` (one rank per node).
        numel: capacity: the longest vector that will be summed (shorter ones use a prefix).
        wire_dtype: dtype sent over MPI (``torch.bfloat16``, ``torch.float16``, ``torch.float32``).
        device: device of the vectors passed to :meth:`start`; CUDA vectors are staged through
            pinned host memory with the copies on a side stream, or handed to a CUDA-aware
            MPI as device buffers (``cuda_aware_mpi``).
        timeout: seconds to wait for a sum before :class:`CommTimeoutError`.
        poll_interval: longest sleep, in seconds, of the communication thread between
            ``MPI_Test`` calls (the sleep starts at 50 us and doubles while nothing completes);
            0 drives the collective with MPI's blocking call. Device buffers always use the
            blocking call (CUDA-aware MPIs do not all take them in non-blocking collectives).
        cuda_aware_mpi: ``"auto"``, ``"on"`` or ``"off"``: whether CUDA vectors go to MPI as
            device buffers (:func:`daso.comm.cuda_aware.cross_node_path` decides; no effect on
            CPU).

    Attributes:
        path: the :class:`~daso.comm.cuda_aware.CrossNodePath` taken.
        bytes_sent: bytes of wire buffers this rank has handed to MPI (payload, not wire
            traffic, which depends on MPI's algorithm).
        wait_seconds: seconds the caller spent blocked in :meth:`wait`.
    """

    def __init__(
        self,
        comm: Any,
        numel: int,
        wire_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        timeout: float = 300.0,
        poll_interval: float = 0.0,
        cuda_aware_mpi: str = "auto",
    ) -> None:
        self.comm = comm
        self.device = torch.device(device)
        self.path = cross_node_path(cuda_aware_mpi, self.device, wire_dtype)
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.bytes_sent = 0
        self.wait_seconds = 0.0
        self.pending: PendingSum | None = None
        self.wire_dtype = wire_dtype
        self._op = mpi_sum(wire_dtype)[1]
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self.wire = torch.empty(0, dtype=wire_dtype)
        self._result = torch.empty(0, dtype=torch.float32, device=self.device)
        self.reserve(numel)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daso-mpi")

    @property
    def size(self) -> int:
        """Number of nodes in the communicator."""
        return self.comm.Get_size()

    def reserve(self, numel: int) -> None:
        """Grow the preallocated buffers to hold ``numel`` elements (no-op if they do)."""
        if numel <= self.wire.numel():
            return
        if self.pending is not None:
            raise RuntimeError("cannot grow the buffers while a sum is in flight")
        if self.path.device_buffers:
            self.wire = torch.zeros(numel, dtype=self.wire_dtype, device=self.device)
        else:
            pin = self._stream is not None
            self.wire = torch.zeros(numel, dtype=self.wire_dtype, pin_memory=pin)
        self._result = torch.empty(numel, dtype=torch.float32, device=self.device)

    def _allreduce(self, ready: Any, numel: int) -> None:
        """Runs on the communication thread: the collective, then (on CPU) the upcast."""
        if ready is not None:
            ready.synchronize()
        buffer = mpi_buffer(self.wire[:numel])
        if self.poll_interval <= 0 or self.path.device_buffers:
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=self._op)
        else:
            request = self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=self._op)
            pause = min(self.poll_interval, 5e-5)
            while not request.Test():
                time.sleep(pause)
                pause = min(2 * pause, self.poll_interval)
        if self._stream is None:
            self._result[:numel].copy_(self.wire[:numel])

    def start(self, flat: torch.Tensor, tag: Any = None) -> PendingSum:
        """Start summing ``flat`` (float32 ``[n]``, ``n <= numel``) over nodes; returns at once.

        ``flat`` is downcast into the wire buffer before this returns (on CUDA: on a side
        stream ordered after the current stream), so the caller may change it afterwards.

        Raises:
            RuntimeError: a previous sum is still pending (wait for it first).
        """
        if self.pending is not None:
            raise RuntimeError("a cross-node sum is already in flight; call wait() first")
        if flat.numel() > self.wire.numel():
            raise ValueError(
                f"vector of {flat.numel()} elements exceeds capacity {self.wire.numel()}; "
                "call reserve() first"
            )
        numel = flat.numel()
        wire = self.wire[:numel]
        ready = None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                wire.copy_(flat, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
        else:
            wire.copy_(flat)
        self.bytes_sent += numel * wire.element_size()
        future = self._executor.submit(self._allreduce, ready, numel)
        self.pending = PendingSum(future, time.perf_counter(), numel, tag)
        return self.pending

    def wait(self) -> torch.Tensor:
        """Block until the pending sum completes; return it as float32 ``[n]`` on ``device``.

        Raises:
            RuntimeError: nothing is pending.
            CommTimeoutError: the sum did not complete within ``timeout`` seconds (a peer node
                died or hangs); names the communicator's size and this rank's place in it.
        """
        if self.pending is None:
            raise RuntimeError("no cross-node sum is pending")
        pending, self.pending = self.pending, None
        begin = time.perf_counter()
        try:
            pending.future.result(timeout=self.timeout)
        except FutureTimeout:
            raise CommTimeoutError(
                f"cross-node MPI allreduce (started as {pending.tag!r}) did not complete within "
                f"{self.timeout:.0f} s: one of the {self.size} nodes of this cross-node group "
                f"(this rank is #{self.comm.Get_rank()} in it) stopped answering"
            ) from None
        finally:
            self.wait_seconds += time.perf_counter() - begin
        result = self._result[: pending.numel]
        if self._stream is not None:  # CUDA: upcast (from host or device) on the caller's stream
            result.copy_(self.wire[: pending.numel], non_blocking=True)
        return result

    def allreduce(self, flat: torch.Tensor, tag: Any = None) -> torch.Tensor:
        """Blocking sum of ``flat`` over nodes (float32 ``[numel]`` in, float32 out)."""
        self.start(flat, tag)
        return self.wait()

    def close(self) -> None:
        """Stop the communication thread (waits for a pending sum)."""
        self._executor.shutdown(wait=True)
