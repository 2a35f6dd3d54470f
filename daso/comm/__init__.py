"""Collectives: node-local (torch.distributed, DDP) and cross-node (MPI) communication."""

from daso.comm.flat import (
    FlatBuffer,
    model_state_tensors,
    optimizer_state_tensors,
    shard_bounds,
    synced_state_tensors,
)
from daso.comm.local import (
    ByteCounter,
    allreduce_sum,
    average_in_group,
    broadcast,
    broadcast_tensors,
    no_sync,
    unwrap,
    wrap_data_parallel,
)
from daso.comm.mpi import WIRE_DTYPES, CrossNodeSum, PendingSum, mpi_buffer, mpi_sum

__all__ = [
    "WIRE_DTYPES",
    "ByteCounter",
    "CrossNodeSum",
    "FlatBuffer",
    "PendingSum",
    "allreduce_sum",
    "average_in_group",
    "broadcast",
    "broadcast_tensors",
    "model_state_tensors",
    "mpi_buffer",
    "mpi_sum",
    "no_sync",
    "optimizer_state_tensors",
    "shard_bounds",
    "synced_state_tensors",
    "unwrap",
    "wrap_data_parallel",
]
