#!/usr/bin/env bash
# LSUN Bedroom 256, consistency distillation (CD) from the EDM teacher: reference 600k steps,
# global batch 256, lr 1e-5, N = 40, Heun teacher. 4 nodes x 8 GPUs as for lsun_cat_ct (the
# frozen teacher adds memory, not optimizer state).
# Ten minutes of warning before the time limit leave time to finish a step and save.
#SBATCH --job-name=lsun_bedroom_cd
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Usage: sbatch [sbatch options] launch/lsun_bedroom_cd.sh [key=value ...]   (from the repository root)
# Command-line sbatch options win over the lines above; key=value pairs go to the trainer.
# Everything else (signals, requeue, run directory, environment) is in launch/common.sh.
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# sbatch runs a copy of this file, so launch/common.sh is found from the submit directory.
[ -f "$root/launch/common.sh" ] || { echo "no $root/launch/common.sh: submit from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
exec bash "$root/launch/common.sh" lsun_bedroom_cd "$@"
