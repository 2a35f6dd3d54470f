"""One copy of a flat float32 vector in memory that the ranks of a node share (PASSM).

Every member of a *sharing group* (the ranks of one node on one device) gets a tensor over
the same memory, so a write by one rank is seen by the others without any message:

* CPU, ``"mpi-window"``: an MPI-3 shared-memory window (``MPI_Win_allocate_shared``) on the
  group's communicator, when MPI says all of the group's ranks can share memory
  (``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`` keeps the whole group together);
* CPU, ``"file"``: otherwise (``daso emulate`` starts ranks with ``MPIR_CVAR_NOLOCAL=1``, so
  MPICH treats every rank as its own host, although the namespaces share one kernel and one
  ``/dev/shm``) a file in ``/dev/shm`` mapped ``MAP_SHARED`` by every rank
  (``torch.from_file(..., shared=True)``), unlinked once all have mapped it;
* CUDA, ``"cuda-ipc"``: the group leader allocates the vector on its GPU and the others open
  it through CUDA IPC handles (``torch.multiprocessing.reductions.reduce_tensor``), sent over
  the group's communicator.

Whatever the kind, :func:`share_vector` checks that the memory really is shared (every rank
must read what the leader wrote) and fails with :class:`~daso.errors.TopologyError` otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any

import torch
from mpi4py import MPI

from daso.errors import TopologyError

log = logging.getLogger(__name__)

#: Where the ``"file"`` kind puts its (short-lived) file.
SHM_DIR = "/dev/shm"


@dataclasses.dataclass
class SharedVector:
    """A float32 ``[numel]`` tensor whose memory every rank of a sharing group sees.

    Attributes:
        flat: the shared tensor (CPU or CUDA).
        kind: ``"mpi-window"``, ``"file"``, ``"cuda-ipc"`` or ``"private"`` (a group of one).
        comm: the group's mpi4py communicator (rank 0 is the leader).
        window: the MPI window backing ``flat`` (``"mpi-window"`` only).
    """

    flat: torch.Tensor
    kind: str
    comm: Any
    window: Any = None

    def free(self) -> None:
        """Collective over :attr:`comm`: release the window. Tensors over :attr:`flat` must
        have been moved to private memory first."""
        self.comm.Barrier()
        if self.window is not None:
            self.window.Free()
            self.window = None


def _mpi_window(comm: Any, numel: int) -> tuple[torch.Tensor, Any] | None:
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    together = comm.allreduce(int(shared.Get_size() == comm.Get_size()), op=MPI.MIN)
    if not together:
        shared.Free()
        return None
    itemsize = 4
    size = numel * itemsize if shared.Get_rank() == 0 else 0
    window = MPI.Win.Allocate_shared(size, itemsize, comm=shared)
    buffer, _ = window.Shared_query(0)
    flat = torch.frombuffer(buffer, dtype=torch.float32, count=numel)
    return flat, window


def _shm_file(comm: Any, numel: int) -> torch.Tensor:
    path = None
    if comm.Get_rank() == 0:
        fd, path = tempfile.mkstemp(prefix="daso-shared-", dir=SHM_DIR)
        os.ftruncate(fd, numel * 4)
        os.close(fd)
    path = comm.bcast(path, root=0)
    try:
        flat = torch.from_file(path, shared=True, size=numel, dtype=torch.float32)
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            os.unlink(path)
    return flat


def _cuda_ipc(comm: Any, numel: int, device: torch.device) -> torch.Tensor:
    from torch.multiprocessing.reductions import reduce_tensor

    if comm.Get_rank() == 0:
        flat = torch.zeros(numel, dtype=torch.float32, device=device)
        torch.cuda.synchronize(device)
        comm.bcast(reduce_tensor(flat), root=0)
        return flat
    rebuild, args = comm.bcast(None, root=0)
    return rebuild(*args)


def share_vector(comm: Any, initial: torch.Tensor, device: torch.device) -> SharedVector:
    """Collective over ``comm``: a shared float32 vector holding the leader's ``initial``.

    Args:
        comm: mpi4py communicator of the sharing group; its rank 0 (the leader) writes.
        initial: float32 ``[numel]`` on ``device``, this rank's copy of the state; equal on
            all ranks (it is used to check that the memory is shared).
        device: CPU, or the CUDA device every member of ``comm`` uses.

    Returns:
        The :class:`SharedVector`, filled with the leader's ``initial``.

    Raises:
        TopologyError: ``/dev/shm`` is missing or full, or the ranks of ``comm`` do not
            see one memory (they are on different hosts, or on different GPUs).
    """
    numel = initial.numel()
    window = None
    if comm.Get_size() == 1:
        return SharedVector(initial, "private", comm)
    try:
        if device.type == "cuda":
            flat, kind = _cuda_ipc(comm, numel, device), "cuda-ipc"
        else:
            found = _mpi_window(comm, numel)
            if found is not None:
                (flat, window), kind = found, "mpi-window"
            else:
                flat, kind = _shm_file(comm, numel), "file"
                if comm.Get_rank() == 0:
                    log.info(
                        "MPI reports no shared memory between the node's ranks (as under "
                        "daso emulate); sharing through a file in %s instead",
                        SHM_DIR,
                    )
    except OSError as err:
        raise TopologyError(
            f"cannot allocate {numel * 4} bytes of shared memory ({err}); free space in "
            f"{SHM_DIR} or give the job more shared memory"
        ) from None
    if comm.Get_rank() == 0:
        flat.copy_(initial)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    comm.Barrier()
    agrees = bool(torch.equal(flat, initial))
    if not comm.allreduce(agrees, op=MPI.LAND):
        raise TopologyError(
            "the ranks of a node do not see one shared memory (a rank read something other "
            "than what local rank 0 wrote); the shared model needs the node's ranks on one "
            "host (and on CUDA one GPU per sharing group): check the launcher's layout"
        )
    return SharedVector(flat, kind, comm, window)
