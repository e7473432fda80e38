#!/usr/bin/env bash
# ImageNet 64, class-conditional continuous-time consistency distillation (sCD) from the
# EDM teacher (student from scratch, see the recipe): 600k steps, global batch 2048, lr 1e-4,
# bf16. 4 nodes x 8 GPUs = 64 per GPU.
# Ten minutes of warning before the time limit leave time to finish a step and save.
#SBATCH --job-name=imagenet64_scd
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
# Usage: sbatch [sbatch options] launch/imagenet64_scd.sh [key=value ...]   (from the repository root)
# Command-line sbatch options win over the lines above; key=value pairs go to the trainer.
# Everything else (signals, requeue, run directory, environment) is in launch/common.sh.
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# sbatch runs a copy of this file, so launch/common.sh is found from the submit directory.
[ -f "$root/launch/common.sh" ] || { echo "no $root/launch/common.sh: submit from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
exec bash "$root/launch/common.sh" imagenet64_scd "$@"
