#!/usr/bin/env bash
# One task of a launch (run by launch/common.sh under srun or mpiexec, once per rank):
#
#   bash launch/task.sh MARKER CMD [ARGS...]
#
# Runs CMD. If it exits with the trainer's requeue code ($CMSCALE_EXIT_REQUEUE, 75),
# touches MARKER and exits 0; any other code is passed through.
#
# Why: `srun --kill-on-bad-exit=1` (and mpiexec) terminate all tasks as soon as one exits
# non-zero and then report 143 (measured with SLURM 22.05): the first rank to stop with
# the requeue code would kill the others while they finish, and the launcher would see
# 143 instead of 75. With this wrapper a real failure still kills the step at once.
#
# Signals: srun/slurmstepd (`scancel --signal`, srun's forwarding), MPICH's hydra and
# Open MPI signal every process of a task, this shell and CMD alike (measured for the
# first two). So this shell only has to survive the stop signals and must not pass them
# on: a second copy reaching a trainer that is already exiting, after Python restored
# the default handlers, would kill it and turn 75 into 138.
# SIGUSR1/SIGUSR2 (the time-limit warnings) are ignored here, and so CMD starts with them
# ignored until it installs its own handlers (cmscale.dist does): a warning that comes
# while the trainer still imports torch is dropped instead of killing it (exit 138,
# no checkpoint, no requeue). SIGTERM keeps its default action in CMD (a trap here).
set -uo pipefail

marker=$1
shift
requeue_code=${CMSCALE_EXIT_REQUEUE:-75}

trap '' USR1 USR2
trap ':' TERM  # runs after the foreground CMD has exited

"$@"
rc=$?

if [ "$rc" -eq "$requeue_code" ]; then
    : >"$marker"
    exit 0
fi
exit "$rc"
