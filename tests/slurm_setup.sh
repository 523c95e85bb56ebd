#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this machine, for tests/test_slurm.py.
#
#   sudo bash tests/slurm_setup.sh        # install, configure and start; idempotent
#   sudo bash tests/slurm_setup.sh stop   # stop the daemons this script started
#
# Meant for CI and throwaway machines (Debian or Ubuntu, run as root). It installs
# Debian's slurm-wlm and munge where they are missing, writes a cluster config for
# localhost and starts munged, slurmctld and slurmd directly, without systemd. The
# config needs no cgroups either (proctrack/linuxproc, task/none), so it also works
# in containers and sandboxes.
#
# If `sinfo` already reaches a controller, the script leaves that Slurm alone. It never
# overwrites a slurm.conf that it did not write itself.
#
# Exit status: 0 when a node answers and is ready for jobs, 1 otherwise (with the reason
# on stderr). The tests skip, saying why, whenever Slurm is not usable, so a caller
# that wants the rest of its checks to go on can run `bash tests/slurm_setup.sh || true`.

set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by tests/slurm_setup.sh"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

say() { echo "slurm_setup: $*"; }
fail() { echo "slurm_setup: $*" >&2; exit 1; }

slurm_answers() { timeout 10 sinfo --noheader >/dev/null 2>&1; }

node_ready() {
    # sinfo -N prints one line per node: name and state (idle, mixed, alloc, down*, ...)
    local state
    state=$(timeout 10 sinfo --noheader --Node --format='%t' 2>/dev/null | head -n 1)
    case "$state" in
        idle | mix | mixed | alloc | allocated | comp | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# Stop the daemon whose pid file this is, if it runs, and wait until it has gone.
stop_daemon() {
    local pid
    [[ -s "$1" ]] && pid=$(cat "$1") && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    say "stopped $(basename "$1" .pid)"
}

if [[ "${1:-}" == stop ]]; then
    stop_daemon "$RUN_DIR/slurmd.pid"
    stop_daemon "$RUN_DIR/slurmctld.pid"
    stop_daemon /run/munge/munged.pid
    exit 0
fi

if command -v sinfo >/dev/null && slurm_answers; then
    say "a Slurm controller already answers; leaving it as it is"
    sinfo
    node_ready || fail "Slurm answers but no node is ready for jobs (see sinfo above)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || fail "must run as root to install and start Slurm (try sudo)"

# ---- install ----

missing=()
command -v munged >/dev/null || missing+=(munge)
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || fail "Slurm is not installed and there is no apt-get to install ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        fail "apt-get install ${missing[*]} failed"
fi

# ---- configure ----

host=$(hostname -s)
cpus=$(nproc)
# Leave some memory to the machine; Slurm refuses a node that reports less than RealMemory.
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

# multi_node.sbatch points torchrun's rendezvous at the first node by its name.
if ! getent hosts "$host" >/dev/null; then
    echo "127.0.0.1 $host" >>/etc/hosts
    say "added $host to /etc/hosts"
fi

if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script; not touching it. Start that cluster's daemons, or move the file away."
fi

mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
cat >"$CONF" <<EOF
$MARKER for a one-node test cluster on localhost.
ClusterName=localtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge

# No systemd and no cgroups needed: track processes through their parent pids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none

SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# The launch scripts requeue themselves; the tests read finished jobs with scontrol.
JobRequeue=1
MinJobAge=600

StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
say "wrote $CONF (node $host, $cpus CPUs, $mem_mb MB)"

# ---- start ----

if [[ ! -s /etc/munge/munge.key ]]; then
    # The munge package makes a key when it is installed; make one if that did not happen.
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- munged || fail "munged did not start (see /var/log/munge/munged.log)"
fi
for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
done
munge -n | unmunge >/dev/null || fail "munge does not answer"

# Daemons left over from an earlier run would hold the old config.
stop_daemon "$RUN_DIR/slurmd.pid"
stop_daemon "$RUN_DIR/slurmctld.pid"

say "starting slurmctld and slurmd"
slurmctld || fail "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
slurmd || fail "slurmd did not start (see $LOG_DIR/slurmd.log)"

for _ in $(seq 60); do
    node_ready && break
    sleep 1
done
if ! node_ready; then
    sinfo --Node --long >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    fail "the node did not become ready within 60 s"
fi
say "ready"
sinfo --Node --long
