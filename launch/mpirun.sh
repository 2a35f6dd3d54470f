#!/usr/bin/env bash
# DASO with mpirun across hosts (Open MPI or MPICH): one process per GPU.
#
#   launch/mpirun.sh HOSTFILE RANKS CONFIG [--set key=value ...]
#
# Hosts in HOSTFILE are the nodes; daso groups ranks by host name, so no override is needed.
set -euo pipefail
hostfile=$1 ranks=$2; shift 2
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  exec mpirun --hostfile "$hostfile" -np "$ranks" --map-by ppr:4:node -x OMP_NUM_THREADS=1 \
    python -m daso.cli train --config "$@"
fi
exec mpirun -f "$hostfile" -n "$ranks" -ppn 4 -genv OMP_NUM_THREADS 1 python -m daso.cli train --config "$@"
