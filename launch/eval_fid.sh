#!/usr/bin/env bash
# FID of a run's checkpoints as SLURM jobs: cmscale fid-report under srun, one rank per task
# (the ranks split the images and all-reduce the feature statistics, so a FID does not depend
# on the number of tasks). Results are cached per checkpoint x EMA x sampler in OUT/cache, so
# a job only computes what is new: run it after every training job and it evaluates the new
# checkpoints.
#
#   sbatch launch/eval_fid.sh RUN_DIR [RUN_DIR ...] --ref REF.npz [cmscale fid-report options]
#       one job: computes what is missing, then writes OUT/report.csv, report.md, fid.png
#   sbatch --dependency=afterany:TRAIN_JOB launch/eval_fid.sh RUN_DIR --ref REF.npz ...
#       the same after a training job (afterany: also after a time limit or a requeue stop)
#   jid=$(sbatch --parsable --array=0-7 launch/eval_fid.sh RUN_DIR --ref REF.npz ...)
#   sbatch --dependency=afterany:$jid launch/fid_report.sh RUN_DIR --ref REF.npz ...
#       a job array: array task i computes slice i/8 of the combinations (cmscale fid-report
#       --shard i/8, cache only); then the report job (launch/fid_report.sh, the same
#       options) assembles the report from the cache and computes only what a failed
#       array task left missing
#
# cmscale fid-report options (see its --help): --ref, --extractor inception|digits, --num, --ema,
# --sampler (repeatable), --every, --limit-checkpoints, --seed, --batch-size, --out.
# The report job must get the same --num/--ema/--sampler/--seed/--extractor/--ref as the
# array, or its cache keys differ and it computes everything again.
#
# Environment (all optional):
#   CMSCALE_FID_OUT         --out when not given       (the first RUN_DIR's fid/)
#   CMSCALE_FID_REF         --ref when not given
#   CMSCALE_FID_NO_COMPUTE  1: the report job only assembles (--no-compute; exit 3 if rows
#                           are missing)
#   CMSCALE_PYTHON, CMSCALE_SRUN_ARGS, OMP_NUM_THREADS, CMSCALE_ROOT: as in launch/common.sh
#   CMSCALE_INCEPTION       the Inception weights file (--extractor inception, the default)
#
# Array tasks: slice (SLURM_ARRAY_TASK_ID - MIN) / STEP of SLURM_ARRAY_TASK_COUNT, so use a
# plain range (--array=0-7, --array=1-8 or --array=0-14:2; a %N limit is fine), not a list.
# Outside SLURM it runs cmscale fid-report as one process (torchrun works too, see that file).
# Exit code: cmscale fid-report's (0; 2 bad input; 3 report rows missing with --no-compute).
#SBATCH --job-name=eval_fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file: the repository is found from the submit directory.
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
[ -f "$root/cmscale/fid_report.py" ] || { echo "no $root/cmscale/fid_report.py: submit from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
root=$(cd "$root" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$root/launch/common.sh"  # functions only: cmscale_log, cmscale_first_host, cmscale_port

mode=compute
if [ "${1:-}" = --report ]; then
    mode=report
    shift
fi

# RUN_DIRs are the arguments that are neither options nor an option's value.
runs=()
has_out=0
has_ref=0
has_shard=0
expect_value=0
for arg in "$@"; do
    if [ "$expect_value" = 1 ]; then
        expect_value=0
        continue
    fi
    case $arg in
        --out | --out=*) has_out=1 ;;
        --ref | --ref=*) has_ref=1 ;;
        --shard | --shard=*) has_shard=1 ;;
    esac
    case $arg in
        --no-compute | -h | --help) ;;
        --*=*) ;;
        -*) expect_value=1 ;;
        *) runs+=("$arg") ;;
    esac
done
if [ ${#runs[@]} -eq 0 ]; then
    echo "usage: sbatch [--array=0-N] launch/eval_fid.sh RUN_DIR [RUN_DIR ...] --ref REF.npz [cmscale fid-report options]" >&2
    exit 2
fi
for arg in "${runs[@]}"; do
    [ -f "$arg/config.yaml" ] || { cmscale_log "$arg: not a run directory (no config.yaml)"; exit 2; }
done

args=("$@")
if [ "$has_out" = 0 ]; then
    args+=(--out "${CMSCALE_FID_OUT:-${runs[0]%/}/fid}")
fi
if [ "$has_ref" = 0 ]; then
    [ -n "${CMSCALE_FID_REF:-}" ] || { cmscale_log "no reference statistics: pass --ref REF.npz (cmscale ref-stats) or set CMSCALE_FID_REF"; exit 2; }
    args+=(--ref "$CMSCALE_FID_REF")
fi

in_array=0
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ] && in_array=1
if [ "$mode" = report ]; then
    if [ "$in_array" = 1 ]; then
        cmscale_log "launch/fid_report.sh is one job, not an array: submit it with --dependency=afterany:ARRAY_JOB"
        exit 2
    fi
    if [ "${CMSCALE_FID_NO_COMPUTE:-0}" = 1 ]; then
        args+=(--no-compute)
    fi
elif [ "$in_array" = 1 ] && [ "$has_shard" = 0 ]; then
    step=${SLURM_ARRAY_TASK_STEP:-1}
    index=$(((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}) / step))
    if [ "$index" -lt 0 ] || [ "$index" -ge "$SLURM_ARRAY_TASK_COUNT" ]; then
        cmscale_log "array task $SLURM_ARRAY_TASK_ID is not in a plain range (slice $index of $SLURM_ARRAY_TASK_COUNT): use --array=0-$((SLURM_ARRAY_TASK_COUNT - 1))"
        exit 2
    fi
    args+=(--shard "$index/$SLURM_ARRAY_TASK_COUNT")
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; then
        export OMP_NUM_THREADS=1
    else
        export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    fi
fi
python=${CMSCALE_PYTHON:-python}
cmd=()
if [ -n "${SLURM_JOB_ID:-}" ]; then
    # Every task agrees on the rendezvous (task 0 runs on the first host); the port comes
    # from this job's own id, so array tasks sharing a node do not collide.
    MASTER_ADDR=$(cmscale_first_host "$SLURM_JOB_NODELIST")
    MASTER_PORT=$(cmscale_port "$SLURM_JOB_ID")
    export MASTER_ADDR MASTER_PORT
    cmd=(srun --kill-on-bad-exit=1)
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    if [ -n "${CMSCALE_SRUN_ARGS:-}" ]; then
        read -ra extra <<<"$CMSCALE_SRUN_ARGS"
        cmd+=("${extra[@]}")
    fi
fi
cmd+=("$python" -m cmscale.cli fid-report "${args[@]}")

if [ "$mode" = report ]; then
    what="report"
elif [ "$in_array" = 1 ]; then
    what="array task $SLURM_ARRAY_TASK_ID: compute"
else
    what="compute and report"
fi
cmscale_log "FID $what; job ${SLURM_JOB_ID:-none}, ${SLURM_NTASKS:-1} task(s), runs: ${runs[*]}"
cmscale_log "exec: ${cmd[*]}"
rc=0
"${cmd[@]}" || rc=$?
if [ "$rc" -eq 0 ]; then
    cmscale_log "fid_report finished (exit 0)"
else
    cmscale_log "fid_report failed (exit $rc); the cache keeps what was computed: submit again to continue"
fi
exit "$rc"
