#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for trying slurm/*.sh and `tune-launch submit`
# before touching a real cluster, and for the tests (tests/test_slurm_cluster.py).
#
#   sudo slurm/dev-cluster.sh up       install what is missing (Debian/Ubuntu apt), configure, start; idempotent
#   sudo slurm/dev-cluster.sh status   what runs; exit 0 only when both nodes are idle or busy and accounting answers
#   sudo slurm/dev-cluster.sh down     cancel every job, then stop exactly the daemons `up` started
#
# What runs: munged, mariadbd + slurmdbd (so `sacct` works), slurmctld, and two slurmd (nodes n1 and n2, one CPU
# each, partition "debug"), all on 127.0.0.1. Daemons are stopped by the PIDs in their own PID files, and only
# those `up` started (listed in $STATE_DIR/started): a munged that was already running is left alone.
# /etc/hosts gets "127.0.0.1 n1" and "127.0.0.1 n2" (gloo must resolve the first node's name); they stay.
# The recipe and its measurements: docs/slurm.md.
set -euo pipefail

CHANGED=()
STARTED_NOW=""
STATE_DIR=${TUNE_LAUNCH_DEV_CLUSTER_STATE:-/run/tune-launch-dev-cluster}
CLUSTER=localcluster
MARK="# written by tune-launch slurm/dev-cluster.sh"
WAIT_S=${TUNE_LAUNCH_DEV_CLUSTER_WAIT_S:-60}
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf

say() { echo "dev-cluster: $*"; }
die() { echo "dev-cluster: error: $*" >&2; exit 1; }

# ----------------------------------------------------------------------------------------------- helpers

# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.2 s until COMMAND succeeds, else fail naming what.
wait_for() {
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${limit} s (logs: /var/log/slurm, /var/log/munge, /var/log/mysql)"
        sleep 0.2
    done
}

# alive PIDFILE BINARY: the PID file names a live process running BINARY.
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$2"* ]]
}

mark_started() { grep -qx "$1" "$STATE_DIR/started" 2>/dev/null || echo "$1" >>"$STATE_DIR/started"; }
we_started() { grep -qx "$1" "$STATE_DIR/started" 2>/dev/null; }

# name pidfile binary: one line per daemon.
daemons() {
    cat <<EOF
munged /run/munge/munged.pid /usr/sbin/munged
mariadbd /run/mysqld/mysqld.pid /usr/sbin/mariadbd
slurmdbd /run/slurm/slurmdbd.pid /usr/sbin/slurmdbd
slurmctld /run/slurm/slurmctld.pid /usr/sbin/slurmctld
slurmd-n1 /run/slurm/slurmd-n1.pid /usr/sbin/slurmd
slurmd-n2 /run/slurm/slurmd-n2.pid /usr/sbin/slurmd
EOF
}

pidfile_of() { daemons | awk -v n="$1" '$1 == n {print $2}'; }
binary_of() { daemons | awk -v n="$1" '$1 == n {print $3}'; }

# ----------------------------------------------------------------------------------------------- install + configure

install_packages() {
    local missing=()
    for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/slurmdbd /usr/sbin/munged /usr/sbin/mariadbd /usr/bin/sbatch; do
        [[ -x $bin ]] || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install ${PACKAGES[*]} yourself"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

hosts_entries() {
    local n
    for n in n1 n2; do
        grep -Eq "^[[:space:]]*127\.0\.0\.1([[:space:]]+[^[:space:]]+)*[[:space:]]+$n([[:space:]]|$)" /etc/hosts \
            || echo "127.0.0.1 $n" >>/etc/hosts
    done
}

directories() {
    install -d -o slurm -g slurm /run/slurm /var/log/slurm /var/spool/slurmctld
    install -d -o root -g root /var/spool/slurmd/n1 /var/spool/slurmd/n2
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o mysql -g mysql /run/mysqld /var/log/mysql
    install -d -m 0700 "$STATE_DIR"
    [[ -s /etc/munge/munge.key ]] || {
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    }
}

# write_conf PATH MODE OWNER < content: refuses to replace a configuration this script did not write.
write_conf() {
    local path=$1 mode=$2 owner=$3 tmp
    if [[ -e $path ]] && ! grep -qF "$MARK" "$path"; then
        die "$path exists and was not written by this script; move it away to use the dev cluster here"
    fi
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    cmp -s "$tmp" "$path" || CHANGED+=("$path")
    mv -f "$tmp" "$path"
}

configure() {
    install -d /etc/slurm
    write_conf "$SLURM_CONF" 0644 root:root <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it can start again (default 120).
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
StateSaveLocation=/var/spool/slurmctld
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdParameters=config_overrides
# No cgroup freezer in containers: track processes by their parent.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobRequeue=1
# Refuse at submission a job the partition can never run (more nodes than it has) instead of pending forever.
EnforcePartLimits=ALL
MailProg=/bin/true
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=1 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    local pass
    if [[ -s $DBD_CONF ]] && grep -qF "$MARK" "$DBD_CONF"; then
        pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")
    fi
    [[ -n ${pass:-} ]] || pass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    write_conf "$DBD_CONF" 0600 slurm:slurm <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
}

# ----------------------------------------------------------------------------------------------- start

# start NAME COMMAND...: unless its PID file names a live process, run COMMAND and remember we started it.
start() {
    local name=$1; shift
    alive "$(pidfile_of "$name")" "$(binary_of "$name")" && return 0
    "$@" </dev/null >>"/var/log/slurm/dev-cluster-$name.out" 2>&1 \
        || die "$name failed to start (exit $?); see /var/log/slurm/dev-cluster-$name.out and its own log"
    mark_started "$name"
    STARTED_NOW+=" $name"
    wait_for "$WAIT_S" "$name (PID file)" alive "$(pidfile_of "$name")" "$(binary_of "$name")"
}

database() {
    local pass
    pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF")
    mariadb --protocol=socket -S /run/mysqld/mysqld.sock -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_mariadb() {
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid --skip-networking --log-error=/var/log/mysql/error.log &
    disown
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
    grep -Eq '^n1 (idle|alloc|mix|comp)$' <<<"$states" && grep -Eq '^n2 (idle|alloc|mix|comp)$' <<<"$states"
}

cmd_up() {
    install_packages
    hosts_entries
    directories
    configure
    start munged runuser -u munge -- /usr/sbin/munged
    wait_for "$WAIT_S" munge sh -c 'munge -n | unmunge'
    start mariadbd start_mariadb
    wait_for "$WAIT_S" mariadbd mariadb-admin --protocol=socket -S /run/mysqld/mysqld.sock ping
    database
    start slurmdbd /usr/sbin/slurmdbd
    wait_for "$WAIT_S" slurmdbd sacctmgr -n show cluster
    sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    start slurmctld /usr/sbin/slurmctld
    wait_for "$WAIT_S" slurmctld sh -c 'scontrol ping | grep -q UP'
    start slurmd-n1 /usr/sbin/slurmd -N n1
    start slurmd-n2 /usr/sbin/slurmd -N n2
    # A configuration rewritten while the daemons ran: make them read it.
    if ((${#CHANGED[@]})) && [[ $STARTED_NOW != *slurmctld* ]]; then
        say "configuration changed (${CHANGED[*]}): scontrol reconfigure"
        scontrol reconfigure
    fi
    # A drain left by an earlier bad configuration survives restarts in StateSaveLocation.
    if sinfo -h -N -o '%N %t' | grep -Eq '(drain|drng|down|inval|fail)'; then
        scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    fi
    wait_for "$WAIT_S" "nodes n1 and n2 (idle)" nodes_idle
    say "up: partition debug, nodes n1 n2 ($(sinfo -h -N -o '%N=%t' | sort -u | tr '\n' ' '))"
}

# ----------------------------------------------------------------------------------------------- stop

cancel_jobs() {
    command -v squeue >/dev/null || return 0
    scontrol ping 2>/dev/null | grep -q UP || return 0
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    [[ -z $jobs ]] && return 0
    say "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while [[ -n $(squeue -h -o %i 2>/dev/null || true) ]] && ((SECONDS < deadline)); do sleep 0.3; done
    [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] || say "warning: jobs still listed after 30 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

# stop NAME...: SIGTERM every named daemon we started (together), then wait for each, SIGKILL after 20 s.
stop() {
    local name pidfile pids=() names=()
    for name in "$@"; do
        we_started "$name" || continue
        pidfile=$(pidfile_of "$name")
        if alive "$pidfile" "$(binary_of "$name")"; then
            pids+=("$(<"$pidfile")")
            names+=("$name")
            kill -TERM "$(<"$pidfile")" 2>/dev/null || true
        fi
        sed -i "/^$name\$/d" "$STATE_DIR/started"
    done
    local i deadline=$((SECONDS + 20))
    for i in "${!pids[@]}"; do
        while kill -0 "${pids[$i]}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            say "warning: ${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 20 s; SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    ((${#names[@]} == 0)) || say "stopped ${names[*]}"
}

cmd_down() {
    [[ -f $STATE_DIR/started ]] || { say "nothing started by this script is running"; return 0; }
    cancel_jobs
    stop slurmd-n1 slurmd-n2 slurmctld slurmdbd
    stop mariadbd
    stop munged
    rm -f "$STATE_DIR/started"
}

# ----------------------------------------------------------------------------------------------- status

cmd_status() {
    local ok=0 name pidfile binary state
    while read -r name pidfile binary; do
        if alive "$pidfile" "$binary"; then state="running (pid $(<"$pidfile"))"; else state="stopped"; ok=1; fi
        we_started "$name" && state+=", started by dev-cluster.sh"
        printf '%-10s %s\n' "$name" "$state"
    done < <(daemons)
    if ((ok == 0)); then
        sinfo -h -N -o 'node %N %t' | sort -u || ok=1
        nodes_idle || ok=1
        sacct -n -X -S now-1minutes >/dev/null 2>&1 || { echo "accounting: sacct fails"; ok=1; }
    fi
    return $ok
}

# ----------------------------------------------------------------------------------------------- main

main() {
    local cmd=${1:-}
    case $cmd in
        up|down|status) ;;
        *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
    esac
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"
    "cmd_$cmd"
}

main "$@"
