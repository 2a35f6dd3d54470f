"""What ``async_easgd`` and ``downpour`` share: a center variable on sharded parameter servers.

Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NIPS 2015, arXiv
1412.6651. The p workers of the paper are the nodes; inside a node, DDP averages gradients every
step as in every strategy here, so a node's ranks hold one model. Local rank 0 of each node (the
node's *leader*, its rank in the cross-node communicator ``C_0`` = its node index) is

* the node's worker on the wire: it alone talks to the parameter servers, on the node's own
  clock (every ``period`` = tau of its steps), and the node-local broadcast of what it got
  keeps the node consistent; workers never wait for each other;
* host of one :class:`~daso.comm.param_server.ParameterServer` thread, serving shard ``s`` (a
  contiguous parameter range, ``1/p`` of the model) of the center variable ``x~`` for all p
  workers, while its own worker computes. So there are p shards, one per node.

The center holds the model state in :class:`~daso.comm.FlatBuffer` layout: parameters and
floating-point buffers (float32 ``[P]``); BatchNorm running statistics are treated like
parameters (moved by the same elastic or additive rule; validation of the center uses the
center's statistics). The center starts at the initial model, which the trainer made equal on
all ranks, so no communication is needed to initialise it.

Validation evaluates the center ``x~`` (the paper's choice; the leader pulls every shard and
broadcasts it in the node) unless ``evaluate: worker``.

Quiescence: an exchange is a blocking round trip (the worker waits only for the servers, which
answer while their own workers compute), so when a rank returns from :meth:`after_step` none of
its requests is in flight. After the trainer's epoch-end allreduce every worker has returned, so
every push has been applied and the center is quiescent: that is when :meth:`state_dict` may be
taken (each rank's own: counters and the center shard it serves).

Every wait times out after ``timeout_seconds`` with :class:`~daso.errors.CommTimeoutError`
naming the peer and the operation; :meth:`close` tells every server this worker is done and
waits (at most the timeout) for its own server to hear the same from every worker.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from mpi4py import MPI
from pydantic import Field

from daso.comm import FlatBuffer, broadcast, model_state_tensors, shard_bounds
from daso.comm.param_server import Op, ParameterClient, ParameterServer
from daso.errors import TopologyError
from daso.options import StrategyOptions
from daso.strategies.base import EpochCounters, Strategy
from daso.strategies.easgd import swapped_in
from daso.topology import ProcessGroups, require_thread_multiple


class CenterServerOptions(StrategyOptions):
    period: int = Field(1, ge=1, description="tau: a node's steps between its exchanges.")
    evaluate: Literal["center", "worker"] = Field(
        "center", description="Validate the center x~ or this worker's x^i."
    )


class CenterServerStrategy(Strategy):
    """Base of the asynchronous strategies with a center on parameter servers (module doc).

    Options (:class:`CenterServerOptions`):
        period: tau, the communication period: a node's steps between its exchanges, >= 1.
        evaluate: ``"center"`` (default) or ``"worker"``: which parameters validation sees.

    ``timeout_seconds`` is the longest wait for any parameter-server message, seconds.

    Attributes:
        step: this node's steps so far (its own clock, ``t^i`` in Algorithm 1).
        exchanges: this node's exchanges with the center so far.
        server: this rank's :class:`ParameterServer` (leaders only, else ``None``).
        client: this rank's :class:`ParameterClient` (leaders only, else ``None``).

    Raises:
        ConfigError: ``period < 1`` or ``evaluate`` not center|worker.
        TopologyError (from :meth:`wrap`): MPI without ``MPI_THREAD_MULTIPLE`` (the server
            thread and the training thread both call MPI).
    """

    Options = CenterServerOptions
    #: alpha of the servers' elastic rule (``None``: the strategy only adds updates).
    moving_rate: float | None = None
    lockstep = False  # nodes run on their own clocks: the trainer never makes them wait

    def __init__(self, groups: ProcessGroups, epochs: int, **options: Any) -> None:
        super().__init__(groups, epochs, **options)
        self.period, self.evaluate = self.options.period, self.options.evaluate
        self.step = self.exchanges = 0
        self.leader = self.topology.local_rank == 0
        self.leader_rank = self.topology.global_rank(self.topology.node_rank, 0)
        self.server: ParameterServer | None = None
        self.client: ParameterClient | None = None
        self.counters = EpochCounters()
        self._comms: list[Any] = []

    # -- setup ---------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        self.optimizer = optimizer
        self.model = self.wrap_in_node(model)
        self.state = FlatBuffer(model_state_tensors(model), device=self.groups.device)
        # every rank checks (same MPI everywhere), so all stop together, not only the leaders
        require_thread_multiple(MPI, f"{self.name}'s parameter server (even on one node)")
        if self.leader:
            self._start_server(self.state.pack().cpu())
        return self.model

    def _start_server(self, initial: torch.Tensor) -> None:
        """Leader only: duplicate ``C_0`` twice (requests, replies), serve this node's shard."""
        comm = self.groups.cross_comm
        if comm is None:
            if self.topology.num_nodes > 1:
                raise TopologyError(
                    f"{self.name}: local rank 0 of node {self.topology.node_rank} has no "
                    "cross-node MPI communicator (launch under mpiexec/srun)"
                )
            comm = MPI.COMM_SELF  # one node: its leader serves the whole center to itself
        requests, replies = comm.Dup(), comm.Dup()
        self._comms = [requests, replies]
        start, stop = shard_bounds(initial.numel(), comm.Get_size())[comm.Get_rank()]
        self.shard = (start, stop)
        self.server = ParameterServer(
            requests, replies, initial[start:stop].clone(), self.moving_rate or 0.0, self.timeout
        )
        self.client = ParameterClient(requests, replies, initial.numel(), self.timeout)

    # -- the exchange --------------------------------------------------------------------------
    def exchange(self, op: Op, payload: torch.Tensor | None) -> torch.Tensor:
        """One round trip of this node with every server, shared in the node.

        The leader sends ``payload`` (float32 ``[P]``, identical on the node's ranks; ignored
        elsewhere) and gets the servers' reply; a node-local broadcast gives it to every rank.

        Returns:
            float32 ``[P]`` on the model's device, the same on every rank of the node.

        Raises:
            CommTimeoutError: a server did not answer in time (or this rank's server failed).
        """
        result = torch.empty(self.state.numel, dtype=torch.float32, device=self.groups.device)
        if self.leader:
            self.server.check()
            cpu = payload.cpu() if payload is not None else None
            result.copy_(self.client.exchange(op, cpu))
        broadcast(result, self.leader_rank, self.groups.node_group)
        if op != Op.PULL:
            self.exchanges += 1
        return result

    def pull_center(self) -> torch.Tensor:
        """The center ``x~`` (float32 ``[P]`` on the model's device) on every rank of the node."""
        return self.exchange(Op.PULL, None)

    def is_exchange_step(self) -> bool:
        """Whether the step being taken (``self.step`` not yet advanced) ends a period."""
        return (self.step + 1) % self.period == 0

    # -- trainer hooks -------------------------------------------------------------------------
    def evaluation(self) -> contextlib.AbstractContextManager:
        """Validate the center (pulled now, all pushes applied) unless ``evaluate: worker``."""
        if self.evaluate == "worker":
            return contextlib.nullcontext()
        return swapped_in(self.state, self.pull_center())

    def window_metrics(self) -> dict[str, float]:
        """``cross_node_bytes``: request bytes this rank's worker sent to other nodes' servers
        plus reply bytes its server sent to other nodes' workers (float32, 4 bytes each)."""
        sent = waited = 0
        if self.leader:
            sent = self.client.bytes_sent + self.server.bytes_sent
            waited = self.client.wait_seconds
        return {
            "period": self.period,
            "exchanges": self.exchanges,  # this node's exchanges so far in the run
            **self.counters.since_last(sent, waited),
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: its node's clock and, on a leader, the center shard it serves
        (``center_shard`` float32 ``[stop - start]``, ``shard`` ``(start, stop)``) and the pushes
        it absorbed per worker. Take it at a quiescent point (module docstring)."""
        state: dict[str, Any] = {"step": self.step, "exchanges": self.exchanges}
        if self.server is not None:
            with self.server.lock:
                state["center_shard"] = self.server.center.clone()
                state["applied"] = list(self.server.applied)
            state["shard"] = self.shard
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same topology and model).

        Raises:
            ValueError: the saved shard does not match the one this rank serves.
        """
        self.step, self.exchanges = int(state["step"]), int(state["exchanges"])
        if self.server is None:
            return
        if tuple(state.get("shard", ())) != tuple(self.shard):
            raise ValueError(
                f"{self.name}: checkpoint holds center shard {state.get('shard')} but this rank "
                f"serves {self.shard}; resume with the same nodes and model"
            )
        with self.server.lock:
            self.server.center.copy_(state["center_shard"])
            self.server.applied[:] = state["applied"]

    def close(self) -> None:
        """Tell every server this worker is done, wait for this rank's server to hear it from
        every worker (at most ``timeout_seconds``), free the communicators. Idempotent.

        Raises:
            CommTimeoutError: a server did not take the ``DONE`` or a worker never sent one.
        """
        if self.server is None:
            return
        server, self.server = self.server, None
        try:
            self.client.exchange(Op.DONE)
        finally:
            try:
                server.close()  # joins the thread, also when DONE could not be sent
            finally:
                for comm in self._comms:
                    comm.Free()
                self._comms = []
