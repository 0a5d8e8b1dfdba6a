#!/usr/bin/env bash
# A real, throw-away Slurm cluster on this one machine for the launcher tests (root, no systemd).
#
#   bash tests/slurm_cluster.sh install          # Debian's slurmctld, slurmd, slurm-client, munge (idempotent)
#   bash tests/slurm_cluster.sh start [NODES]    # munged + slurmctld + NODES slurmd named n1..nN, all on 127.0.0.1
#   bash tests/slurm_cluster.sh stop             # cancel jobs, stop the daemons, restore /etc/hosts
#
# Everything lives in $SFT_SLURM_DIR (default /tmp/sft-slurm); `source $SFT_SLURM_DIR/env.sh` sets SLURM_CONF.
# Gotchas handled: munged wants its socket folder world-searchable; each slurmd needs its own port and spool
# folder (%n in slurm.conf); node names must resolve (an /etc/hosts line, removed on stop);
# SlurmdParameters=config_overrides lets the declared CPUs exceed what the machine has.
set -euo pipefail
STATE=${SFT_SLURM_DIR:-/tmp/sft-slurm}
BASE_PORT=${SFT_SLURM_PORT:-17800}
MARK="# sft-slurm-test"

say() { echo "[slurm] $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  local policy=0
  # Keep the packages from starting daemons with the system-wide configuration while installing.
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1; fi
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  if [ "$policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

configure() {
  local nodes=$1 cpus
  cpus=$(nproc)
  cat >"$STATE/slurm.conf" <<EOF
ClusterName=sfttest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$((BASE_PORT))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.sock
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/pids/slurmctld.pid
SlurmdPidFile=$STATE/pids/slurmd-%n.pid
SlurmctldLogFile=$STATE/logs/slurmctld.log
SlurmdLogFile=$STATE/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
MailProg=/bin/true
SlurmdParameters=config_overrides
PlugStackConfig=$STATE/plugstack.conf
EOF
  : >"$STATE/plugstack.conf"
  local i
  for i in $(seq 1 "$nodes"); do
    echo "NodeName=n$i NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((BASE_PORT + i)) CPUs=$cpus RealMemory=8000 State=UNKNOWN" >>"$STATE/slurm.conf"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$STATE/slurm.conf"
}

daemon() {  # daemon NAME COMMAND...: run in the background, remember its pid
  local name=$1
  shift
  nohup "$@" >"$STATE/logs/$name.out" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.bg"
}

start() {
  local nodes=${1:-2} i
  [ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
  install
  if ls "$STATE"/pids/*.bg >/dev/null 2>&1; then stop; fi
  rm -rf "$STATE"
  mkdir -p "$STATE"/{ctld,logs,pids,munge,key}
  for i in $(seq 1 "$nodes"); do mkdir -p "$STATE/spool/n$i"; done
  chmod 755 "$STATE" "$STATE/munge"
  chmod 700 "$STATE/key"
  configure "$nodes"
  export SLURM_CONF=$STATE/slurm.conf
  echo "export SLURM_CONF=$SLURM_CONF" >"$STATE/env.sh"
  if ! getent hosts n1 >/dev/null; then
    [ -z "$(tail -c1 /etc/hosts)" ] || echo >>/etc/hosts
    echo "127.0.0.1 $(seq -f 'n%g' -s ' ' 1 "$nodes") $MARK" >>/etc/hosts
  fi
  mungekey -c -b 1024 -k "$STATE/key/munge.key" >/dev/null
  daemon munged munged -F --key-file="$STATE/key/munge.key" --socket="$STATE/munge/munge.sock" \
    --pid-file="$STATE/pids/munged.pid" --seed-file="$STATE/key/seed" --log-file="$STATE/logs/munged.log"
  for _ in $(seq 50); do [ -S "$STATE/munge/munge.sock" ] && break; sleep 0.1; done
  daemon slurmctld slurmctld -D -i -f "$SLURM_CONF"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
  for i in $(seq 1 "$nodes"); do daemon "slurmd-n$i" slurmd -D -N "n$i" -f "$SLURM_CONF"; done
  for _ in $(seq 150); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | grep -c ' idle$')" -eq "$nodes" ]; then
      say "$nodes node(s) idle"
      return 0
    fi
    sleep 0.2
  done
  say "nodes not idle after 30 s"
  sinfo -N -l >&2 || true
  tail -n 20 "$STATE"/logs/*.out >&2 || true
  return 1
}

stop() {
  export SLURM_CONF=$STATE/slurm.conf
  if [ -f "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    scancel --full --quiet 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  local file
  for file in "$STATE"/pids/slurmd-*.bg "$STATE"/pids/slurmctld.bg "$STATE"/pids/munged.bg; do
    [ -e "$file" ] || continue
    kill -TERM "$(cat "$file")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(cat "$file")" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$(cat "$file")" 2>/dev/null || true
    rm -f "$file"
  done
  if grep -qF "$MARK" /etc/hosts; then
    grep -vF "$MARK" /etc/hosts >"$STATE/hosts" || true
    cat "$STATE/hosts" >/etc/hosts  # rewrite in place: /etc/hosts may be a bind mount
  fi
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 install | start [NODES] | stop" >&2; exit 2 ;;
esac
