"""The parameter server's protocol on one process (MPI_COMM_SELF: one worker, one shard):
each rule against its formula, and every wait failing with CommTimeoutError naming the peer
and the operation instead of hanging."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from daso.comm.param_server import Op, ParameterClient, ParameterServer
from daso.errors import CommTimeoutError


@pytest.fixture
def comms():
    requests, replies = MPI.COMM_SELF.Dup(), MPI.COMM_SELF.Dup()
    yield requests, replies
    requests.Free()
    replies.Free()


def test_elastic_add_and_pull_follow_their_formulas(comms):
    center = torch.randn(10, generator=torch.Generator().manual_seed(0))
    start = center.clone()
    server = ParameterServer(*comms, center, moving_rate=0.3, timeout=10)
    client = ParameterClient(*comms, 10, timeout=10)
    x = torch.randn(10, generator=torch.Generator().manual_seed(1))
    # ELASTIC: the reply is x~ before the move; then x~ <- x~ + alpha (x - x~)
    assert torch.equal(client.exchange(Op.ELASTIC, x), start)
    moved = start + 0.3 * (x - start)
    torch.testing.assert_close(client.exchange(Op.PULL), moved, rtol=0, atol=1e-6)
    # ADD: x~ <- x~ + delta, and the reply is the new x~
    delta = torch.full((10,), 0.5)
    torch.testing.assert_close(client.exchange(Op.ADD, delta), moved + 0.5, rtol=0, atol=1e-6)
    client.exchange(Op.DONE)
    server.close()
    assert server.applied == [2]  # ELASTIC and ADD; PULL and DONE are not pushes
    assert client.bytes_sent == server.bytes_sent == 0  # the only node is this one


def test_missing_server_times_out_naming_rank_and_operation(comms):
    client = ParameterClient(*comms, 4, timeout=0.3)
    with pytest.raises(CommTimeoutError, match=r"PULL request .* \[.rank 0 \(world rank 0\).\]"):
        client.exchange(Op.PULL)


def test_server_shutdown_times_out_naming_the_silent_worker(comms):
    server = ParameterServer(*comms, torch.zeros(4), moving_rate=0.5, timeout=0.3)
    with pytest.raises(
        CommTimeoutError, match=r"no DONE from worker\(s\) \[.rank 0 \(world rank 0\).\]"
    ):
        server.close()
