"""Run a command and outlive it if a signal kills it: ``python outlive.py PROGRAM ARGS...``.

MPICH's ``mpiexec`` kills the whole job the moment one process dies, which would leave nothing
of daso's own failure detection to test. Slurm's ``srun`` by default (no
``--kill-on-bad-exit``) lets the other tasks run on, and so does a node that vanishes from the
network. Each rank runs under this wrapper, which keeps the MPI process-manager's file
descriptors open for the child and, if the child is killed by a signal, stays alive itself, so
the launcher notices nothing and the surviving ranks must find the dead one themselves.
"""

from __future__ import annotations

import subprocess
import sys
import time

if __name__ == "__main__":
    code = subprocess.call(sys.argv[1:], close_fds=False)
    if code < 0:
        time.sleep(3600)  # the test's own time limit ends this
    sys.exit(code)
