"""Control traffic beside training: a per-batch stop vote, and heartbeats that name dead ranks.

Both are tiny and off the critical path. The stop vote is one non-blocking MAX allreduce of a
one-element int32 CPU tensor per batch over its own Gloo group: the vote started after batch
``b`` is read after batch ``b + 1``, so every rank learns the same answer at the same batch
without waiting (a pre-emption signal that reaches only some ranks still stops all of them at
one batch). Heartbeats are counters in the rendezvous store that a daemon thread on every rank
bumps once a second; after a failure, the ranks whose counters stand still are the ones that
stopped answering. Strategies whose nodes run on their own clocks use :class:`NodeStopVote`
instead of the per-batch allreduce, so that no node ever waits for another during an epoch.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Store key a rank posts when asked to stop (see :class:`NodeStopVote`).
STOP_KEY = "daso/stop"


class StopVote:
    """A running vote, one round per call of :meth:`exchange`, of whether to stop.

    Args:
        group: a Gloo group of all ranks (e.g. ``dist.new_group(backend="gloo")``), or
            ``None`` for a single process.
        timeout: seconds to wait for a round before the error (a rank stopped answering).

    The vote is a collective: every rank must call :meth:`exchange` the same number of times.
    """

    def __init__(self, group: Any, timeout: float) -> None:
        self.group = group
        self.timeout = datetime.timedelta(seconds=timeout)
        self._tensor = torch.zeros(1, dtype=torch.int32)
        self._work: Any = None
        self._single = 0  # the round "in flight" of a single process

    def exchange(self, flag: int) -> int:
        """Finish the round started by the previous call and start one with ``flag``.

        Args:
            flag: this rank's vote, an int >= 0 (0 = go on).

        Returns:
            The maximum vote of the previous round over all ranks (0 on the first call).

        Raises:
            torch.distributed.DistError: a rank died or did not vote within ``timeout``.
        """
        result = self.finish()
        self._tensor.fill_(flag)
        if self.group is not None:
            self._work = dist.all_reduce(
                self._tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True
            )
        else:
            self._work = None
            self._single = flag
        return result

    def finish(self) -> int:
        """Wait for the round in flight (if any) and return its result; no new round."""
        if self._work is None:
            result, self._single = self._single, 0
            return result
        self._work.wait(self.timeout)
        self._work = None
        return int(self._tensor.item())


class NodeStopVote:
    """The stop vote of strategies whose nodes run on their own clocks (``Strategy.lockstep``
    false): no per-batch collective spans nodes, so a fast node never waits for a slow one.

    A rank that receives a signal posts ``daso/stop`` in the rendezvous store through its
    :class:`Heartbeat`, whose thread also looks for that key on every beat; each batch the
    node's ranks agree (a blocking one-int MAX allreduce inside the node) on whether any of them
    has seen it, so a node stops at one batch; at the epoch's end :meth:`finish` is a blocking
    vote over all ranks, so every node stops at the same epoch end.

    Args:
        node_group: a Gloo group of this node's ranks (``None``: a node of one rank).
        world_group: a Gloo group of all ranks.
        heartbeat: this rank's :class:`Heartbeat` (carries the flag between nodes).
        timeout: seconds to wait for a vote before the error.
    """

    def __init__(self, node_group: Any, world_group: Any, heartbeat: Heartbeat, timeout: float):
        self.node_group, self.world_group = node_group, world_group
        self.heartbeat = heartbeat
        self.timeout = datetime.timedelta(seconds=timeout)
        self._requested = False

    def _max(self, flag: int, group: Any) -> int:
        tensor = torch.tensor([flag], dtype=torch.int32)
        if group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        return int(tensor.item())

    def exchange(self, flag: int) -> int:
        """This node's decision now: nonzero if any rank anywhere asked to stop (as far as the
        store has told this node's ranks), equal on the node's ranks."""
        if flag:
            self._requested = True
            self.heartbeat.request_stop()
        return self._max(1 if flag or self.heartbeat.stop_seen() else 0, self.node_group)

    def finish(self) -> int:
        """Blocking vote of all ranks (an epoch's end): nonzero to stop, equal everywhere."""
        seen = self._requested or self.heartbeat.stop_seen()
        return self._max(1 if seen else 0, self.world_group)


class Heartbeat:
    """A daemon thread bumping ``daso/heartbeat/<rank>`` in the rendezvous store every
    ``interval`` seconds, and the probe that reads everyone's counters. The same thread posts
    and watches the ``daso/stop`` key for :class:`NodeStopVote`.

    Args:
        host, port: address of the rendezvous ``TCPStore`` (hosted by rank 0).
        rank, world_size: this rank and the number of ranks.
        interval: seconds between beats.
    """

    def __init__(
        self, host: str, port: int, rank: int, world_size: int, interval: float = 1.0
    ) -> None:
        self.address = (host, port)
        self.rank, self.world_size = rank, world_size
        self.interval = interval
        self._stop = threading.Event()
        self._stop_requested = threading.Event()
        self._stop_seen = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="daso-heartbeat", daemon=True)
        self._thread.start()

    def _client(self, timeout: float) -> Any:
        return dist.TCPStore(
            self.address[0],
            self.address[1],
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
        )

    def _beat(self) -> None:
        try:
            store = self._client(30.0)
            key = f"daso/heartbeat/{self.rank}"
            while not self._stop.is_set():
                store.add(key, 1)
                if self._stop_requested.is_set() and not self._stop_seen.is_set():
                    store.set(STOP_KEY, str(self.rank))
                if store.check([STOP_KEY]):
                    self._stop_seen.set()
                self._stop.wait(self.interval)
        except Exception as err:  # noqa: BLE001 - the store's host is gone; nothing to beat to
            log.debug("heartbeat stopped: %s", err)

    def request_stop(self) -> None:
        """Post ``daso/stop`` for every rank to see (on the next beat)."""
        self._stop_requested.set()

    def stop_seen(self) -> bool:
        """Whether ``daso/stop`` was in the store at the last beat."""
        return self._stop_seen.is_set()

    def silent_ranks(self, window: float | None = None) -> list[int] | None:
        """Ranks whose heartbeat did not advance over ``window`` seconds (default three beats).

        Returns:
            The silent ranks, sorted; ``None`` if the store itself did not answer (its host,
            rank 0, is gone).
        """
        window = 3 * self.interval if window is None else window
        try:
            store = self._client(max(window, 5.0))
            keys = [f"daso/heartbeat/{r}" for r in range(self.world_size)]
            before = [store.add(k, 0) for k in keys]
            time.sleep(window)
            after = [store.add(k, 0) for k in keys]
        except Exception:  # noqa: BLE001 - unreachable store
            return None
        return [r for r, (a, b) in enumerate(zip(before, after)) if b <= a]

    def close(self) -> None:
        """Stop beating."""
        self._stop.set()
        self._thread.join(timeout=5 * self.interval)
