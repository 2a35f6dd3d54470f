#!/usr/bin/env bash
# DASO with mpirun across hosts (Open MPI or MPICH): RANKS_PER_NODE processes on every host.
#
#   launch/mpirun.sh HOSTFILE RANKS_PER_NODE CONFIG [daso train args: --set key=value ...]
#   launch/mpirun.sh HOSTFILE RANKS_PER_NODE --script my_train.py [args ...]
#
# HOSTFILE lists one host per line (Open MPI's `host slots=4` or MPICH's `host:4` both work; only
# the name counts); the job runs RANKS_PER_NODE ranks on each, e.g. one per GPU. daso groups
# ranks by host name, so no layout override is needed. With --script, your own script runs
# instead of `daso train` (wrap its main in daso.run(main) for the exit codes, see the README).
#
# Every rank gets this shell's environment as a venv needs it: Open MPI forwards PATH,
# LD_LIBRARY_PATH, VIRTUAL_ENV, PYTHONPATH, OMP_NUM_THREADS and every DASO_*/NCCL_* variable
# that is set (-x), MPICH all of it (-genvall). Python is `python` on PATH (activate the venv),
# or DASO_PYTHON; mpirun is `mpirun` on PATH, or DASO_MPIRUN. OMP_NUM_THREADS defaults to 1.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
hostfile=$1 per_node=$2
shift 2
[[ -r $hostfile ]] || { echo "mpirun.sh: cannot read hostfile $hostfile" >&2; exit 2; }
[[ $per_node =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: RANKS_PER_NODE must be a positive integer, not '$per_node'" >&2; exit 2; }
hosts=$(sed -e 's/#.*//' "$hostfile" | awk '{sub(/:.*/, "", $1); if ($1 != "") print $1}' | sort -u | wc -l)
[[ $hosts -ge 1 ]] || { echo "mpirun.sh: no hosts in $hostfile" >&2; exit 2; }
ranks=$((hosts * per_node))
python=${DASO_PYTHON:-python}
mpirun=${DASO_MPIRUN:-mpirun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ ${1:-} == --script ]]; then
  shift
  program=("$python" "$@")
else
  program=("$python" -m daso.cli train --config "$@")
fi
echo "mpirun.sh: $hosts host(s) x $per_node rank(s) = $ranks ranks: ${program[*]}" >&2
if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
  forward=()
  for name in PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH OMP_NUM_THREADS $(compgen -e | grep -E '^(DASO|NCCL)_' || true); do
    [[ -n ${!name+set} ]] && forward+=(-x "$name")
  done
  exec "$mpirun" --hostfile "$hostfile" -np "$ranks" --map-by "ppr:$per_node:node" "${forward[@]}" \
    "${program[@]}"
fi
exec "$mpirun" -f "$hostfile" -n "$ranks" -ppn "$per_node" -genvall "${program[@]}"
