#!/usr/bin/env bash
# The reference's way: the trainer under `mpiexec -n N`, one rank per GPU.
#
#   NPROC=2 bash launch/mpi.sh quickstart [key=value ...]          # locally, 2 ranks
#   salloc -N2 --ntasks-per-node=8 --gpus-per-node=8 bash launch/mpi.sh lsun_cat_ct ...
#   sbatch -N2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8 --time=24:00:00 \
#          launch/mpi.sh lsun_cat_ct ...                           # from the repository root
#
# As a batch script it brings the launcher's defaults; give the resources on the sbatch
# command line (--ntasks-per-node = GPUs per node: SLURM_NTASKS is the number of ranks).
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# N is $NPROC, else SLURM_NTASKS inside an allocation (with SLURM_NTASKS_PER_NODE ranks
# per node), else the number of GPUs `nvidia-smi -L` lists, else 1. The trainer detects
# MPI from PMI_RANK / OMPI_COMM_WORLD_RANK and takes rank, world size and local rank
# from mpi4py (cmscale/dist.py), so it needs `pip install mpi4py` plus an MPI: the pip
# `mpich` wheel works as root with no flags; Open MPI gets --allow-run-as-root and
# --oversubscribe here.
#
# Everything else is launch/common.sh with mpiexec in place of srun: run directory,
# environment, the requeue exit code (task.sh), the USR1 warning and `scontrol requeue`
# inside a batch job. Outside SLURM the run directory defaults to runs/RECIPE-local and a
# stopped run resumes when the same command is run again. Set CMSCALE_MPIEXEC_BIN to pick
# an mpiexec (default: the first on PATH, e.g. the venv's).
root=${CMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
[ -f "$root/launch/common.sh" ] || { echo "no $root/launch/common.sh: run from the repository root or set CMSCALE_ROOT" >&2; exit 2; }
if [ -z "${NPROC:-}" ] && [ -z "${SLURM_NTASKS:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || NPROC=1
    [ "$NPROC" -gt 0 ] || NPROC=1
    export NPROC
fi
CMSCALE_LAUNCHER=mpi exec bash "$root/launch/common.sh" "$@"
