#!/usr/bin/env bash
# The shared launcher behind launch/<recipe>.sh (and launch/mpi.sh).
#
#   sbatch launch/lsun_cat_ct.sh [key=value ...]    # the usual way (per-recipe #SBATCH lines)
#   bash launch/common.sh RECIPE [key=value ...]    # what those scripts run, inside a job
#
# Inside a SLURM job it starts one trainer per task,
#
#   srun --kill-on-bad-exit=1 python -m cmscale.train --config configs/RECIPE.yaml \
#        --run-dir RUN_DIR [key=value ...]
#
# in the background and waits, so that this batch shell can take SLURM's pre-timeout
# warning (`#SBATCH --signal=B:USR1@600`) and pass it on to the tasks. The trainer then
# checkpoints at the next step boundary and exits with its "requeue me" code (75, see
# EXIT_REQUEUE in cmscale/dist.py); this script then runs `scontrol requeue`, and the
# job starts again later with the same job id, hence the same run directory, and the
# trainer resumes from its newest complete checkpoint. Exit 0 (training finished) ends
# the job; any other code fails it without requeueing.
#
# Why every task runs under launch/task.sh: srun --kill-on-bad-exit=1 kills every task as
# soon as one exits non-zero, and then reports 143 (SIGTERM), not 75: the first rank to
# exit with the requeue code would kill the others while they finish their shutdown, and
# the code would be lost. task.sh turns the requeue code into exit 0 plus a marker file.
#
# Environment (all optional):
#   RUN_DIR                run directory                  (runs/RECIPE-JOBID in the repo;
#                          SLURM_JOB_ID survives requeues; array jobs: JOBID_TASKID)
#   CMSCALE_RUNS           parent of default run dirs     (REPO/runs)
#   CMSCALE_PYTHON         interpreter                    (python; e.g. .venv/bin/python)
#   CMSCALE_TRAIN_MODULE   module run with -m             (cmscale.train; tests use a fake)
#   CMSCALE_CONFIG         recipe YAML                    (REPO/configs/RECIPE.yaml)
#   CMSCALE_MAX_REQUEUES   requeues allowed, compared with SLURM_RESTART_COUNT (20)
#   CMSCALE_MAX_STALLED_REQUEUES  requeues in a row allowed without a newer complete
#                          checkpoint (2): a job that stops before it makes progress is
#                          a persistent failure, not a time limit
#   CMSCALE_EXIT_REQUEUE   the trainer's requeue exit code (75 = cmscale.dist.EXIT_REQUEUE)
#   CMSCALE_SRUN_ARGS      extra srun options, split on spaces (e.g. "--cpu-bind=none")
#   CMSCALE_LAUNCHER       srun (default) or mpi (mpiexec; set by launch/mpi.sh)
#   OMP_NUM_THREADS        (1 on GPU nodes, else SLURM_CPUS_PER_TASK)
#   NCCL_DEBUG, TORCH_NCCL_ASYNC_ERROR_HANDLING  defaults WARN and 1; NCCL_SOCKET_IFNAME
#                          and friends are site-specific: set them in your environment.
#
# Signals seen by the batch shell:
#   USR1/USR2  the time-limit warning: forwarded to the step, which then exits 75 -> requeue.
#   TERM       scancel or preemption: SLURM signals the tasks itself; wait for them to save
#              and never requeue (a preempting SLURM requeues by itself, a cancel means stop).
#
# Sourcing this file (`source launch/common.sh`) only defines the cmscale_* functions.

# Must match cmscale.dist.EXIT_REQUEUE (tests/e2e/test_launch.py checks it).
CMSCALE_DEFAULT_EXIT_REQUEUE=75

cmscale_log() { echo "[cmscale-launch $(date +%H:%M:%S)] $*" >&2; }

# Expand a SLURM host list into one host per line, in pure bash: the fallback when
# `scontrol show hostnames` is unavailable. "node[01-03,07],gpu5" -> node01 node02 node03
# node07 gpu5; "r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2; zero padding follows the width of a
# range's first bound, as in SLURM (and cmscale.dist.expand_hostlist).
cmscale_expand_hostlist() {
    local list=$1 cur="" ch i depth=0
    local -a parts=()
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case $ch in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
            ",")
                if [ "$depth" -eq 0 ]; then
                    parts+=("$cur")
                    cur=""
                    continue
                fi
                ;;
        esac
        cur+=$ch
    done
    parts+=("$cur")
    local part
    for part in "${parts[@]}"; do
        [ -n "$part" ] && _cmscale_expand_one "$part"
    done
    return 0
}

_cmscale_expand_one() {
    local host=$1 re='^([^[]*)\[([^]]*)\](.*)$'
    if ! [[ $host =~ $re ]]; then
        echo "$host"
        return 0
    fi
    local prefix=${BASH_REMATCH[1]} body=${BASH_REMATCH[2]} suffix=${BASH_REMATCH[3]}
    local -a items rests
    local item lo hi n num rest
    mapfile -t rests < <(_cmscale_expand_one "$suffix")
    IFS=, read -ra items <<<"$body"
    for item in "${items[@]}"; do
        if [[ $item =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]}
            hi=${BASH_REMATCH[2]}
        elif [[ $item =~ ^[0-9]+$ ]]; then
            lo=$item
            hi=$item
        else
            echo "cmscale_expand_hostlist: bad range '$item' in '$host'" >&2
            return 1
        fi
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
            printf -v num '%0*d' "${#lo}" "$n"
            for rest in "${rests[@]}"; do
                echo "$prefix$num$rest"
            done
        done
    done
}

# First host of a node list: scontrol when it works, else the pure-bash parse.
cmscale_first_host() {
    local hosts
    if hosts=$(scontrol show hostnames "$1" 2>/dev/null) && [ -n "$hosts" ]; then
        echo "${hosts%%$'\n'*}"
        return 0
    fi
    hosts=$(cmscale_expand_hostlist "$1") || return 1
    echo "${hosts%%$'\n'*}"
}

# Name of the newest complete checkpoint of a run directory (nimg-... with a commit.json),
# or nothing. The names are zero-padded, so the glob's sorted order is the nimg order.
cmscale_newest_checkpoint() {
    local marker newest=""
    for marker in "$1"/checkpoints/nimg-*/commit.json; do
        [ -e "$marker" ] && newest=$(basename "$(dirname "$marker")")
    done
    echo "$newest"
}

# Rendezvous port from the job id: the formula of cmscale.dist (10000 + id % 20000),
# below Linux's ephemeral range, and stable across requeues.
cmscale_port() { echo $((10000 + $1 % 20000)); }

# `wait PID` that survives our own traps: a trap interrupts `wait` (status > 128) while
# the child keeps running; wait again then. bash keeps a finished child's status, so
# the second `wait` returns it even if the child ended meanwhile.
cmscale_wait() {
    local pid=$1 rc
    while :; do
        CMSCALE_TRAPPED=0
        rc=0
        wait "$pid" || rc=$?
        if [ "$CMSCALE_TRAPPED" = 1 ] && [ "$rc" -gt 128 ]; then
            continue
        fi
        return "$rc"
    done
}

# The mpiexec command for N ranks (PPN per node inside an allocation) into the array
# CMSCALE_MPIEXEC. MPICH/Intel (hydra) and Open MPI read SLURM allocations themselves.
cmscale_mpiexec_cmd() {
    local n=$1 ppn=${2:-} mpiexec=${CMSCALE_MPIEXEC_BIN:-mpiexec} version
    CMSCALE_MPIEXEC=("$mpiexec" -n "$n")
    version=$("$mpiexec" --version 2>&1 || true)
    if [[ $version == *"Open MPI"* || $version == *"OpenRTE"* ]]; then
        [ -n "$ppn" ] && CMSCALE_MPIEXEC+=(--map-by "ppr:$ppn:node")
        [ "$(id -u)" -eq 0 ] && CMSCALE_MPIEXEC+=(--allow-run-as-root)
        # More ranks than cores is normal for CPU tests; Open MPI refuses it by default.
        CMSCALE_MPIEXEC+=(--oversubscribe)
    else
        [ -n "$ppn" ] && CMSCALE_MPIEXEC+=(-ppn "$ppn")
    fi
    return 0
}

cmscale_main() {
    set -euo pipefail
    local recipe=${1:-}
    if [ -z "$recipe" ]; then
        echo "usage: bash launch/common.sh RECIPE [key=value ...]  (normally via sbatch launch/RECIPE.sh)" >&2
        return 2
    fi
    shift
    local root launcher
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    launcher=${CMSCALE_LAUNCHER:-srun}

    local in_slurm=0
    [ -n "${SLURM_JOB_ID:-}" ] && in_slurm=1
    if [ "$launcher" = srun ] && [ "$in_slurm" = 0 ]; then
        cmscale_log "not inside a SLURM job: submit with 'sbatch launch/$recipe.sh', or run locally with 'bash launch/mpi.sh $recipe'"
        return 2
    fi

    local python=${CMSCALE_PYTHON:-python}
    local module=${CMSCALE_TRAIN_MODULE:-cmscale.train}
    local config=${CMSCALE_CONFIG:-$root/configs/$recipe.yaml}
    local exit_requeue=${CMSCALE_EXIT_REQUEUE:-$CMSCALE_DEFAULT_EXIT_REQUEUE}
    local max_requeues=${CMSCALE_MAX_REQUEUES:-20}
    local max_stalled=${CMSCALE_MAX_STALLED_REQUEUES:-2}
    local restart=${SLURM_RESTART_COUNT:-0}
    if [ ! -f "$config" ]; then
        cmscale_log "no recipe config $config (set CMSCALE_CONFIG or add configs/$recipe.yaml)"
        return 2
    fi

    # The run directory must survive requeues: SLURM_JOB_ID does (and so does
    # SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID for array jobs).
    local job_tag=local
    if [ "$in_slurm" = 1 ]; then
        job_tag=$SLURM_JOB_ID
        if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
            job_tag=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
        fi
    fi
    local run_dir=${RUN_DIR:-${CMSCALE_RUNS:-$root/runs}/$recipe-$job_tag}
    mkdir -p "$run_dir"
    run_dir=$(cd "$run_dir" && pwd)

    # Environment of the tasks.
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    export CMSCALE_EXIT_REQUEUE=$exit_requeue
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    if [ -z "${OMP_NUM_THREADS:-}" ]; then
        # On GPU nodes the main process only feeds the GPU (data workers use the other
        # CPUs); on CPU jobs its threads do the compute.
        if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; then
            export OMP_NUM_THREADS=1
        else
            export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
        fi
    fi
    if [ "$in_slurm" = 1 ]; then
        # Every task (and the trainer's SLURM fallback) agrees on the first host of the
        # allocation: task 0 runs there because tasks are placed in block order.
        MASTER_ADDR=$(cmscale_first_host "$SLURM_JOB_NODELIST")
        MASTER_PORT=$(cmscale_port "$SLURM_JOB_ID")
        export MASTER_ADDR MASTER_PORT
    fi

    # A task that exits with the requeue code touches this file and exits 0 (task.sh).
    local marker="$run_dir/.requeue-$job_tag-$restart"
    rm -f "$marker"
    local -a train=("$python" -m "$module" --config "$config" --run-dir "$run_dir" "$@")
    local -a cmd
    local -a extra=()
    if [ -n "${CMSCALE_SRUN_ARGS:-}" ]; then
        read -ra extra <<<"$CMSCALE_SRUN_ARGS"
    fi
    case $launcher in
        srun)
            cmd=(srun --kill-on-bad-exit=1)
            # srun >= 22.05 no longer inherits --cpus-per-task from sbatch.
            [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
            cmd+=("${extra[@]}")
            ;;
        mpi)
            local n ppn=""
            if [ "$in_slurm" = 1 ]; then
                n=${NPROC:-${SLURM_NTASKS:-1}}
                # SLURM_NTASKS_PER_NODE may read "8(x2)".
                ppn=${SLURM_NTASKS_PER_NODE:-}
                ppn=${ppn%%(*}
            else
                n=${NPROC:-1}
            fi
            cmscale_mpiexec_cmd "$n" "$ppn"
            cmd=("${CMSCALE_MPIEXEC[@]}" "${extra[@]}")
            ;;
        *)
            cmscale_log "unknown CMSCALE_LAUNCHER=$launcher (srun or mpi)"
            return 2
            ;;
    esac
    cmd+=(bash "$root/launch/task.sh" "$marker" "${train[@]}")

    cmscale_log "recipe $recipe, job ${SLURM_JOB_ID:-none}, restart $restart, run dir $run_dir"
    [ "$in_slurm" = 1 ] && cmscale_log "nodes $SLURM_JOB_NODELIST, ${SLURM_NTASKS:-?} tasks, master $MASTER_ADDR:$MASTER_PORT"
    cmscale_log "exec: ${cmd[*]}"

    local step_pid="" terminated=0
    _cmscale_forward() {
        # The time-limit warning: ask every task to checkpoint and stop. srun passes a
        # signal it receives on to all tasks of its step, on every node; so does mpiexec
        # run locally. Under SLURM, mpiexec's ranks are reached through scancel.
        CMSCALE_TRAPPED=1
        cmscale_log "SIG$1: asking the trainer to checkpoint and stop"
        if [ "$launcher" = mpi ] && [ "$in_slurm" = 1 ]; then
            scancel --signal="$1" "$SLURM_JOB_ID" || kill -s "$1" "$step_pid" 2>/dev/null || true
        elif [ -n "$step_pid" ]; then
            kill -s "$1" "$step_pid" 2>/dev/null || true
        fi
    }
    _cmscale_on_term() {
        CMSCALE_TRAPPED=1
        terminated=1
        cmscale_log "SIGTERM (cancel, preemption or time limit): waiting for the tasks to save"
        # Outside SLURM nobody else tells the tasks.
        if [ "$in_slurm" = 0 ] && [ -n "$step_pid" ]; then
            kill -s TERM "$step_pid" 2>/dev/null || true
        fi
    }
    trap '_cmscale_forward USR1' USR1
    trap '_cmscale_forward USR2' USR2
    trap '_cmscale_on_term' TERM INT

    local before
    before=$(cmscale_newest_checkpoint "$run_dir")
    "${cmd[@]}" &
    step_pid=$!
    local rc=0
    cmscale_wait "$step_pid" || rc=$?
    if [ "$rc" -eq 0 ] && [ -e "$marker" ]; then
        rc=$exit_requeue
    fi
    rm -f "$marker"

    if [ "$rc" -eq 0 ]; then
        rm -f "$run_dir/.requeue-stalls-$job_tag"  # the requeue count of a job that finished
        cmscale_log "trainer finished (exit 0)"
        return 0
    fi
    if [ "$rc" -ne "$exit_requeue" ]; then
        cmscale_log "trainer failed (exit $rc); not requeueing"
        return "$rc"
    fi
    if [ "$in_slurm" = 0 ]; then
        cmscale_log "trainer checkpointed and stopped (exit $rc); run the same command again to resume"
        return "$rc"
    fi
    if [ "$terminated" = 1 ]; then
        cmscale_log "trainer checkpointed after SIGTERM; not requeueing (a preempting SLURM requeues by itself; else resubmit with RUN_DIR=$run_dir)"
        return "$rc"
    fi
    if [ "$restart" -ge "$max_requeues" ]; then
        cmscale_log "trainer checkpointed and stopped, but the job was already requeued $restart times (CMSCALE_MAX_REQUEUES=$max_requeues); not requeueing"
        return "$rc"
    fi
    # Requeues in a row that ended without a newer complete checkpoint, kept in the run
    # directory across requeues: a job that keeps stopping before its first step (a
    # warning time longer than the time limit, a node that fails every start) stops here.
    local stalls_file="$run_dir/.requeue-stalls-$job_tag" stalls=0 after
    after=$(cmscale_newest_checkpoint "$run_dir")
    if [ "$after" = "$before" ]; then
        stalls=$(cat "$stalls_file" 2>/dev/null || echo 0)
        stalls=$((stalls + 1))
    fi
    echo "$stalls" >"$stalls_file"
    if [ "$stalls" -gt "$max_stalled" ]; then
        cmscale_log "trainer stopped without a newer checkpoint than ${after:-none} $stalls times in a row (CMSCALE_MAX_STALLED_REQUEUES=$max_stalled): a persistent failure; not requeueing"
        return "$rc"
    fi
    cmscale_log "trainer checkpointed and stopped (exit $rc): requeueing job $SLURM_JOB_ID (restart $((restart + 1)) of at most $max_requeues)"
    # scontrol requeue ends this script at once: everything above has been logged.
    scontrol requeue "$SLURM_JOB_ID" || {
        rc=$?
        cmscale_log "scontrol requeue failed (exit $rc); resubmit with RUN_DIR=$run_dir to resume"
        return "$exit_requeue"
    }
    # Only reached if SLURM did not kill us yet.
    return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    cmscale_main "$@"
fi
