#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine: the whole machine is one node (its own host name,
# cores and memory) in one partition, `debug`. It is how CI runs the tests marked `slurm`, and a way
# to try the job scripts of examples/slurm/ before a real cluster.
#
#   sudo bash .ci/start_slurm.sh
#
# Needs root on Debian or Ubuntu: it installs slurm-wlm and munge with apt-get (when missing),
# creates munge's key (when missing), writes /etc/slurm/slurm.conf, and starts munged, slurmctld and
# slurmd. Running it again does nothing that is already done; an /etc/slurm/slurm.conf that this
# script did not write (a real cluster's) is left alone and the script stops. No systemd is needed.
# The daemons log to /var/log/slurm/. To stop them: kill the PIDs in /run/slurmctld.pid and
# /run/slurmd.pid, then munged's (`pidof munged`).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by .ci/start_slurm.sh (fcdensenet-microscopy): a one-node test cluster"

if [ "$(id -u)" != 0 ]; then
    echo "error: $0 must run as root (it installs packages, writes /etc/slurm and starts daemons)" >&2
    exit 1
fi
if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    echo "error: $CONF exists and this script did not write it: a real cluster's configuration is left alone" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi

# munge signs every message between the SLURM commands and daemons with a key the node shares
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- munged
fi

# The node line as slurmd itself measures this machine (host name, CPUs, sockets, cores, memory).
# Memory is not a consumable resource (CR_Core): jobs share it, as they do on a workstation.
# linuxproc tracks a job's processes through their parents, so no cgroup setup is needed.
NODE=$(slurmd -C | head -n 1)
HOST=$(hostname -s)
NEW=$(mktemp)
cat >"$NEW" <<EOF
$MARK
ClusterName=fcdn-test
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=30
MinJobAge=600
$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
CHANGED=0
if ! cmp -s "$NEW" "$CONF"; then
    install -m 644 "$NEW" "$CONF"
    CHANGED=1
fi
rm -f "$NEW"
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
install -d /var/lib/slurm/slurmd

running() {  # the daemon whose PID file is $1 is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
if [ "$CHANGED" = 1 ] && running /run/slurmctld.pid; then
    scontrol reconfigure
fi
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd

# ready when the node takes jobs (a node that was down is resumed: ReturnToService brings it back)
for _ in $(seq 60); do
    STATE=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    case "$STATE" in
        idle|mix|alloc) echo "SLURM is up: node $HOST ($STATE) in partition debug"; exit 0 ;;
        down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "error: the SLURM node $HOST did not become ready in 60 s (state '${STATE:-unknown}'); see /var/log/slurm/" >&2
exit 1
