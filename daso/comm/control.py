"""Control traffic beside training: a per-batch stop vote, and heartbeats that name dead ranks.

Both are tiny and off the critical path. The stop vote is, per batch, two non-blocking one-int
MAX allreduces, one inside each node and one among the node leaders, each read a batch later:
every rank learns the same answer at the same batch without waiting (a pre-emption signal that
reaches only some ranks still stops all of them at one batch), and only one rank per node talks
across nodes. Heartbeats are counters in the rendezvous store that a daemon thread on every
rank bumps once a second; after a failure, the ranks whose counters stand still are the ones
that stopped answering. Strategies whose nodes run on their own clocks use :class:`NodeStopVote`
instead of the per-batch allreduce, so that no node ever waits for another during an epoch.

The rendezvous store has no authentication and any process on a host that reaches its port can
read and write it. So every value daso's control plane writes there (``daso/stop``,
``daso/lost``, ``daso/done/<rank>``) carries an HMAC-SHA256 over its key and payload with a
per-run secret: 32 random bytes that rank 0 draws and hands to the other ranks over MPI (or,
under torchrun on one node, over a Gloo broadcast), never through the store. A value that fails
the check is ignored and logged once: a process outside the job cannot stop the run, declare
ranks lost or hide a lost one. What it can still do is disturb the rendezvous (torch's own keys
and the heartbeat counters are plain): a denial of service, never control.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Store key a rank posts when asked to stop (see :class:`NodeStopVote`).
STOP_KEY = "daso/stop"
#: Store key where rank 0 posts the ranks whose heartbeats stopped (JSON list).
LOST_KEY = "daso/lost"
#: ``<DONE_KEY>/<rank>``: that rank closed its heartbeat on purpose.
DONE_KEY = "daso/done"


#: Bytes of the per-run secret that signs control values.
SECRET_BYTES = 32


def share_secret(groups: Any) -> bytes:
    """Collective: a secret drawn by rank 0, the same on every rank of the job, sent over MPI
    (``groups.mpi_world``) or, without an MPI world (torchrun, one node), a Gloo broadcast
    inside the node; never through the rendezvous store, which anyone on the host can read.

    Args:
        groups: the run's :class:`~daso.topology.ProcessGroups`.

    Returns:
        :data:`SECRET_BYTES` random bytes.
    """
    topo = groups.topology
    drawn = secrets.token_bytes(SECRET_BYTES) if topo.rank == 0 else bytes(SECRET_BYTES)
    if topo.world_size == 1:
        return drawn
    if groups.mpi_world is not None:
        return groups.mpi_world.bcast(drawn, root=0)
    tensor = torch.frombuffer(bytearray(drawn), dtype=torch.uint8).clone()
    group = dist.new_group(topo.ranks_on_node(0), backend="gloo")
    dist.broadcast(tensor, src=0, group=group)
    dist.destroy_process_group(group)
    return bytes(tensor.tolist())


def sign(secret: bytes, key: str, payload: str) -> str:
    """``payload`` as stored under ``key``: ``<HMAC-SHA256 hex of key and payload>:<payload>``."""
    tag = hmac.new(secret, f"{key}\0{payload}".encode(), hashlib.sha256).hexdigest()
    return f"{tag}:{payload}"


def verify(secret: bytes, key: str, value: bytes | str) -> str | None:
    """The payload of a value :func:`sign` wrote under ``key`` with ``secret``; ``None`` for
    any other value (unsigned, signed for another key or with another secret, not text)."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        return None
    tag, sep, payload = text.partition(":")
    if not sep:
        return None
    expected = sign(secret, key, payload).partition(":")[0]
    return payload if hmac.compare_digest(tag, expected) else None


def _max(values: list[int], group: Any) -> list[int]:
    """Element-wise maximum of small ints over ``group`` (blocking; ``None``: just this rank)."""
    tensor = torch.tensor(values, dtype=torch.int32)
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def node_then_leaders_max(flag: int, node_group: Any, leader_group: Any) -> int:
    """Blocking maximum of ``flag`` over all ranks, in three steps so that only one rank per
    node talks across nodes: inside the node, among the node leaders, inside the node again."""
    (flag,) = _max([flag], node_group)
    if leader_group is not None:
        (flag,) = _max([flag], leader_group)
    return _max([flag], node_group)[0]


class _Rounds:
    """Non-blocking one-round-at-a-time MAX allreduces of small int vectors."""

    def __init__(self, timeout: float) -> None:
        self.timeout = datetime.timedelta(seconds=timeout)

    @staticmethod
    def _start(values: list[int], group: Any) -> tuple[Any, torch.Tensor]:
        tensor = torch.tensor(values, dtype=torch.int32)
        if group is None:
            return None, tensor
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group, async_op=True)
        return work, tensor

    def _wait(self, pending: tuple[Any, torch.Tensor] | None, size: int) -> list[int]:
        if pending is None:
            return [0] * size
        work, tensor = pending
        if work is not None:
            work.wait(self.timeout)
        return tensor.tolist()


class StopVote(_Rounds):
    """A running vote of whether to stop, one round per call of :meth:`exchange`, for strategies
    whose ranks move in lockstep: it never blocks on a slow peer, and every rank gets the same
    answer at the same batch.

    Each call starts two non-blocking one-int MAX allreduces and reads the ones the previous
    call started (done by then): one inside the node, carrying the ranks' flags and the
    leader's latest world result, and one among the node leaders (local rank 0), carrying the
    node's flag. A flag raised at batch ``b`` reaches every rank's answer at batch ``b + 3``;
    only the leaders talk across nodes.

    Args:
        node_group: a Gloo group of this node's ranks, or ``None`` for a node of one rank.
        leader_group: a Gloo group of the node leaders when this rank is one and there are
            several nodes, else ``None``.
        leader: whether this rank is its node's leader (local rank 0).
        timeout: seconds to wait for a round before the error (a rank stopped answering).

    The vote is a collective: every rank must call :meth:`exchange` the same number of times.
    """

    def __init__(self, node_group: Any, leader_group: Any, leader: bool, timeout: float) -> None:
        super().__init__(timeout)
        self.node_group, self.leader_group, self.leader = node_group, leader_group, leader
        self._node: tuple[Any, torch.Tensor] | None = None
        self._leaders: tuple[Any, torch.Tensor] | None = None

    def exchange(self, flag: int) -> int:
        """Read the rounds started by the previous call and start new ones with ``flag``.

        Args:
            flag: this rank's vote, an int >= 0 (0 = go on).

        Returns:
            The world's answer, equal on every rank (0 until a flag has gone round).

        Raises:
            torch.distributed.DistError: a rank died or did not vote within ``timeout``.
        """
        world = self._wait(self._leaders, 1)[0] if self.leader else 0
        node_flag, answer = self._wait(self._node, 2)
        self._node = self._start([flag, world], self.node_group)
        if self.leader:
            self._leaders = self._start([node_flag], self.leader_group)
        return answer

    def finish(self, flag: int = 0) -> int:
        """Blocking end of the vote (an epoch's end): read the rounds in flight and agree on
        one answer over all ranks, counting every flag raised so far and this rank's
        ``flag`` (an int >= 0; the answer is the largest flag of any rank)."""
        world = self._wait(self._leaders, 1)[0] if self.leader else 0
        node_flag, answer = self._wait(self._node, 2)
        self._node = self._leaders = None
        return node_then_leaders_max(
            max(world, node_flag, answer, flag), self.node_group, self.leader_group
        )


class NodeStopVote(_Rounds):
    """The stop vote of strategies whose nodes run on their own clocks (``Strategy.lockstep``
    false): no per-batch collective spans nodes, so a fast node never waits for a slow one.

    A rank that receives a signal posts ``daso/stop`` in the rendezvous store through its
    :class:`Heartbeat`, whose thread also looks for that key on every beat; the node's ranks
    agree on what they have seen through a non-blocking MAX allreduce inside the node, read a
    batch later, so a node stops at one batch; at the epoch's end :meth:`finish` is a blocking
    vote over all ranks, so every node stops at the same epoch end.

    Args:
        node_group, leader_group: as for :class:`StopVote`.
        heartbeat: this rank's :class:`Heartbeat` (carries the flag between nodes).
        timeout: seconds to wait for a round before the error.
    """

    def __init__(
        self, node_group: Any, leader_group: Any, heartbeat: Heartbeat, timeout: float
    ) -> None:
        super().__init__(timeout)
        self.node_group, self.leader_group = node_group, leader_group
        self.heartbeat = heartbeat
        self._requested = False
        self._node: tuple[Any, torch.Tensor] | None = None

    def exchange(self, flag: int) -> int:
        """This node's decision now: nonzero if any rank anywhere asked to stop (as far as the
        store had told this node's ranks a batch ago), equal on the node's ranks."""
        if flag:
            self._requested = True
            self.heartbeat.request_stop()
        answer = self._wait(self._node, 1)[0]
        seen = 1 if flag or self.heartbeat.stop_seen() else 0
        self._node = self._start([seen], self.node_group)
        return answer

    def finish(self, flag: int = 0) -> int:
        """Blocking vote of all ranks (an epoch's end): nonzero to stop, equal everywhere (the
        largest of 1 for a stop request seen anywhere and every rank's ``flag``)."""
        pending = self._wait(self._node, 1)[0]
        self._node = None
        seen = 1 if pending or self._requested or self.heartbeat.stop_seen() else 0
        return node_then_leaders_max(max(seen, flag), self.node_group, self.leader_group)


class Heartbeat:
    """A daemon thread bumping ``daso/heartbeat/<rank>`` in the rendezvous store every
    ``interval`` seconds, and the probe that reads everyone's counters. The same thread posts
    and watches the ``daso/stop`` key for :class:`NodeStopVote`.

    Args:
        host, port: address of the rendezvous ``TCPStore`` (hosted by rank 0).
        rank, world_size: this rank and the number of ranks.
        interval: seconds between beats.
        prefix: the job's key namespace in the store (the keys above lie below it).
        secret: the run's secret (:func:`share_secret`): control values are signed with it
            and values that fail the check are ignored.
        lost_after: seconds without a beat after which rank 0's thread, which watches every
            counter, declares a rank lost: it posts the list under ``daso/lost`` and every
            rank's thread logs it, whatever the main thread is blocked in (a launcher that
            does not kill the job after one rank dies leaves the others waiting, and their
            first error may be a bare "connection closed").

    Attributes:
        lost: the ranks declared lost so far (empty while all beat).
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        interval: float = 1.0,
        prefix: str = "",
        lost_after: float = 10.0,
        secret: bytes = b"",
    ) -> None:
        self.address = (host, port)
        self.prefix = prefix
        self.secret = secret
        self._forged: set[str] = set()  # keys whose unverifiable values were logged
        self.lost_after = lost_after
        self.lost: list[int] = []
        self._seen: dict[int, tuple[int, float]] = {}  # rank 0: counter, when it last moved
        self.rank, self.world_size = rank, world_size
        self.interval = interval
        self._stop = threading.Event()
        self._stop_requested = threading.Event()
        self._stop_seen = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="daso-heartbeat", daemon=True)
        self._thread.start()

    def _client(self, timeout: float) -> Any:
        store = dist.TCPStore(
            self.address[0],
            self.address[1],
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
        )
        return dist.PrefixStore(self.prefix, store) if self.prefix else store

    def _beat(self) -> None:
        try:
            store = self._client(30.0)
            key = f"daso/heartbeat/{self.rank}"
            while not self._stop.is_set():
                store.add(key, 1)
                if self._stop_requested.is_set() and not self._stop_seen.is_set():
                    store.set(STOP_KEY, sign(self.secret, STOP_KEY, str(self.rank)))
                if self._read(store, STOP_KEY) is not None:
                    self._stop_seen.set()
                if self.rank == 0:
                    self._watch(store)
                lost = self._read(store, LOST_KEY)
                if lost is not None:
                    self._report(json.loads(lost))
                self._stop.wait(self.interval)
        except Exception as err:  # noqa: BLE001 - the store's host is gone; nothing to beat to
            if not self._stop.is_set() and self.rank != 0:
                log.error(
                    "rank %d: rank 0 stopped answering (its rendezvous store is gone: %s)",
                    self.rank,
                    err,
                )
            log.debug("heartbeat stopped: %s", err)

    def _read(self, store: Any, key: str) -> str | None:
        """The verified payload under ``key``, or ``None`` when there is none or it fails the
        check (logged once per key: a process outside the job wrote it)."""
        if not store.check([key]):
            return None
        payload = verify(self.secret, key, store.get(key))
        if payload is None and key not in self._forged:
            self._forged.add(key)
            log.warning(
                "rank %d: ignoring a value under %s in the rendezvous store that does not carry "
                "this run's signature (written by a process outside the job)",
                self.rank,
                key,
            )
        return payload

    def _watch(self, store: Any) -> None:
        """Rank 0: post the ranks whose counters stood still for ``lost_after`` seconds (and
        that have not said they are done)."""
        now = time.monotonic()
        lost = []
        for r in range(1, self.world_size):
            count = store.add(f"daso/heartbeat/{r}", 0)
            last = self._seen.get(r)
            if last is None or count != last[0]:
                self._seen[r] = (count, now)
            elif now - last[1] > self.lost_after and not self._done(store, r):
                lost.append(r)
        if lost and lost != self.lost:
            store.set(LOST_KEY, sign(self.secret, LOST_KEY, json.dumps(lost)))

    def _done(self, store: Any, rank: int) -> bool:
        """Whether ``rank`` said it closed its heartbeat on purpose (a verified value)."""
        return self._read(store, f"{DONE_KEY}/{rank}") is not None

    def _report(self, lost: list[int]) -> None:
        if lost != self.lost:
            self.lost = lost
            log.error(
                "rank %d: rank(s) %s stopped answering (no heartbeat for %.0f s): dead or "
                "stuck; the job cannot go on",
                self.rank,
                lost,
                self.lost_after,
            )

    def report_lost(self, ranks: list[int]) -> None:
        """Post ``ranks`` as lost (a rank that found them silent after a failed collective), so
        every rank's thread names them before the job is aborted (this rank names them in
        its own error)."""
        self.lost = sorted(ranks)
        try:
            self._client(2.0).set(LOST_KEY, sign(self.secret, LOST_KEY, json.dumps(self.lost)))
        except Exception:  # noqa: BLE001 - the store is gone: rank 0 is among the lost
            pass

    def request_stop(self) -> None:
        """Post ``daso/stop`` for every rank to see (on the next beat)."""
        self._stop_requested.set()

    def stop_seen(self) -> bool:
        """Whether ``daso/stop`` was in the store at the last beat."""
        return self._stop_seen.is_set()

    def silent_ranks(self, window: float | None = None) -> list[int] | None:
        """Ranks whose heartbeat did not advance over ``window`` seconds (default three beats).

        Returns:
            The silent ranks, sorted, leaving out those that posted ``daso/done/<rank>`` (they
            stopped on purpose); ``None`` if the store itself did not answer (its host, rank
            0, is gone).
        """
        window = 3 * self.interval if window is None else window
        try:
            store = self._client(max(window, 5.0))
            keys = [f"daso/heartbeat/{r}" for r in range(self.world_size)]
            before = [store.add(k, 0) for k in keys]
            time.sleep(window)
            after = [store.add(k, 0) for k in keys]
            still = [r for r, (a, b) in enumerate(zip(before, after)) if b <= a]
            # a rank that stopped beating after saying so (a survivor that reported the same
            # failure and is exiting) did not die: only the others are lost
            return [r for r in still if not self._done(store, r)]
        except Exception:  # noqa: BLE001 - unreachable store
            return None

    def close(self) -> None:
        """Stop beating, saying so first (so rank 0 does not count this rank as lost)."""
        key = f"{DONE_KEY}/{self.rank}"
        try:
            self._client(2.0).set(key, sign(self.secret, key, "1"))
        except Exception:  # noqa: BLE001 - the store is gone already
            pass
        self._stop.set()
        self._thread.join(timeout=5 * self.interval)


class ControlPlane:
    """The control traffic of a run: heartbeats and the stop vote, over Gloo groups of their
    own (one per node, one of the node leaders), so they never queue behind training traffic.

    A per-step :class:`StopVote` for strategies in lockstep; a :class:`NodeStopVote` through
    the rendezvous store for those whose nodes run on their own clocks (nodes never wait for
    each other during an epoch). On one process there is nothing to vote with.

    Args:
        groups: the run's :class:`~daso.topology.ProcessGroups`.
        lockstep: the strategy's :attr:`~daso.strategies.Strategy.lockstep`.
        timeout: longest wait for a vote round, seconds.

    Attributes:
        heartbeat: the :class:`Heartbeat` (``None`` on one process or without a store).
        stop_vote: the :class:`StopVote` or :class:`NodeStopVote`.
        lockstep: whether the vote is the same on every rank after every step.
    """

    def __init__(self, groups: Any, lockstep: bool, timeout: float) -> None:
        topo = groups.topology
        self.groups: list[Any] = []
        self.heartbeat: Heartbeat | None = None
        self.lockstep = lockstep
        if topo.world_size == 1:
            self.stop_vote: StopVote | NodeStopVote = StopVote(None, None, True, timeout)
            return
        delta = datetime.timedelta(seconds=timeout)
        nodes = [topo.ranks_on_node(n) for n in range(topo.num_nodes)]
        node, _ = dist.new_subgroups_by_enumeration(nodes, timeout=delta, backend="gloo")
        leaders = dist.new_group([r[0] for r in nodes], timeout=delta, backend="gloo")
        self.groups = [node, leaders] if topo.local_rank == 0 else [node]
        node = node if topo.local_world_size > 1 else None
        leaders = leaders if topo.local_rank == 0 and topo.num_nodes > 1 else None
        address = groups.store_address
        self.heartbeat = None
        if address:
            secret = share_secret(groups)
            self.heartbeat = Heartbeat(
                *address, topo.rank, topo.world_size, prefix=groups.store_prefix, secret=secret
            )
        if lockstep or self.heartbeat is None:
            self.lockstep = True
            self.stop_vote = StopVote(node, leaders, topo.local_rank == 0, timeout)
        else:
            self.stop_vote = NodeStopVote(node, leaders, self.heartbeat, timeout)

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose heartbeat stopped (``None`` without heartbeats, or when rank 0's store
        is gone), posted for every rank to name (see :meth:`Heartbeat.report_lost`)."""
        if self.heartbeat is None:
            return None
        silent = self.heartbeat.silent_ranks()
        if silent is not None and not silent and self.heartbeat.lost:
            silent = list(self.heartbeat.lost)
        if silent:
            self.heartbeat.report_lost(silent)
        return silent

    def lost_ranks(self) -> list[int]:
        """The ranks rank 0's watch has declared lost (empty without heartbeats)."""
        return list(self.heartbeat.lost) if self.heartbeat is not None else []

    def close(self, clean: bool = True) -> None:
        """Stop the heartbeat; with ``clean``, finish the vote and destroy the groups (this
        waits for the other ranks: skip it after a failure)."""
        if self.heartbeat is not None:
            self.heartbeat.close()
        if not clean:
            return
        self.stop_vote.finish()
        for group in self.groups:
            dist.destroy_process_group(group)
