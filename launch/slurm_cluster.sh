#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, to try launch/slurm.sbatch on a laptop (and to
# test it: tests/cluster/test_slurm.py). Needs root and Debian/Ubuntu (apt):
#
#   sudo launch/slurm_cluster.sh start      # install, configure, start (does nothing if up)
#   export SLURM_CONF=/tmp/daso-slurm/slurm.conf   # or: eval "$(launch/slurm_cluster.sh env)"
#   sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 \
#       launch/slurm.sbatch configs/mnist_cnn_daso.yaml
#   sinfo; squeue; tail -f slurm-<jobid>.out
#   sudo launch/slurm_cluster.sh status
#   sudo launch/slurm_cluster.sh stop       # stops exactly the daemons `start` started
#
# `start` installs the Debian packages slurm-wlm, munge, libpmix2 and libpmix-dev if missing
# (Slurm 22.05 on bookworm), writes slurm.conf into its own folder ($DASO_SLURM_DIR, default
# /tmp/daso-slurm: config, state, spool, logs, pid files, its own munge socket and key), and starts
# munged (as user munge), slurmctld and two slurmd, `slurmd -N n1` and `slurmd -N n2`, one per
# node name, on ports $DASO_SLURM_PORT+1 and +2 (default 6917 for slurmctld). Nothing under /etc
# changes and a munged or Slurm of the system keeps running: the clients find this cluster through
# SLURM_CONF.
#
# Each node declares $DASO_SLURM_CPUS CPUs (default 2, whatever the host has:
# SlurmdParameters=config_overrides), so 2 nodes x 2 tasks fit on a 2-core machine. Use
# `srun --mpi=pmi2`: MPICH from PyPI then forms one MPI world across both nodes (pmix does
# not). AuthInfo=cred_expire=10 shortens the hold on a requeued job (otherwise about two minutes
# before it starts again).
set -euo pipefail

dir=${DASO_SLURM_DIR:-/tmp/daso-slurm}
port=${DASO_SLURM_PORT:-6917}
cpus=${DASO_SLURM_CPUS:-2}
nodes=(n1 n2)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

die() { echo "slurm_cluster: $*" >&2; exit 1; }
say() { echo "slurm_cluster: $*" >&2; }

# The pid in FILE if that process is alive and runs PROGRAM.
alive() {
  local file=$1 program=$2 pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] || return 1
  [[ $(</proc/"$pid"/comm) == "$program"* ]] || return 1
  echo "$pid"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  compgen -G "/usr/lib/*/slurm-wlm/mpi_pmi2.so" >/dev/null || missing+=(slurm-wlm)
  dpkg -s libpmix2 >/dev/null 2>&1 || missing+=(libpmix2)
  dpkg -s libpmix-dev >/dev/null 2>&1 || missing+=(libpmix-dev)
  [[ ${#missing[@]} -eq 0 ]] && return
  command -v apt-get >/dev/null || die "no apt-get: install Slurm and munge by hand (need: ${missing[*]})"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq -o Dpkg::Options::=--force-confold slurm-wlm munge libpmix2 libpmix-dev >&2
}

changed=0
write_config() {
  local host
  host=$(hostname -s)
  mkdir -p "$dir"/{state,log} "${nodes[@]/#/$dir/spool/}"
  chmod 755 "$dir"
  local tmp=$conf.tmp
  cat >"$tmp" <<EOF
# Written by launch/slurm_cluster.sh: two nodes on one host ($host).
ClusterName=daso
SlurmctldHost=$host
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
# schedule every 2 s, not every 30-60 s: a requeued job starts again soon after its hold
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$tmp" "$conf"; then
    rm "$tmp"
  else
    mv "$tmp" "$conf"
    changed=1
  fi
}

start_munge() {
  local m=$dir/munge
  alive "$m/munged.pid" munged >/dev/null && return
  mkdir -p "$m"
  chown munge:munge "$m"
  chmod 755 "$m"
  if [[ ! -s $m/munge.key ]]; then
    if command -v mungekey >/dev/null; then
      runuser -u munge -- mungekey --create --keyfile="$m/munge.key"
    else
      dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none
      chown munge:munge "$m/munge.key"
    fi
    chmod 600 "$m/munge.key"
  fi
  say "starting munged"
  runuser -u munge -- munged --socket="$m/munge.socket.2" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
    </dev/null >/dev/null 2>&1
}

start_slurm() {
  if ! alive "$dir/slurmctld.pid" slurmctld >/dev/null; then
    say "starting slurmctld on port $port"
    slurmctld -f "$conf" </dev/null >/dev/null 2>&1
  fi
  local node
  for node in "${nodes[@]}"; do
    alive "$dir/slurmd-$node.pid" slurmd >/dev/null && continue
    say "starting slurmd -N $node"
    slurmd -f "$conf" -N "$node" </dev/null >/dev/null 2>&1
  done
}

wait_idle() {
  local i states
  for ((i = 0; i < 60; i++)); do
    states=$(sinfo -h -N -o "%N=%t" 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [[ $states == *n1=idle* && $states == *n2=idle* ]] ||
      [[ $states =~ n1=(idle|mix|alloc) && $states =~ n2=(idle|mix|alloc) ]]; then
      say "up: $states(SLURM_CONF=$conf)"
      return
    fi
    if [[ $states =~ (down|drain) ]] && ((i % 5 == 4)); then
      scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
  done
  die "nodes not idle after 60 s: ${states:-no answer from slurmctld}; see $dir/log"
}

stop_all() {
  if alive "$dir/slurmctld.pid" slurmctld >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086 # one job id per word
      scancel $jobs || true
      for _ in {1..30}; do
        [[ -z $(squeue -h -o %i -t running,completing 2>/dev/null) ]] && break
        sleep 1
      done
    fi
  fi
  local file program pid
  for file in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [[ -e $file ]] || continue
    program=$(basename "$file" .pid)
    program=${program%%-*}
    if pid=$(alive "$file" "$program"); then
      say "stopping $program (pid $pid)"
      kill "$pid"
      for _ in {1..50}; do
        [[ -e /proc/$pid ]] || break
        sleep 0.1
      done
      [[ -e /proc/$pid ]] && kill -KILL "$pid"
    fi
    rm -f "$file"
  done
}

status() {
  local file program pid up=0
  for file in "$dir/munge/munged.pid" "$dir/slurmctld.pid" "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid; do
    program=$(basename "$file" .pid)
    if pid=$(alive "$file" "${program%%-*}"); then
      echo "$program: running (pid $pid)"
    else
      echo "$program: stopped"
      up=1
    fi
  done
  [[ $up -eq 0 ]] && sinfo -N
  return "$up"
}

case "${1:-}" in
  start)
    [[ $(id -u) -eq 0 ]] || die "start needs root (it installs packages and runs the daemons): sudo $0 start"
    install_packages
    write_config
    start_munge
    if [[ $changed -eq 1 ]] && alive "$dir/slurmctld.pid" slurmctld >/dev/null; then
      say "slurm.conf changed: scontrol reconfigure"
      scontrol reconfigure
    fi
    start_slurm
    wait_idle
    ;;
  stop) stop_all ;;
  status) status ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *)
    sed -n '2,12p' "$0" >&2
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
