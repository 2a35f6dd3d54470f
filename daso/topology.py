"""Who am I: rank, node and local rank from the launcher, and the process groups built on them.

The layer at the bottom of :mod:`daso`. It answers three questions for each process:

* the launcher's view (``rank``, ``world_size``, ``local_rank``, ``local_world_size``), read
  from Slurm, Open MPI, MPICH/Hydra (PMI) or torchrun environment variables
  (:func:`read_launcher_env`);
* the node layout (which ranks share a node; nodes may hold different numbers of ranks), found
  by exchanging a node key over MPI (:func:`layout_from_keys`) or, to emulate several nodes on
  one machine, from the ``DASO_RANKS_PER_NODE`` override (:func:`layout_from_override`);
* the groups: the node-local ``torch.distributed`` group used for gradient averaging and the
  cross-node MPI communicators ``C_i`` (one per local rank index ``i < min_n L_n``, DASO paper
  section 3), built by :func:`init_distributed`.

Ranks of a node are usually contiguous, but nothing here assumes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from daso.errors import ConfigError, TopologyError, reported_elsewhere

log = logging.getLogger(__name__)

#: Environment variable that emulates nodes on one machine: ``"2"`` (every node holds 2 ranks)
#: or a comma-separated list such as ``"2,1"`` (node 0 holds ranks 0-1, node 1 holds rank 2).
RANKS_PER_NODE_ENV = "DASO_RANKS_PER_NODE"

# (launcher name, rank, world size, local rank, local world size, node id) variable names.
_LAUNCHERS: tuple[tuple[str, str, str, str | None, str | None, str | None], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"),
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        None,
    ),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", None),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None, "SLURM_NODEID"),
)


@dataclasses.dataclass(frozen=True)
class LauncherInfo:
    """What the launcher's environment says about this process.

    Attributes:
        source: ``"torchrun"``, ``"openmpi"``, ``"mpich"``, ``"slurm"`` or ``"none"`` (a single
            process started by hand).
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes in the job.
        local_rank: rank within this node, or ``None`` if the launcher does not say.
        local_world_size: ranks on this node, or ``None`` if the launcher does not say.
        node_id: the launcher's node index (Slurm ``SLURM_NODEID``), or ``None``.
        variables: the variables read, name -> value, for error messages.
    """

    source: str
    rank: int
    world_size: int
    local_rank: int | None = None
    local_world_size: int | None = None
    node_id: int | None = None
    variables: tuple[tuple[str, str], ...] = ()


def _int_var(env: Mapping[str, str], name: str, source: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise TopologyError(
            f"{source} launcher: environment variable {name}={value!r} is not an integer; "
            f"unset it or launch with {source} normally"
        ) from None


def read_launcher_env(env: Mapping[str, str] | None = None) -> LauncherInfo:
    """Read rank, world size and local rank from the launcher's environment variables.

    Launchers are tried in the order torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``), Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra (``PMI_RANK``,
    ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``), Slurm (``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``); the first whose rank and size
    variables are both set wins. With none set the process is a single rank.

    Args:
        env: the environment to read (default ``os.environ``).

    Returns:
        The :class:`LauncherInfo`.

    Raises:
        TopologyError: a variable is not an integer, or rank/local rank is out of range.
    """
    env = os.environ if env is None else env
    for source, rank_var, size_var, local_var, local_size_var, node_var in _LAUNCHERS:
        if rank_var not in env or size_var not in env:
            continue
        names = [n for n in (rank_var, size_var, local_var, local_size_var, node_var) if n]
        variables = tuple((n, env[n]) for n in names if n in env)
        rank = _int_var(env, rank_var, source)
        world_size = _int_var(env, size_var, source)
        local_rank = _int_var(env, local_var, source) if local_var and local_var in env else None
        local_size = (
            _int_var(env, local_size_var, source)
            if local_size_var and local_size_var in env
            else None
        )
        node_id = _int_var(env, node_var, source) if node_var and node_var in env else None
        shown = ", ".join(f"{k}={v}" for k, v in variables)
        if world_size < 1 or not 0 <= rank < world_size:
            raise TopologyError(
                f"{source} launcher: rank {rank} is not in [0, world size {world_size}) "
                f"(read {shown}); check the launcher's command line"
            )
        if local_rank is not None and local_size is not None and not 0 <= local_rank < local_size:
            raise TopologyError(
                f"{source} launcher: local rank {local_rank} is not in [0, {local_size}) "
                f"(read {shown})"
            )
        return LauncherInfo(source, rank, world_size, local_rank, local_size, node_id, variables)
    return LauncherInfo("none", 0, 1, 0, 1, None, ())


def with_slurm_step_ids(info: LauncherInfo, env: Mapping[str, str]) -> LauncherInfo:
    """``info`` plus Slurm's node id and local rank when the launcher names no node but the
    process is task ``info.rank`` of a Slurm step of the same size.

    ``srun --mpi=pmi2`` sets ``PMI_RANK``/``PMI_SIZE``, so the MPICH row of the launcher table
    wins, and it says nothing of nodes; ``SLURM_NODEID``/``SLURM_LOCALID`` do. Host names would
    do as well on a real cluster, but not where several ``slurmd`` share one host. A process
    that only inherited Slurm's variables (``mpiexec`` inside a job step) has a rank or world
    size that differs from ``SLURM_PROCID``/``SLURM_NTASKS`` and is returned unchanged.
    """
    names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")
    if info.node_id is not None or not all(name in env for name in names):
        return info
    try:
        procid, ntasks, local, node = (int(env[name]) for name in names)
    except ValueError:
        return info
    if (procid, ntasks) != (info.rank, info.world_size):
        return info
    return dataclasses.replace(
        info,
        local_rank=local if info.local_rank is None else info.local_rank,
        node_id=node,
        variables=info.variables + tuple((name, env[name]) for name in names),
    )


def layout_from_override(spec: str, world_size: int) -> list[int]:
    """Node index of every rank from a ``DASO_RANKS_PER_NODE`` value (emulated nodes).

    Args:
        spec: ``"M"`` (every node holds M ranks; M must divide ``world_size``) or ``"M0,M1,..."``
            (node n holds ``M_n`` ranks, contiguous; the sum must equal ``world_size``).
        world_size: number of processes in the job.

    Returns:
        ``node_of_rank``: a list of length ``world_size``, node index of each global rank.

    Raises:
        TopologyError: the value does not parse or does not split ``world_size``.
    """
    where = f"{RANKS_PER_NODE_ENV}={spec!r} with world size {world_size}"
    try:
        counts = [int(part) for part in spec.replace(" ", "").split(",") if part]
    except ValueError:
        raise TopologyError(
            f"{where}: expected an integer such as '2' or a list such as '2,1'"
        ) from None
    if not counts or any(c < 1 for c in counts):
        raise TopologyError(f"{where}: every node needs at least one rank")
    if len(counts) == 1:
        per_node = counts[0]
        if world_size % per_node != 0:
            raise TopologyError(
                f"{where}: {per_node} ranks per node does not divide {world_size} ranks; "
                f"launch a multiple of {per_node} ranks or give a list such as "
                f"'{per_node},{world_size % per_node}'"
            )
        counts = [per_node] * (world_size // per_node)
    if sum(counts) != world_size:
        raise TopologyError(
            f"{where}: the list holds {sum(counts)} ranks but the job has {world_size}; "
            "make the counts add up to the number of launched processes"
        )
    return [node for node, count in enumerate(counts) for _ in range(count)]


def layout_from_keys(keys: Sequence[Any]) -> list[int]:
    """Node index of every rank from a per-rank node key (hostname or launcher node id).

    Nodes are numbered in the order of their lowest global rank.

    Args:
        keys: ``keys[r]`` identifies the node of rank ``r`` (equal keys = same node).

    Returns:
        ``node_of_rank``, a list of ``len(keys)`` node indices.
    """
    index: dict[Any, int] = {}
    return [index.setdefault(key, len(index)) for key in keys]


@dataclasses.dataclass(frozen=True)
class Topology:
    """The cluster layout as seen from one rank.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes.
        node_of_rank: node index of every global rank (length ``world_size``).
        hostname: this process's host name.
        source: where the layout came from (``"override"``, ``"slurm"``, ``"hostname"``, ...).
    """

    rank: int
    world_size: int
    node_of_rank: tuple[int, ...]
    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    source: str = "none"

    def __post_init__(self) -> None:
        if len(self.node_of_rank) != self.world_size:
            raise TopologyError(
                f"node layout lists {len(self.node_of_rank)} ranks but world size is "
                f"{self.world_size}"
            )

    @property
    def num_nodes(self) -> int:
        """Number of nodes N."""
        return max(self.node_of_rank) + 1

    @property
    def node_rank(self) -> int:
        """Index of this rank's node in ``[0, num_nodes)``."""
        return self.node_of_rank[self.rank]

    def ranks_on_node(self, node: int) -> list[int]:
        """Global ranks of node ``node``, ascending; position in the list is the local rank."""
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    @property
    def node_ranks(self) -> list[int]:
        """Global ranks on this rank's node."""
        return self.ranks_on_node(self.node_rank)

    @property
    def local_rank(self) -> int:
        """Rank within this node."""
        return self.node_ranks.index(self.rank)

    @property
    def local_world_size(self) -> int:
        """Ranks on this node, ``L_n``."""
        return len(self.node_ranks)

    @property
    def ranks_per_node(self) -> list[int]:
        """``L_n`` for every node ``n``."""
        return [len(self.ranks_on_node(n)) for n in range(self.num_nodes)]

    @property
    def num_cross_groups(self) -> int:
        """Number of cross-node groups ``C_i``: ``min_n L_n`` (DASO, section 3)."""
        return min(self.ranks_per_node)

    def cross_group_ranks(self, local_rank: int) -> list[int]:
        """Global ranks of ``C_i``: local rank ``i`` of every node, in node order."""
        if not 0 <= local_rank < self.num_cross_groups:
            raise ValueError(
                f"cross-node group C_{local_rank} does not exist: local ranks 0.."
                f"{self.num_cross_groups - 1} have one (min ranks per node)"
            )
        return [self.ranks_on_node(n)[local_rank] for n in range(self.num_nodes)]

    def global_rank(self, node: int, local_rank: int) -> int:
        """Global rank of local rank ``local_rank`` on node ``node``."""
        return self.ranks_on_node(node)[local_rank]

    def describe(self) -> str:
        """One line for logs and ``daso info``."""
        cross = (
            f"C_{self.local_rank}={self.cross_group_ranks(self.local_rank)}"
            if self.local_rank < self.num_cross_groups
            else "none (more ranks on this node than on the smallest node)"
        )
        return (
            f"rank {self.rank}/{self.world_size} host {self.hostname} node "
            f"{self.node_rank}/{self.num_nodes} local_rank {self.local_rank}/"
            f"{self.local_world_size} node_group={self.node_ranks} cross_group={cross} "
            f"(layout from {self.source})"
        )


def resolve_topology(
    info: LauncherInfo,
    all_keys: Sequence[Any] | None,
    override: str | None,
    hostname: str,
) -> Topology:
    """Combine the launcher's view, the exchanged node keys and the override into a Topology.

    Args:
        info: this rank's :class:`LauncherInfo`.
        all_keys: node key of every rank (gathered over MPI), or ``None`` with one process.
        override: the ``DASO_RANKS_PER_NODE`` value, or ``None``.
        hostname: this process's host name (for display).

    Raises:
        TopologyError: the override does not split the world, or the launcher's local rank /
            local size disagrees with the layout found (for instance a wrong override).
    """
    if override:
        node_of_rank = layout_from_override(override, info.world_size)
        source = "override"
    elif all_keys is not None:
        node_of_rank = layout_from_keys(all_keys)
        source = "slurm" if info.node_id is not None else "hostname"
    else:
        node_of_rank = [0] * info.world_size
        source = info.source
    topo = Topology(info.rank, info.world_size, tuple(node_of_rank), hostname, source)
    if not override and info.local_rank is not None and info.local_rank != topo.local_rank:
        shown = ", ".join(f"{k}={v}" for k, v in info.variables)
        raise TopologyError(
            f"the launcher says local rank {info.local_rank} ({shown}) but ranks grouped by "
            f"{source} give local rank {topo.local_rank}; set {RANKS_PER_NODE_ENV} to state "
            "the layout explicitly"
        )
    return topo


def check_torchrun_single_node(info: LauncherInfo, env: Mapping[str, str]) -> None:
    """Check that a torchrun job without an MPI world spans one node.

    torchrun starts every process as an MPI singleton, so the cross-node layer (MPI
    communicators between nodes) cannot exist; one node needs none: its ranks meet in
    ``torch.distributed`` at torchrun's ``MASTER_ADDR``/``MASTER_PORT``.

    Args:
        info: this rank's :class:`LauncherInfo` (``source == "torchrun"``).
        env: the environment (``GROUP_WORLD_SIZE``, torchrun's node count, is read from it).

    Raises:
        TopologyError: torchrun spans several nodes (``GROUP_WORLD_SIZE`` > 1, ``GROUP_RANK``
            > 0, or ``WORLD_SIZE`` > ``LOCAL_WORLD_SIZE``).
    """
    nodes = _int_var(env, "GROUP_WORLD_SIZE", "torchrun") if "GROUP_WORLD_SIZE" in env else 1
    local = info.local_world_size
    if nodes > 1 or (info.node_id or 0) > 0 or (local is not None and info.world_size > local):
        shown = ", ".join(f"{k}={v}" for k, v in info.variables)
        if "GROUP_WORLD_SIZE" in env:
            shown += f", GROUP_WORLD_SIZE={env['GROUP_WORLD_SIZE']}"
        raise TopologyError(
            f"torchrun spans several nodes ({shown}), but daso's cross-node layer runs over "
            "MPI and torchrun starts every process as its own MPI world; launch multi-node "
            "jobs with mpirun/mpiexec or srun --mpi=pmi2 (torchrun works for one node)"
        )


#: MPI thread levels by value, for messages (``MPI.THREAD_SINGLE`` ... ``MPI.THREAD_MULTIPLE``).
_THREAD_LEVELS = ("THREAD_SINGLE", "THREAD_FUNNELED", "THREAD_SERIALIZED", "THREAD_MULTIPLE")


def require_thread_multiple(mpi: Any, what: str = "the cross-node layer") -> None:
    """Check that MPI was initialised with ``MPI_THREAD_MULTIPLE``.

    daso's cross-node collectives (and the parameter servers of ``async_easgd``/``downpour``)
    call MPI from a communication thread while the main thread also calls it, which only
    ``MPI_THREAD_MULTIPLE`` allows. Only the users of MPI from several threads need it:
    :func:`init_distributed` checks it when the job spans more than one node (a single node
    has no cross-node layer and does not fail here).

    Args:
        mpi: the ``mpi4py.MPI`` module (or a stub with ``Query_thread()`` and the
            ``THREAD_*`` constants).
        what: the user of MPI named in the message.

    Raises:
        TopologyError: the level MPI provides is below ``MPI_THREAD_MULTIPLE``; the message
            names the level obtained and the fix.
    """
    provided = mpi.Query_thread()
    if provided >= mpi.THREAD_MULTIPLE:
        return
    names = {getattr(mpi, name): f"MPI_{name}" for name in _THREAD_LEVELS if hasattr(mpi, name)}
    level = names.get(provided, f"thread level {provided}")
    raise TopologyError(
        f"MPI provides {level}, but {what} calls MPI from a communication thread and needs "
        "MPI_THREAD_MULTIPLE; use an MPI built with thread support (Open MPI 3.0 or newer, "
        "or an older one configured with --enable-mpi-thread-multiple; MPICH's default "
        "build) and leave mpi4py.rc.thread_level at 'multiple' (mpi4py's default)"
    )


def detect_topology(comm: Any | None = None, env: Mapping[str, str] | None = None) -> Topology:
    """Detect this process's topology from the launcher and MPI.

    Reads the launcher variables (:func:`read_launcher_env`), then, when MPI's world matches
    the launcher's, gathers every rank's node key over MPI: the override
    (``DASO_RANKS_PER_NODE``), else ``SLURM_NODEID``, else the host name (MPI processor name).
    Under torchrun on one node every process is an MPI singleton; the layout is then one node
    holding all ranks, and MPI is not used for it (:func:`check_torchrun_single_node`).

    Args:
        comm: an mpi4py communicator spanning the job (default ``MPI.COMM_WORLD``).
        env: environment to read (default ``os.environ``).

    Raises:
        TopologyError: an impossible layout, or a launcher world that MPI does not see
            (several nodes under torchrun, or an override emulating several nodes there:
            the cross-node layer needs MPI).
    """
    env = os.environ if env is None else env
    info = read_launcher_env(env)
    override = env.get(RANKS_PER_NODE_ENV) or None
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        hostname = MPI.Get_processor_name()
    else:
        hostname = socket.gethostname()
    if info.source == "none" and comm.Get_size() > 1:
        info = LauncherInfo("mpi", comm.Get_rank(), comm.Get_size())
    if comm.Get_size() == info.world_size and comm.Get_rank() == info.rank:
        stepped = with_slurm_step_ids(info, env)
        key = (stepped.node_id, hostname)
        gathered = comm.allgather(key) if info.world_size > 1 else [key]
        if all(node is not None for node, _ in gathered):
            info, all_keys = stepped, [node for node, _ in gathered]
        else:  # not every rank knows its Slurm node: host names for all, never a mix
            info = dataclasses.replace(info, node_id=None)
            all_keys = [host for _, host in gathered]
    elif info.world_size == 1:
        all_keys = None
    elif info.source == "torchrun" and comm.Get_size() == 1:
        check_torchrun_single_node(info, env)  # every process an MPI singleton: no MPI world
        if override and len(set(layout_from_override(override, info.world_size))) > 1:
            raise TopologyError(
                f"{RANKS_PER_NODE_ENV}={override!r} emulates several nodes, but under torchrun "
                "every process is its own MPI world and the cross-node layer needs MPI; "
                f"unset {RANKS_PER_NODE_ENV} or launch with mpiexec -n {info.world_size}"
            )
        all_keys = None
    else:
        shown = ", ".join(f"{k}={v}" for k, v in info.variables)
        raise TopologyError(
            f"{info.source} launcher reports {info.world_size} ranks ({shown}) but MPI sees "
            f"{comm.Get_size()}; the cross-node layer needs MPI: launch with mpiexec/mpirun or "
            "srun --mpi=pmi2 (torchrun alone works only for a single node)"
        )
    try:
        return resolve_topology(info, all_keys, override, hostname)
    except TopologyError as err:
        if override and info.rank != 0:
            # the same variable, the same error on every rank: rank 0 prints it once
            raise reported_elsewhere(err) from None
        raise


@dataclasses.dataclass
class ProcessGroups:
    """The communicators one rank uses.

    Attributes:
        topology: the :class:`Topology`.
        backend: ``"nccl"`` or ``"gloo"`` (torch.distributed backend of both groups).
        world_group: ``torch.distributed`` group of all ranks.
        node_group: ``torch.distributed`` group of this node's ranks.
        cross_comm: mpi4py communicator ``C_i`` for this rank's local rank ``i``, or ``None`` if
            this rank takes no part in cross-node traffic (``i >= min_n L_n``).
        device: the ``torch.device`` tensors live on.
        store_address: ``(host, port)`` of the rendezvous ``TCPStore`` (heartbeats use it), or
            ``None`` if ``torch.distributed`` was initialised by the caller.
        store_prefix: the job's key namespace in that store (``daso-<random hex>/``, shared
            over MPI; see :func:`_rendezvous_store`); every key daso uses lies below it.
        mpi_world: the mpi4py communicator spanning the job (``MPI.COMM_WORLD``), or ``None``
            when MPI sees only this process of a larger job (torchrun on one node): code that
            needs MPI among a node's ranks fails clearly then.
        cuda_aware_mpi: ``"auto"``, ``"on"`` or ``"off"`` (``trainer.cuda_aware_mpi``): whether
            cross-node MPI gets CUDA device buffers (:mod:`daso.comm.cuda_aware` decides).
    """

    topology: Topology
    backend: str
    world_group: Any
    node_group: Any
    cross_comm: Any
    device: Any
    store_address: tuple[str, int] | None = None
    mpi_world: Any = None
    cuda_aware_mpi: str = "auto"
    store_prefix: str = ""


def _listening_socket(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a port the kernel picks, listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock


def _rendezvous_store(
    topo: Topology, env: Mapping[str, str], comm: Any, timeout: datetime.timedelta
) -> tuple[Any, str]:
    """The ``torch.distributed`` key-value store every rank meets at, and the job's key
    namespace in it.

    Under torchrun (``MASTER_ADDR``/``MASTER_PORT`` set): torchrun's store, in the namespace
    of its run id and restart. Otherwise rank 0 opens the store on a port the kernel picks (no
    race for a free port), listening on the loopback interface when the whole job is on one
    host and on the address of its host name otherwise (``MASTER_ADDR``, when set, names it),
    never on every interface; it draws a random 128-bit namespace and tells the others the
    address and the namespace over MPI. The store has no authentication (torch's
    ``TCPStore`` has none): a process that can reach the port could still write keys, but it
    cannot guess the names of daso's keys (the stop vote, the heartbeats, the process
    groups'), so it cannot stop or confuse the job by accident or on purpose. The trust model:
    the ranks of a job trust each other and their network; checkpoints are untrusted input.

    Raises:
        TopologyError: neither the variables nor an MPI world to share the address.
    """
    from torch.distributed import TCPStore

    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
        # torchrun's agent already serves the store at MASTER_PORT: every rank is a client
        master = topo.rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        store = TCPStore(host, port, topo.world_size, master, timeout, wait_for_workers=False)
        run = env.get("TORCHELASTIC_RUN_ID", "job")
        return store, f"daso-{run}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if topo.world_size > 1 and comm.Get_size() != topo.world_size:
        raise TopologyError(
            "no rendezvous address: MASTER_ADDR and MASTER_PORT are not set and MPI cannot "
            "share one; set both (torchrun does) or launch with mpiexec/srun"
        )
    store = None
    if topo.rank == 0:
        host = env.get("MASTER_ADDR")
        if host is None:
            host = "127.0.0.1" if topo.num_nodes == 1 else socket.gethostbyname(topo.hostname)
        sock = _listening_socket(host)
        port = sock.getsockname()[1]
        store = TCPStore(
            host,
            port,
            topo.world_size,
            True,
            timeout,
            wait_for_workers=False,
            master_listen_fd=sock.detach(),  # the store serves this socket (and closes it)
        )
        shared = (host, port, f"daso-{secrets.token_hex(16)}/")
    else:
        shared = None
    if topo.world_size > 1:
        shared = comm.bcast(shared, root=0)
    if store is None:
        store = TCPStore(shared[0], shared[1], topo.world_size, False, timeout)
    return store, shared[2]


def init_distributed(
    device: str = "auto",
    timeout_seconds: float = 300.0,
    env: Mapping[str, str] | None = None,
    cuda_aware_mpi: str = "auto",
) -> ProcessGroups:
    """Detect the topology and build the node-local and cross-node groups.

    Call once per process, on every rank, before training. Initialises ``torch.distributed``
    (NCCL when ``device`` resolves to CUDA, else Gloo) over all ranks, the node-local subgroups,
    and the cross-node MPI communicators ``C_i = {local rank i of every node}`` for
    ``i < min_n L_n``. On CUDA it pins the process to GPU ``local_rank``. With more than one
    node it first checks that MPI provides ``MPI_THREAD_MULTIPLE``
    (:func:`require_thread_multiple`). Under torchrun on one node MPI is not used for the
    world (each process is an MPI singleton; :attr:`ProcessGroups.mpi_world` is ``None``).

    Args:
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        timeout_seconds: timeout of torch.distributed collectives, in seconds.
        env: environment to read (default ``os.environ``).
        cuda_aware_mpi: ``"auto"``, ``"on"`` or ``"off"``: whether cross-node MPI gets CUDA
            device buffers (kept in :attr:`ProcessGroups.cuda_aware_mpi`).

    Raises:
        TopologyError: impossible layout, missing rendezvous, MPI without
            ``MPI_THREAD_MULTIPLE`` on several nodes, or ``cuda`` requested without GPUs
            (or fewer GPUs than ranks on a node).
        ConfigError: ``cuda_aware_mpi`` is not one of auto, on, off.
    """
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    if cuda_aware_mpi not in ("auto", "on", "off"):
        raise ConfigError(
            f"cuda_aware_mpi is {cuda_aware_mpi!r}; use auto, on or off (trainer.cuda_aware_mpi)"
        )
    env = os.environ if env is None else env
    comm = MPI.COMM_WORLD
    # a failed peer is an error this process reports (naming the lost ranks, see
    # daso.faults), not MPI's default abort of the whole job without a word
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    topo = detect_topology(comm, env)
    mpi_world = comm if comm.Get_size() == topo.world_size else None
    if topo.num_nodes > 1:
        require_thread_multiple(MPI)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        count = torch.cuda.device_count()
        if count == 0:
            raise TopologyError("device 'cuda' requested but no CUDA GPU is visible; use cpu")
        torch_device = torch.device("cuda", topo.local_rank % count)
        torch.cuda.set_device(torch_device)
        if topo.local_world_size > count:
            log.warning(
                "%d ranks share %d GPU(s) on node %d: NCCL refuses that, using Gloo",
                topo.local_world_size,
                count,
                topo.node_rank,
            )
        backend = "nccl" if topo.local_world_size <= count else "gloo"
    else:
        torch_device = torch.device("cpu")
        backend = "gloo"
    store_address, store_prefix = None, ""
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds)
        store, store_prefix = _rendezvous_store(topo, env, comm, timeout)
        store_address = (store.host, store.port)
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(store_prefix, store),
            rank=topo.rank,
            world_size=topo.world_size,
            timeout=timeout,
        )
    groups = [topo.ranks_on_node(n) for n in range(topo.num_nodes)]
    node_group, _ = dist.new_subgroups_by_enumeration(groups, backend=backend)
    cross_comm = None
    if mpi_world is not None and topo.num_nodes > 1:
        in_cross = topo.local_rank < topo.num_cross_groups
        color = topo.local_rank if in_cross else MPI.UNDEFINED
        split = comm.Split(color, key=topo.node_rank)
        cross_comm = split if in_cross else None
    log.debug("%s backend=%s", topo.describe(), backend)
    return ProcessGroups(
        topo,
        backend,
        dist.group.WORLD,
        node_group,
        cross_comm,
        torch_device,
        store_address,
        mpi_world,
        cuda_aware_mpi,
        store_prefix,
    )


def extra_node_group(groups: ProcessGroups) -> Any:
    """A new ``torch.distributed`` group of this rank's node (same ranks as
    ``groups.node_group``), for collectives issued from another thread than the node group's
    (a group's collectives must come in the same order on every rank, so two threads never
    share one). Every rank of the job must call it at the same point (collective).
    """
    import torch.distributed as dist

    topo = groups.topology
    enumeration = [topo.ranks_on_node(n) for n in range(topo.num_nodes)]
    group, _ = dist.new_subgroups_by_enumeration(enumeration, backend=groups.backend)
    return group


def shutdown_distributed() -> None:
    """Leave ``torch.distributed`` cleanly: wait for every rank, then destroy the groups.

    The barrier keeps rank 0, which hosts the rendezvous store, alive until every other rank
    is done with it; without it a rank may exit while a peer still talks to its store.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
