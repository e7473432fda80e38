#!/usr/bin/env bash
# The report job of a FID job array (launch/eval_fid.sh): assembles report.csv, report.md
# and fid.png from the array's cache, after the array has ended.
#
#   jid=$(sbatch --parsable --array=0-7 launch/eval_fid.sh RUN_DIR --ref REF.npz [options])
#   sbatch --dependency=afterany:$jid launch/fid_report.sh RUN_DIR --ref REF.npz [options]
#
# Give it the same cmscale fid-report options as the array (the cache keys depend on them).
# Combinations that a failed array task left missing are computed here, on this job's tasks
# (afterany, not afterok, for that reason); CMSCALE_FID_NO_COMPUTE=1 only assembles and
# exits 3 if rows are missing. Everything else is launch/eval_fid.sh (--report mode).
#SBATCH --job-name=fid_report
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Usage: sbatch [sbatch options] launch/fid_report.sh RUN_DIR [RUN_DIR ...] [cmscale fid-report options]
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# sbatch runs a copy of this file, so launch/eval_fid.sh is found from the submit directory.
[ -f "$root/launch/eval_fid.sh" ] || { echo "no $root/launch/eval_fid.sh: submit from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
CMSCALE_ROOT=$root exec bash "$root/launch/eval_fid.sh" --report "$@"
