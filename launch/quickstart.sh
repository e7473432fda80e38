#!/usr/bin/env bash
# Quickstart: a tiny model on CPU, two gloo ranks on one node, no GPU (the trainer picks
# gloo when CUDA is unavailable). Try it on tools/local_slurm.sh's cluster:
#   bash tools/local_slurm.sh up && export SLURM_CONF=/tmp/cmscale-slurm/slurm.conf
#   CMSCALE_PYTHON=$PWD/.venv/bin/python sbatch launch/quickstart.sh
#SBATCH --job-name=quickstart
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Usage: sbatch [sbatch options] launch/quickstart.sh [key=value ...]   (from the repository root)
# Command-line sbatch options win over the lines above; key=value pairs go to the trainer.
# Everything else (signals, requeue, run directory, environment) is in launch/common.sh.
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
# sbatch runs a copy of this file, so launch/common.sh is found from the submit directory.
[ -f "$root/launch/common.sh" ] || { echo "no $root/launch/common.sh: submit from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
exec bash "$root/launch/common.sh" quickstart "$@"
