#!/usr/bin/env bash
# A real single-node SLURM on this machine, for trying the launchers and for tests.
#
#   eval "$(bash tools/local_slurm.sh up)"   # install if missing, start munged + slurmctld
#                                            # + slurmd, wait for the node; prints the
#                                            # `export SLURM_CONF=...` line (logs: stderr)
#   bash tools/local_slurm.sh status   # daemons, sinfo, squeue
#   bash tools/local_slurm.sh env      # the export line again
#   bash tools/local_slurm.sh down     # cancel jobs, stop the daemons this script started
#
# Debian/Ubuntu, as root (munged and slurmd need it). `up` is idempotent: daemons that
# are already running are left alone; a munged that already answers is shared (and
# then left running by `down`). Everything lives in one scratch directory
# ($CMSCALE_SLURM_DIR, default /tmp/cmscale-slurm): slurm.conf, state, spool, logs.
# Clients find the cluster through SLURM_CONF, so nothing is written to /etc/slurm.
# Timing on a 2-core Debian 12 machine: about 1.5 s with the packages installed,
# plus about 5-25 s for apt-get the first time.
#
# Settings (environment):
#   CMSCALE_SLURM_DIR    scratch directory                        (/tmp/cmscale-slurm)
#   CMSCALE_SLURM_PORT   slurmctld port; slurmd uses PORT+1        (6917)
#                        not SLURM's 6817/6818, so that it can run next to another SLURM
#   CMSCALE_SLURM_CPUS   CPUs of the node                         ($(nproc))
#   CMSCALE_SLURM_GPUS   GPUs the node advertises (no devices: lets `--gpus-per-node=2`
#                        scripts be tried on a CPU machine; the trainer then uses gloo) (2)
#
# What the configuration is for (SLURM 22.05, Debian 12):
# - SlurmUser/SlurmdUser root, proctrack/linuxproc, task/none, no accounting: no cgroups,
#   no database, works in a container.
# - JobRequeue=1: batch jobs may be requeued (`scontrol requeue`, our launchers' path).
# - MinJobAge=600: finished jobs stay visible to `scontrol show job` for 10 minutes;
#   without accounting that is the only place their state and exit code can be read.
# - KillWait=10: 10 s between SIGTERM and SIGKILL on cancel/time limit (default 30).
# - SchedulerParameters=sched_interval=2: the main scheduler runs every 2 s instead of
#   60 s, so a requeued job released with `scontrol update JobId=N StartTime=now`
#   starts within seconds. (A requeued job is held ~120 s; release it no sooner than
#   ~1 s after its previous run ended, or slurmd kills the relaunch with "Job
#   credential revoked": the revocation has a 1-second timestamp.)
# - GresTypes=gpu with empty files as devices: see CMSCALE_SLURM_GPUS.
# - MaxJobCount=10000, a default partition with DefaultTime=60 and MaxTime=2-00:00:00:
#   generous but finite.
set -euo pipefail

dir=${CMSCALE_SLURM_DIR:-/tmp/cmscale-slurm}
port=${CMSCALE_SLURM_PORT:-6917}
cpus=${CMSCALE_SLURM_CPUS:-$(nproc)}
gpus=${CMSCALE_SLURM_GPUS:-2}
conf=$dir/slurm.conf
node=$(hostname -s)
munge_socket=/run/munge/munge.socket.2

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid from a pid file if that process is alive and runs `name` (pid files outlive reboots
# and containers; a recycled pid must not be mistaken for our daemon).
live_pid() {
    local pidfile=$1 name=$2 pid
    [ -r "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name" || return 1
    echo "$pid"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

munge_ok() { munge -n -S "$munge_socket" 2>/dev/null | unmunge -S "$munge_socket" >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return 0  # a munged is running (ours or the system's): share it
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey -c -f -k /etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    # munged refuses to run as root; run it as its own user.
    runuser -u munge -- munged
    # Remember that this script started it, so that `down` stops it and nothing else.
    cp /run/munge/munged.pid "$dir/munged.pid" 2>/dev/null || true
    local _
    for _ in $(seq 50); do
        munge_ok && return 0
        sleep 0.1
    done
    die "munged did not start"
}

write_conf() {
    local gres_types="" node_gres=""
    if [ "$gpus" -gt 0 ]; then
        # SLURM drops GPUs without device files, so give it empty regular files: it
        # counts and hands them out (CUDA_VISIBLE_DEVICES), no driver is involved.
        gres_types="GresTypes=gpu"
        node_gres="Gres=gpu:$gpus"
        mkdir -p "$dir/dev"
        local k
        for k in $(seq 0 $((gpus - 1))); do : >"$dir/dev/fakegpu$k"; done
        echo "NodeName=$node Name=gpu File=$dir/dev/fakegpu[0-$((gpus - 1))]" >"$dir/gres.conf.new"
    else
        : >"$dir/gres.conf.new"
    fi
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$dir/slurm.conf.new" <<EOF
# Written by tools/local_slurm.sh; regenerated on every \`up\` while the daemons are down.
ClusterName=cmscale
SlurmctldHost=$node
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
JobRequeue=1
MaxJobCount=10000
MinJobAge=600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
$gres_types
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=local Nodes=$node Default=YES DefaultTime=60 MaxTime=2-00:00:00 State=UP
EOF
}

node_state() { sinfo -h -n "$node" -o %T 2>/dev/null | head -n1; }

up() {
    [ "$(id -u)" -eq 0 ] || die "run as root (munged and slurmd need it)"
    install_packages
    mkdir -p "$dir/spool" "$dir/state" "$dir/log"
    start_munge
    local ctld_pid slurmd_pid
    ctld_pid=$(live_pid "$dir/slurmctld.pid" slurmctld) || ctld_pid=""
    slurmd_pid=$(live_pid "$dir/slurmd.pid" slurmd) || slurmd_pid=""
    write_conf
    if [ -z "$ctld_pid" ] && [ -z "$slurmd_pid" ]; then
        mv "$dir/slurm.conf.new" "$conf"
        mv "$dir/gres.conf.new" "$dir/gres.conf"
    else
        if ! cmp -s "$dir/slurm.conf.new" "$conf"; then
            log "note: settings changed but daemons are running; \`down\` then \`up\` to apply"
        fi
        rm -f "$dir/slurm.conf.new" "$dir/gres.conf.new"
    fi
    export SLURM_CONF=$conf
    [ -n "$ctld_pid" ] || slurmctld -f "$conf"
    [ -n "$slurmd_pid" ] || slurmd -f "$conf"
    local _ state=""
    for _ in $(seq 120); do
        state=$(node_state) || state=""
        case $state in
            idle | mixed | allocated | completing) break ;;
            down* | drain* | fail*)
                scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case $state in
        idle | mixed | allocated | completing) ;;
        *) die "node $node is '${state:-unreachable}' after 60 s; see $dir/log/" ;;
    esac
    log "up: node $node $state, $cpus CPUs, $gpus GPUs (fake), logs in $dir/log/"
    echo "export SLURM_CONF=$conf"
}

stop_pid() {
    local pid=$1 _
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    local pid _
    # Cancel the jobs first: their job scripts and steps run under slurmstepd, which
    # outlives slurmd. Then slurmd, then the controller.
    if live_pid "$dir/slurmctld.pid" slurmctld >/dev/null; then
        export SLURM_CONF=$conf
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null) || jobs=""
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086  # one job id per word
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do
                [ -z "$(squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    if pid=$(live_pid "$dir/slurmd.pid" slurmd); then stop_pid "$pid"; fi
    if pid=$(live_pid "$dir/slurmctld.pid" slurmctld); then stop_pid "$pid"; fi
    if pid=$(live_pid "$dir/munged.pid" munged); then stop_pid "$pid"; fi
    rm -f "$dir/munged.pid"
    log "down (state kept in $dir; remove it for a fresh cluster)"
}

status() {
    local pid name rc=0
    for name in slurmctld slurmd; do
        if pid=$(live_pid "$dir/$name.pid" "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            rc=1
        fi
    done
    if munge_ok; then echo "munged: running"; else echo "munged: stopped"; rc=1; fi
    if [ "$rc" -eq 0 ]; then
        export SLURM_CONF=$conf
        sinfo || rc=1
        squeue || rc=1
        echo "export SLURM_CONF=$conf"
    fi
    return "$rc"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *)
        echo "usage: bash tools/local_slurm.sh {up|down|status|env}" >&2
        exit 2
        ;;
esac
