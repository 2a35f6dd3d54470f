"""An emulated multi-node cluster on one Linux machine: network namespaces and a scarce link.

Each node is a network namespace with its own host name (a UTS namespace per rank, all set to
the node's name), one virtual ethernet ``eth0`` plugged into a bridge in the root namespace,
and, when a rate is given, a token-bucket filter (``tc ... tbf``) limiting that node's egress.
A node's ranks run inside its namespace, so:

* traffic between ranks of one node stays on the namespace's loopback (fast, not counted);
* traffic between nodes crosses ``eth0`` and the bridge, at the configured rate, and the
  kernel counts it (``ip -s link``);
* MPI cannot take a shared-memory shortcut between nodes: ranks are started with
  ``MPIR_CVAR_NOLOCAL=1`` and the OFI ``tcp`` provider bound to ``eth0``
  (``FI_TCP_IFACE``); Gloo is bound to ``eth0`` (``GLOO_SOCKET_IFNAME``);
* topology detection finds the nodes from the host names, with no override.

Everything is torn down on exit, on Ctrl-C, on SIGTERM and on failure: processes left in the
namespaces are killed, the namespaces (with their veth ends) and the bridge are deleted.

Requires root and iproute2 (``ip``, ``tc``); :class:`EmulationUnavailable` says so otherwise
and points to the plain override mode (``DASO_RANKS_PER_NODE``, no rate limit).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from daso.errors import DasoError

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class EmulationUnavailable(DasoError, RuntimeError):
    """This machine cannot host namespaces (no root, no ``ip``/``tc``)."""


def rate_bits_per_second(rate: str) -> float | None:
    """``"200mbit"`` -> 2e8 bits/s; ``"unlimited"`` -> ``None``.

    Raises:
        ValueError: not ``unlimited`` nor ``<number><bit|kbit|mbit|gbit>``.
    """
    if rate == "unlimited":
        return None
    match = _RATE.match(rate)
    if not match:
        raise ValueError(
            f"link rate {rate!r}: use 'unlimited' or a number with bit, kbit, mbit or gbit "
            "(tc's units), e.g. 200mbit"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def check_available() -> None:
    """Raise :class:`EmulationUnavailable` unless root with ``ip``, ``tc`` and ``unshare``."""
    missing = [tool for tool in ("ip", "tc", "unshare") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = "it must run as root" if os.geteuid() != 0 else f"{', '.join(missing)} not found"
        raise EmulationUnavailable(
            f"the emulated cluster needs root and iproute2 (ip, tc) and util-linux (unshare); "
            f"{why}. Use the plain override mode instead, without a rate limit: "
            "launch/local.sh --nodes N --ranks-per-node M CONFIG (DASO_RANKS_PER_NODE)"
        )


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class EmulatedCluster:
    """``len(ranks_per_node)`` nodes in network namespaces joined by a rate-limited bridge.

    Args:
        ranks_per_node: ranks of each node, e.g. ``[2, 2]``.
        rate: each node's egress rate on the cross-node link (``"200mbit"``, ``"1gbit"``), or
            ``"unlimited"``.
        prefix: name prefix of the namespaces, links and bridge (default unique per process).

    Use as a context manager::

        with EmulatedCluster([2, 2], "200mbit") as cluster:
            result = cluster.run([python, "-m", "daso.cli", "info"])
            print(cluster.link_bytes())

    Raises:
        EmulationUnavailable: not root, or ``ip``/``tc``/``unshare`` missing.
        ValueError: a malformed rate or an empty node.
    """

    def __init__(
        self, ranks_per_node: Sequence[int], rate: str = "unlimited", prefix: str | None = None
    ) -> None:
        if not ranks_per_node or any(n < 1 for n in ranks_per_node):
            raise ValueError(f"every node needs at least one rank, got {list(ranks_per_node)}")
        self.ranks_per_node = list(ranks_per_node)
        self.rate = rate
        self.rate_bps = rate_bits_per_second(rate)
        self.prefix = prefix or f"daso{os.getpid() % 100000}"
        self.subnet = 200 + os.getpid() % 50  # 10.<subnet>.0.0/24, distinct per run
        self.bridge = f"{self.prefix}br"
        self._previous_handlers: dict[int, Any] = {}
        self._up = False

    # -- names -------------------------------------------------------------------------------
    def namespace(self, node: int) -> str:
        """Name of node ``node``'s network namespace."""
        return f"{self.prefix}n{node}"

    def hostname(self, node: int) -> str:
        """Host name the ranks of node ``node`` see."""
        return f"{self.prefix}-node{node}"

    def address(self, node: int) -> str:
        """IPv4 address of node ``node`` on the cross-node link."""
        return f"10.{self.subnet}.0.{node + 1}"

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        check_available()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through __exit__ -> teardown

    def setup(self) -> None:
        """Create the bridge, one namespace per node, its veth and its rate limit."""
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        self._up = True
        for node in range(len(self.ranks_per_node)):
            ns, outside = self.namespace(node), f"{self.prefix}v{node}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", outside, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            if self.rate_bps is not None:
                # burst: 10 ms of traffic, at least 64 KiB, so the rate is reachable at any HZ
                burst = max(65536, int(self.rate_bps / 8 / 100))
                _run(
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                    "root",
                    "tbf",
                    "rate",
                    self.rate,
                    "burst",
                    str(burst),
                    "latency",
                    "100ms",
                )

    def teardown(self) -> None:
        """Kill what runs in the namespaces, delete them and the bridge. Idempotent."""
        for node in range(len(self.ranks_per_node)):
            ns = self.namespace(node)
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "link", "del", f"{self.prefix}v{node}", check=False)  # both veth ends
            _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        self._up = False
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    # -- running -------------------------------------------------------------------------------
    def mpiexec_command(self, argv: Sequence[str], mpiexec: str | None = None) -> list[str]:
        """The ``mpiexec`` command line that runs ``argv`` on every rank of every node.

        One MPMD segment per node: ``ip netns exec`` enters the node's network namespace,
        ``unshare --uts`` gives the rank the node's host name, and Hydra's own local-rank
        variables are dropped (Hydra sees one host; daso groups ranks by host name instead).
        """
        mpiexec = mpiexec or str(Path(sys.executable).with_name("mpiexec"))
        env = {
            "MPIR_CVAR_NOLOCAL": "1",  # no shared-memory path between namespaces
            "MPIR_CVAR_CH4_NETMOD": "ofi",
            "FI_PROVIDER": "tcp",
            "FI_TCP_IFACE": "eth0",
            "GLOO_SOCKET_IFNAME": "eth0",
            "MASTER_ADDR": self.address(0),
        }
        command = [mpiexec]
        for name, value in env.items():
            command += ["-genv", name, value]
        for node, ranks in enumerate(self.ranks_per_node):
            script = (
                f"hostname {self.hostname(node)} && "
                'unset MPI_LOCALRANKID MPI_LOCALNRANKS DASO_RANKS_PER_NODE && exec "$@"'
            )
            if node:
                command.append(":")
            command += [
                "-n",
                str(ranks),
                "ip",
                "netns",
                "exec",
                self.namespace(node),
                "unshare",
                "--uts",
                "sh",
                "-c",
                script,
                "sh",
                *argv,
            ]
        return command

    def run(
        self, argv: Sequence[str], timeout: float | None = None, capture: bool = True
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` on every rank; wait (killing every rank on timeout or interrupt)."""
        if not self._up:
            raise RuntimeError("the cluster is not set up: use it as a context manager")
        env = {k: v for k, v in os.environ.items() if k != "DASO_RANKS_PER_NODE"}
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen(
            self.mpiexec_command(argv),
            env=env,
            stdout=pipe,
            stderr=pipe,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def link_bytes(self) -> dict[str, list[int]]:
        """Kernel counters of every node's ``eth0``: ``{"tx": [bytes per node], "rx": [...]}``."""
        counters: dict[str, list[int]] = {"tx": [], "rx": []}
        for node in range(len(self.ranks_per_node)):
            out = _run("ip", "-n", self.namespace(node), "-s", "-j", "link", "show", "eth0").stdout
            stats = json.loads(out)[0]["stats64"]
            counters["tx"].append(int(stats["tx"]["bytes"]))
            counters["rx"].append(int(stats["rx"]["bytes"]))
        return counters


def leftovers(prefix: str) -> list[str]:
    """Namespaces and links whose names start with ``prefix`` (for teardown checks)."""
    names = _run("ip", "netns", "list", check=False).stdout.split()
    links = _run("ip", "-o", "link", "show", check=False).stdout
    found = [n for n in names if n.startswith(prefix)]
    found += [m for m in re.findall(r"^\d+: ([^:@]+)", links, re.M) if m.startswith(prefix)]
    return found
