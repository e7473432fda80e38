"""A stand-in for ``python -m cmscale.train``, only for tests of the launchers.

It follows the trainer's contract as far as the launchers can see it, without torch:
``--config FILE --run-dir DIR [key=value ...]``; on SIGUSR1/SIGUSR2/SIGTERM it "saves"
and exits with the requeue code; otherwise it exits 0. Each run leaves files in the run
directory, named by the run's number (``FAKE_TRAINER_RUN`` if set, else
``SLURM_RESTART_COUNT``, else the number of this rank's earlier runs in the directory)
and the task's rank:

- ``start-r{run}-rank{rank}.json``: argv, the rank and the launch environment it saw;
- ``signal-r{run}-rank{rank}``: the name of the first stop signal received;
- ``done-r{run}-rank{rank}``: written just before exiting 0.

Behaviour per run (``FAKE_TRAINER_STOP_RUNS``, default "0": the runs that wait for a
signal): a run listed there waits up to ``FAKE_TRAINER_WAIT_S`` (60) seconds for a stop
signal, then exits with ``CMSCALE_EXIT_REQUEUE`` (75); ranks > 0 exit
``FAKE_TRAINER_STAGGER_S`` (1.0) seconds after rank 0, as a real trainer's ranks finish
their shutdown at slightly different times. Any other run finishes at once (exit 0).
A run listed there that gets no signal in time exits 1.
``FAKE_TRAINER_EXIT``: exit at once with this code instead (a trainer that fails, or stops
before its first step); ``FAKE_TRAINER_PROGRESS=1``: before that, commit a checkpoint named
after the run (``checkpoints/nimg-{run+1}/commit.json``), as a run that made progress does.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def _rank(env) -> int:
    # cmscale.dist's order: MPI before SLURM, because mpiexec inside an allocation starts
    # its ranks through one srun task per node (all SLURM_PROCID=0 on a node).
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if env.get(name):
            return int(env[name])
    return 0


def main(argv: list[str]) -> int:
    env = os.environ
    run_dir = argv[argv.index("--run-dir") + 1]
    rank = _rank(env)
    run = env.get("FAKE_TRAINER_RUN") or env.get("SLURM_RESTART_COUNT")
    if run is None:  # not under SLURM: count this rank's earlier runs
        run = sum(1 for n in os.listdir(run_dir) if n.startswith("start-r") and n.endswith(f"-rank{rank}.json"))
    run = int(run)
    requeue_code = int(env.get("CMSCALE_EXIT_REQUEUE", "75"))
    stop_runs = {int(r) for r in env.get("FAKE_TRAINER_STOP_RUNS", "0").split(",") if r}
    tag = f"r{run}-rank{rank}"

    received: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))

    keys = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID",
            "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
            "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "OMP_NUM_THREADS", "PYTHONPATH")
    with open(os.path.join(run_dir, f"start-{tag}.json"), "w") as f:
        json.dump({"argv": argv, "rank": rank, "pid": os.getpid(),
                   "env": {k: env[k] for k in keys if k in env}}, f)
    print(f"fake trainer {tag}: started, argv {argv}", flush=True)

    if env.get("FAKE_TRAINER_EXIT"):
        if env.get("FAKE_TRAINER_PROGRESS") == "1" and rank == 0:
            ckpt = os.path.join(run_dir, "checkpoints", f"nimg-{run + 1:012d}")
            os.makedirs(ckpt, exist_ok=True)
            with open(os.path.join(ckpt, "commit.json"), "w") as f:
                json.dump({"nimg": run + 1}, f)
        return int(env["FAKE_TRAINER_EXIT"])

    if run not in stop_runs:
        open(os.path.join(run_dir, f"done-{tag}"), "w").close()
        print(f"fake trainer {tag}: finished", flush=True)
        return 0

    deadline = time.monotonic() + float(env.get("FAKE_TRAINER_WAIT_S", "60"))
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    if not received:
        print(f"fake trainer {tag}: no stop signal", flush=True)
        return 1
    name = signal.Signals(received[0]).name
    with open(os.path.join(run_dir, f"signal-{tag}"), "w") as f:
        f.write(name)
    print(f"fake trainer {tag}: got {name}, saved, exiting {requeue_code}", flush=True)
    if rank > 0:
        time.sleep(float(env.get("FAKE_TRAINER_STAGGER_S", "1.0")))
    return requeue_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
