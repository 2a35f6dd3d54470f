#!/usr/bin/env bash
# Run a daso config on this machine as N emulated nodes x M ranks (MPI processes).
#
#   launch/local.sh [--nodes N] [--ranks-per-node M | --layout 2,1] CONFIG [daso train args...]
#
# Uses the checkout's .venv (its own mpiexec and python), so a system MPI on the PATH does not
# interfere. Nodes are emulated with DASO_RANKS_PER_NODE: ranks 0..M-1 form node 0, and so on.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${DASO_VENV:-$here/.venv}
nodes=2 per_node=2 layout=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --ranks-per-node) per_node=$2; shift 2 ;;
    --layout) layout=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "usage: $0 [--nodes N] [--ranks-per-node M | --layout L] CONFIG [args]" >&2; exit 2; }
config=$1; shift
if [[ -n "$layout" ]]; then
  IFS=, read -ra counts <<<"$layout"
  world=0; for c in "${counts[@]}"; do world=$((world + c)); done
else
  layout=$per_node; world=$((nodes * per_node))
fi
[[ -x "$venv/bin/mpiexec" ]] || { echo "no $venv/bin/mpiexec: run 'make install' first" >&2; exit 2; }
echo "daso: $world ranks as nodes of [$layout] ranks, config $config" >&2
# mpiexec hands the ranks pipes, not this terminal: say which progress display fits (a bar on
# a terminal, periodic lines in a log file); a --set of the caller's comes later and wins
progress=lines
[[ -t 2 ]] && progress=bar
exec "$venv/bin/mpiexec" -n "$world" -genv DASO_RANKS_PER_NODE "$layout" \
  "$venv/bin/python" -m daso.cli train --config "$config" --set "trainer.progress=$progress" "$@"
