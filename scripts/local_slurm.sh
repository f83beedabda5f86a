#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (munged, slurmctld, slurmd), as root, for the
# real end-to-end test of `saepipe slurm` (tests/it/slurm.rs). Needs Debian's slurm-wlm and
# munge (`apt-get install -y slurm-wlm munge`). No cgroups: proctrack/linuxproc and
# task/none, so it works in an unprivileged container. State, spool and logs go under
# $SLURM_STATE (default: a fresh temp dir); the config goes to $SLURM_CONF (default
# /etc/slurm/slurm.conf, where sbatch/squeue look). Idempotent: a cluster that already
# answers `sinfo` is left alone. `scripts/local_slurm.sh stop` stops it.
set -euo pipefail

CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
STATE_FILE=/run/saepipe-local-slurm.state

log() { echo "local_slurm: $*" >&2; }

if [ "${1:-}" = stop ]; then
  for pidf in slurmd.pid slurmctld.pid; do
    if [ -f "$STATE_FILE" ] && [ -f "$(cat "$STATE_FILE")/$pidf" ]; then
      kill "$(cat "$(cat "$STATE_FILE")/$pidf")" 2>/dev/null || true
    fi
  done
  exit 0
fi

[ "$(id -u)" = 0 ] || { log "run me as root (the daemons run as root here)"; exit 1; }
for b in munged slurmctld slurmd sinfo sbatch; do
  command -v "$b" >/dev/null || { log "$b not found: apt-get install -y slurm-wlm munge"; exit 1; }
done

if SLURM_CONF="$CONF" timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  log "a cluster already answers sinfo; leaving it as it is"
  sinfo
  exit 0
fi

# 1. munge: a key, then munged as the munge user.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0755 /run/munge
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n </dev/null | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# 2. slurm.conf for this machine.
STATE="${SLURM_STATE:-$(mktemp -d /tmp/saepipe-slurm.XXXXXX)}"
mkdir -p "$STATE/ctld" "$STATE/spool" "$(dirname "$CONF")"
echo "$STATE" > "$STATE_FILE"
CPUS=2
MEM_MB=$(free -m | awk '/^Mem:/{print int($2 * 0.9)}')
cat > "$CONF" <<CONF
# Written by saepipe's scripts/local_slurm.sh: one node, localhost, no cgroups.
ClusterName=saepipe-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
MaxArraySize=1001
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

# 3. The daemons (they fork into the background and write their pid files).
fail() {
  log "$1; logs:"
  tail -n 30 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  exit 1
}
if ! pgrep -x slurmctld >/dev/null; then
  SLURM_CONF="$CONF" slurmctld -i || fail "slurmctld did not start"
fi
if ! pgrep -x slurmd >/dev/null; then
  SLURM_CONF="$CONF" slurmd -N localhost || fail "slurmd did not start"
fi
for _ in $(seq 100); do
  if SLURM_CONF="$CONF" timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    log "cluster up (state in $STATE, config $CONF)"
    SLURM_CONF="$CONF" sinfo
    exit 0
  fi
  sleep 0.2
done
fail "the node did not come up"
