#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try scripts/slurm_decree.sbatch for real (CI does; see docs/sweeps.md).
# Run as root on a throwaway machine or container, after:  apt-get install -y slurm-wlm munge
#
#   scripts/slurm_local.sh start    # munge key, /etc/slurm/slurm.conf (this host is the only node), daemons
#   scripts/slurm_local.sh stop     # end the daemons (the config stays)
#
# Jobs run as the submitting user, with the submitter's environment (sbatch's default --export=ALL). The node
# offers this machine's real CPUs and memory; no cgroups (proctrack/linuxproc, task/none), so it also works in
# containers. An /etc/slurm/slurm.conf that this script did not write is never overwritten.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by decree scripts/slurm_local.sh"
LOGS=/var/log/slurm-local

die() { echo "slurm_local.sh: error: $*" >&2; exit 2; }

write_config() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away or use that cluster"
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
    cat > "$CONF" <<EOF
$MARK
ClusterName=decree-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
}

wait_for_node() {
    local i state
    for i in $(seq 1 60); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
        case $state in
            idle|mixed|allocated) echo "slurm_local.sh: node $(hostname -s) is $state"; return 0;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true;;
        esac
        sleep 0.5
    done
    die "the node did not come up within 30 s; see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "run as root (it writes $CONF and starts system daemons)"
    command -v slurmctld >/dev/null || die "Slurm is not installed: apt-get install -y slurm-wlm munge"
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    wait_for_node
}

stop() {
    local pidfile
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
}

case ${1:-} in
    start) start;;
    stop) stop;;
    *) die "usage: scripts/slurm_local.sh start|stop";;
esac
