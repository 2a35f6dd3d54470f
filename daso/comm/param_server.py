"""A sharded parameter server over MPI point-to-point: the home of an asynchronous center variable.

Asynchronous EASGD and DOWNPOUR (Zhang, Choromanska, LeCun, "Deep learning with Elastic
Averaging SGD", NIPS 2015, arXiv 1412.6651, Algorithm 1 and section 6) keep the center variable
``x~`` on a parameter server that workers talk to on their own clocks. Here the center (a flat
float32 vector ``[P]``) is cut into ``p`` contiguous shards (:func:`~daso.comm.shard_bounds`),
one per worker; shard ``s`` lives on a :class:`ParameterServer` thread beside worker ``s`` (rank
``s`` of the communicator, one rank per node), so the servers' link load is spread like the
workers'. A worker's :class:`ParameterClient` talks to all ``p`` servers at once.

Protocol (requests on one communicator, replies on a duplicate, so a server thread never
takes a reply meant for the worker of its own rank). One request per server at a time per
worker; each server applies its requests one after the other, so every update of a shard is
atomic:

=================  =====================  =================================================
tag                request payload        server action, reply
=================  =====================  =================================================
``ELASTIC`` (1)    ``x`` (worker's shard)  reply ``x~``, then ``x~ <- x~ + alpha (x - x~)``
``ADD`` (2)        ``delta``               ``x~ <- x~ + delta``, then reply ``x~``
``PULL`` (3)       none                    reply ``x~``
``DONE`` (4)       none                    no reply; the server stops once all ``p`` said so
=================  =====================  =================================================

Every wait polls a non-blocking request (``MPI_Test`` with a sleep backing off from 50 us to
1 ms, so an idle server leaves the cores to compute) and fails with
:class:`~daso.errors.CommTimeoutError` naming the peer rank(s) and the operation after the
timeout. The server waits for its next request without a limit while workers compute (a slow
worker is allowed), but its shutdown waits at most the timeout for the missing ``DONE``\\ s.
Needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from mpi4py import MPI

from daso.comm.flat import shard_bounds
from daso.errors import CommTimeoutError

log = logging.getLogger(__name__)

#: Longest sleep, in seconds, between two ``MPI_Test`` calls of a waiting thread.
MAX_POLL_SECONDS = 1e-3


class Op(enum.IntEnum):
    """Request kinds (the MPI tag of a request)."""

    ELASTIC = 1
    ADD = 2
    PULL = 3
    DONE = 4


def wait_all(
    requests: Sequence[Any], timeout: float, what: str, peers: Sequence[str] = ()
) -> float:
    """Complete ``requests`` (mpi4py requests), polling, within ``timeout`` seconds.

    Args:
        requests: the requests; all complete on success.
        timeout: seconds before giving up.
        what: the operation, for the error message.
        peers: the peer of each request (same order, e.g. from :func:`rank_names`), named in
            the error.

    Returns:
        Seconds waited.

    Raises:
        CommTimeoutError: not all completed in time; names the peers still pending. Pending
            receives are cancelled (pending sends cannot be, MPI does not support it).
    """
    begin = time.perf_counter()
    pending = list(range(len(requests)))
    pause = 5e-5
    while pending:
        pending = [i for i in pending if not requests[i].Test()]
        if not pending:
            break
        if time.perf_counter() - begin > timeout:
            late = sorted({peers[i] for i in pending}) if peers else []
            for i in pending:
                try:
                    requests[i].Cancel()
                except MPI.Exception:
                    pass
            raise CommTimeoutError(
                f"parameter server: {what} did not complete within {timeout:g} s; no answer "
                f"from {late} (peer died or hangs)"
            )
        time.sleep(pause)
        pause = min(2 * pause, MAX_POLL_SECONDS)
    return time.perf_counter() - begin


def as_mpi(tensor: torch.Tensor) -> list[Any]:
    """``[buffer, MPI.FLOAT]`` of a contiguous float32 CPU tensor."""
    return [tensor.numpy(), MPI.FLOAT]


class ParameterServer:
    """Serves shard ``rank`` of the center variable ``x~`` on a thread, until all workers are done.

    Args:
        requests: communicator workers send requests on (one rank per worker; this rank
            serves shard ``requests.Get_rank()``).
        replies: a duplicate of ``requests`` for the replies.
        center: float32 ``[n]`` CPU tensor, this shard's initial center; updated in place.
        moving_rate: alpha of the ``ELASTIC`` rule (paper, Algorithm 1 step b).
        timeout: seconds a reply send, a payload receive or the final ``DONE`` wait may take.
        remote: for each worker rank, whether it is on another node (its bytes are counted);
            default: every rank but this one.

    Attributes:
        applied: per worker rank, the ``ELASTIC``/``ADD`` requests applied (pushes absorbed).
        bytes_sent: reply bytes sent to workers on other nodes.
        error: the exception that stopped the thread, or ``None``.
        lock: held while the center changes; take it to read a consistent :attr:`center`.
    """

    def __init__(
        self,
        requests: Any,
        replies: Any,
        center: torch.Tensor,
        moving_rate: float,
        timeout: float,
        remote: Sequence[bool] | None = None,
    ) -> None:
        self.requests, self.replies = requests, replies
        self.center = center
        self.alpha = moving_rate
        self.timeout = timeout
        self.workers = requests.Get_size()
        self.remote = list(remote) if remote is not None else remote_flags(requests)
        self.applied = [0] * self.workers
        self.names = rank_names(requests)
        self.bytes_sent = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self._incoming = torch.empty_like(center)
        self._outgoing = torch.empty_like(center)
        self._done: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="daso-param-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        status = MPI.Status()
        pause = 5e-5
        try:
            while len(self._done) < self.workers and not self._stop.is_set():
                message = self.requests.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
                if message is None:
                    time.sleep(pause)
                    pause = min(2 * pause, MAX_POLL_SECONDS)
                    continue
                pause = 5e-5
                self._handle(message, status.Get_source(), Op(status.Get_tag()))
        except BaseException as err:  # reported to the worker thread by check()
            self.error = err
            log.error("parameter server stopped: %s", err)

    def _handle(self, message: Any, source: int, op: Op) -> None:
        """Receive one request from worker ``source``, apply it, reply."""
        buffer = as_mpi(self._incoming) if op in (Op.ELASTIC, Op.ADD) else [None, MPI.BYTE]
        wait_all([message.Irecv(buffer)], self.timeout, f"{op.name} receive", [self.names[source]])
        if op == Op.DONE:
            self._done.add(source)
            return
        with self.lock:
            if op == Op.ELASTIC:  # reply x~_t; x~_{t+1} = x~_t + alpha (x - x~_t)
                self._outgoing.copy_(self.center)
                self.center.add_(self._incoming.sub_(self.center), alpha=self.alpha)
            elif op == Op.ADD:  # x~ <- x~ + delta; reply the new x~
                self.center.add_(self._incoming)
                self._outgoing.copy_(self.center)
            else:
                self._outgoing.copy_(self.center)
            if op != Op.PULL:
                self.applied[source] += 1
        request = self.replies.Isend(as_mpi(self._outgoing), dest=source, tag=int(op))
        wait_all([request], self.timeout, f"{op.name} reply", [self.names[source]])
        if self.remote[source]:
            self.bytes_sent += self._outgoing.numel() * 4

    def check(self) -> None:
        """Re-raise, on the caller's thread, the error that stopped the server (if any)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Wait (at most ``timeout`` seconds) until every worker has sent ``DONE``, then stop.

        Raises:
            CommTimeoutError: some workers never said they were done (named by rank).
        """
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            missing = [self.names[r] for r in sorted(set(range(self.workers)) - self._done)]
            raise CommTimeoutError(
                f"parameter server: no DONE from worker(s) {missing} within "
                f"{self.timeout:g} s of shutdown (they died, hang, or never closed)"
            )
        self.check()


class ParameterClient:
    """A worker's side of the sharded center: one request to each of the ``p`` servers.

    Args:
        requests: the communicator of :class:`ParameterServer` (rank ``s`` serves shard ``s``).
        replies: its duplicate for replies.
        numel: ``P``, the length of the whole center.
        timeout: seconds to wait for all replies.
        remote: for each server rank, whether it is on another node (its bytes are counted);
            default: every rank but this one.

    Attributes:
        bounds: ``[start, stop)`` of every shard.
        bytes_sent: request bytes sent to servers on other nodes.
        wait_seconds: seconds spent waiting for replies.
    """

    def __init__(
        self,
        requests: Any,
        replies: Any,
        numel: int,
        timeout: float,
        remote: Sequence[bool] | None = None,
    ) -> None:
        self.requests, self.replies = requests, replies
        self.servers = requests.Get_size()
        self.bounds = shard_bounds(numel, self.servers)
        self.timeout = timeout
        self.remote = list(remote) if remote is not None else remote_flags(requests)
        self.bytes_sent = 0
        self.wait_seconds = 0.0
        self.reply = torch.empty(numel, dtype=torch.float32)
        self.names = rank_names(requests)

    def exchange(self, op: Op, payload: torch.Tensor | None = None) -> torch.Tensor:
        """Send ``payload`` (float32 ``[P]``, CPU; ``None`` for ``PULL``/``DONE``) to every
        server, shard ``s`` to server ``s``, and wait for the replies.

        Returns:
            float32 ``[P]`` (a buffer reused by the next call): the servers' replies, shard by
            shard (see the module's protocol table); not written for ``DONE``.

        Raises:
            CommTimeoutError: a server did not answer within ``timeout`` seconds.
        """
        receives, sends = [], []
        for server, (start, stop) in enumerate(self.bounds):
            if op != Op.DONE:
                receives.append(
                    self.replies.Irecv(as_mpi(self.reply[start:stop]), source=server, tag=int(op))
                )
            if payload is None:
                buffer = [None, MPI.BYTE]
            else:
                buffer = as_mpi(payload[start:stop])
                if self.remote[server]:
                    self.bytes_sent += (stop - start) * 4
            sends.append(self.requests.Isend(buffer, dest=server, tag=int(op)))
        peers = self.names + self.names[: len(receives)]
        self.wait_seconds += wait_all(sends + receives, self.timeout, f"{op.name} request", peers)
        return self.reply


def rank_names(comm: Any) -> list[str]:
    """For each rank ``r`` of ``comm``: ``"rank r (world rank g)"``, for error messages."""
    world = MPI.Group.Translate_ranks(
        comm.Get_group(), list(range(comm.Get_size())), MPI.COMM_WORLD.Get_group()
    )
    return [f"rank {r} (world rank {g})" for r, g in enumerate(world)]


def remote_flags(comm: Any) -> list[bool]:
    """For each rank of ``comm`` (one per node), whether it is another rank than this one."""
    me = comm.Get_rank()
    return [rank != me for rank in range(comm.Get_size())]
