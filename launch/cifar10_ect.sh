#!/usr/bin/env bash
# CIFAR-10 32x32, easy consistency tuning (ECT) from an EDM teacher: one node of 2 GPUs.
# Five minutes of warning before the time limit leave time to finish a step and save.
#SBATCH --job-name=cifar10_ect
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Usage: sbatch [sbatch options] launch/cifar10_ect.sh [key=value ...]   (from the repository root)
# Command-line sbatch options win over the lines above; key=value pairs go to the trainer.
# Everything else (signals, requeue, run directory, environment) is in launch/common.sh.
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# sbatch runs a copy of this file, so launch/common.sh is found from the submit directory.
[ -f "$root/launch/common.sh" ] || { echo "no $root/launch/common.sh: submit from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
exec bash "$root/launch/common.sh" cifar10_ect "$@"
