#!/usr/bin/env bash
# A two-node Slurm cluster on one host for the slurm-marked tests: nodes n1 and n2 are two
# slurmd daemons on their own ports (Debian's build supports several slurmd per host).
#
#   tests/distributed/slurm_cluster.sh install   # apt-get munge/slurmctld/slurmd/slurm-client if missing
#   tests/distributed/slurm_cluster.sh start     # writes $SLURM_CI_DIR/slurm.conf, starts the daemons
#   tests/distributed/slurm_cluster.sh stop      # stops what start started, by pid file
#   tests/distributed/slurm_cluster.sh env       # prints "export SLURM_CONF=..." for clients
#
# Needs root (slurmd runs jobs as their user). Every client call is wrapped in `timeout 5`: with
# slurmctld down, sinfo/squeue block for 10 s or more each.
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/dist-reid-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,log,run}
  cat >"$CONF" <<CONF
ClusterName=ci
SlurmctldHost=${HOST}
SlurmctldPort=${SLURM_CI_CTLD_PORT:-16817}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=30
NodeName=n1 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=${SLURM_CI_PORT1:-17001} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=${SLURM_CI_PORT2:-17002} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm_cluster.sh: must run as root" >&2; exit 2; }
  write_conf
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/run/started-munge"  # stop only a munged we started
  fi
  alive "$DIR/run/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
  for n in n1 n2; do
    alive "$DIR/run/slurmd-$n.pid" || /usr/sbin/slurmd -f "$CONF" -N "$n"
  done
  for _ in $(seq 120); do
    if [ "$(SLURM_CONF=$CONF timeout 5 sinfo -h -t idle -o %D 2>/dev/null)" = 2 ]; then
      echo "slurm_cluster.sh: n1 and n2 idle"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm_cluster.sh: nodes did not become idle; see $DIR/log" >&2
  exit 1
}

stop() {
  local pids=()
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do
    alive "$f" && pids+=("$(cat "$f")")
  done
  if [ -f "$DIR/run/started-munge" ] && alive /run/munge/munged.pid; then
    pids+=("$(cat /run/munge/munged.pid)")
    rm -f "$DIR/run/started-munge"
  fi
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}"
  for _ in $(seq 40); do
    local running=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && running=1; done
    [ $running = 0 ] && return 0
    sleep 0.25
  done
  echo "slurm_cluster.sh: daemons still running: ${pids[*]}" >&2
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
