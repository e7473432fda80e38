#!/usr/bin/env python
"""Submit cmscale recipes from Python with submitit (SLURM, or locally for trying).

    python launch/submit.py --recipe lsun_cat_ct data.shards=... train.total_steps=...
    python launch/submit.py --recipe quickstart --cluster local --tasks-per-node 2
    python launch/submit.py --recipe cifar10_ict --sweep optim.lr=1e-4,2e-4 --sweep seed=0,1 --dry-run

Resources default to the ``#SBATCH`` lines of ``launch/<recipe>.sh`` (one source of
truth for both launchers); ``--nodes``, ``--gpus-per-node`` etc. override them.

Each job runs one trainer per task, ``python -m cmscale.train --config
configs/<recipe>.yaml --run-dir RUN_DIR key=value ...``, as a child process of submitit's
task process (see ``TrainJob``). Preemption and time limits follow submitit's protocol:
SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit (``--signal=USR2@N``, to
every process of the step, trainer included; the local executor signals only its task
processes, so there ``TrainJob`` passes it on to the trainer). The trainer checkpoints
at its next step boundary and exits with ``EXIT_REQUEUE``; on rank 0 submitit calls
``TrainJob.checkpoint()``, which waits for that exit, and then requeues the job; the
requeued job runs the same ``TrainJob`` (same run directory) and the trainer resumes
from its newest complete checkpoint.

Sweeps: ``--sweep key=v1,v2`` (repeatable) gives the cartesian product of the value
lists, one job each, each with its own run directory ``RUN_DIR/<index>-<key=value,...>``.
Values are split on commas outside brackets and braces (``{000000..000099}`` and
``[1,2]`` stay whole).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# cmscale.dist.EXIT_REQUEUE (kept here as a literal so that submitting needs no torch;
# tests/e2e/test_launch.py checks that the two agree).
EXIT_REQUEUE = 75

_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


# ----------------------------------------------------------------------------
# Recipe resources from launch/<recipe>.sh


def recipes() -> list[str]:
    """Recipes: sbatch scripts in launch/ with a configs/<name>.yaml (so not the shared
    launchers, nor the FID jobs eval_fid.sh / fid_report.sh)."""
    shared = {"common", "mpi", "task"}
    return sorted(p.stem for p in (ROOT / "launch").glob("*.sh")
                  if p.stem not in shared and (ROOT / "configs" / f"{p.stem}.yaml").is_file())


def parse_slurm_time(text: str) -> int:
    """SLURM time limit -> minutes: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM[:SS]"."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH, D-HH:MM
        h, m, s = parts
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return days * 24 * 60 + h * 60 + m + (1 if s else 0)


def sbatch_defaults(recipe: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of launch/<recipe>.sh as a dict."""
    path = ROOT / "launch" / f"{recipe}.sh"
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:[=\s]+(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else ""
    return out


@dataclasses.dataclass
class Resources:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    timeout_min: float
    signal_delay_s: int  # warning before the time limit (submitit sends SIGUSR2)
    name: str


def recipe_resources(recipe: str) -> Resources:
    d = sbatch_defaults(recipe)
    signal_delay = 90
    if "signal" in d:  # "B:USR1@600" -> 600
        signal_delay = int(d["signal"].rsplit("@", 1)[1])
    return Resources(
        nodes=int(d.get("nodes", 1)),
        tasks_per_node=int(d.get("ntasks-per-node", 1)),
        gpus_per_node=int(d.get("gpus-per-node", 0)),
        cpus_per_task=int(d.get("cpus-per-task", 1)),
        timeout_min=parse_slurm_time(d.get("time", "60")),
        signal_delay_s=signal_delay,
        name=d.get("job-name", recipe),
    )


# ----------------------------------------------------------------------------
# Sweeps


def split_values(text: str) -> list[str]:
    """Split on commas outside (), [] and {}: "1,{a,b},[2,3]" -> ["1", "{a,b}", "[2,3]"]."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def expand_sweeps(sweeps: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x,y"] -> [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--sweep wants key=v1,v2,...; got {sweep!r}")
        axes.append([f"{key}={v}" for v in split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)]


def slug(assignments: list[str]) -> str:
    """Directory-name-safe label: ["optim.lr=1e-4", "seed=0"] -> "lr=1e-4,seed=0"."""
    parts = []
    for a in assignments:
        key, _, value = a.partition("=")
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:120]


# ----------------------------------------------------------------------------
# The job


def _master_port(job_id: str) -> int:
    # cmscale.dist's formula for SLURM (10000 + id % 20000); a job id such as "123_4"
    # (array task) or a local pid is reduced to its digits.
    digits = re.sub(r"\D", "", job_id) or "0"
    return 10000 + int(digits) % 20000


def _child_preexec() -> None:
    # The time-limit warnings start ignored in the trainer until it installs its own
    # handlers (cmscale.dist does, after importing torch): an early warning is then
    # dropped instead of killing it. Same as launch/task.sh.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    # The trainer must not outlive its submitit task: the local executor ends tasks
    # with SIGKILL, which no Python code sees. Linux only; best effort elsewhere.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class TrainJob:
    """One training run: starts ``python -m cmscale.train`` for this submitit task.

    Rank information is passed to the trainer as torchrun-style variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) taken from
    submitit's ``JobEnvironment``, so the same code serves SLURM and the local executor
    (whose ranks SLURM variables do not describe). A single task gets none of them and
    the trainer runs as one process.

    Instances are pickled by submitit (the child process handle is not).
    """

    def __init__(self, argv: list[str], run_dir: str, stop_timeout_s: float = 300.0,
                 exit_requeue: int = EXIT_REQUEUE):
        self.argv = list(argv)
        self.run_dir = run_dir
        self.stop_timeout_s = stop_timeout_s  # how long checkpoint() waits for the save
        self.exit_requeue = exit_requeue
        self._proc: subprocess.Popen | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_proc"] = None
        return state

    def _child_env(self) -> dict[str, str]:
        import submitit

        job = submitit.JobEnvironment()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["CMSCALE_EXIT_REQUEUE"] = str(self.exit_requeue)
        env.setdefault("NCCL_DEBUG", "WARN")
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if "OMP_NUM_THREADS" not in env:
            gpus = env.get("SLURM_GPUS_ON_NODE", "0")
            env["OMP_NUM_THREADS"] = "1" if gpus not in ("", "0") else env.get("SLURM_CPUS_PER_TASK", "1")
        if job.num_tasks > 1:
            job_id = env.get("SLURM_JOB_ID") or job.job_id
            env.update(
                RANK=str(job.global_rank),
                WORLD_SIZE=str(job.num_tasks),
                LOCAL_RANK=str(job.local_rank),
                MASTER_ADDR=job.hostnames[0] if job.num_nodes > 1 else "127.0.0.1",
                MASTER_PORT=str(_master_port(job_id)),
            )
        return env

    def __call__(self) -> str:
        import submitit

        rank = submitit.JobEnvironment().global_rank
        os.makedirs(self.run_dir, exist_ok=True)
        print(f"[cmscale submit] rank {rank}: {shlex.join(self.argv)}", flush=True)
        self._proc = subprocess.Popen(self.argv, env=self._child_env(), preexec_fn=_child_preexec)

        # Pass the stop signals on to the trainer, then let submitit's own handlers run
        # (USR2: checkpoint() and requeue on rank 0; TERM: ignored). Only off SLURM:
        # SLURM signals every process of the step, trainer included, and a second copy
        # reaching a trainer that is already exiting could kill it (exit 138, not 75).
        # submitit's local executor signals its task processes only.
        previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
        pass_on = os.environ.get("SUBMITIT_EXECUTOR") != "slurm"

        def forward(signum, frame):
            proc = self._proc
            if pass_on and proc is not None and proc.poll() is None:
                proc.send_signal(signum)
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, frame)

        for sig in _STOP_SIGNALS:
            signal.signal(sig, forward)
        try:
            # poll() + sleep rather than wait(): a signal handler that calls checkpoint()
            # must be able to poll the child too (wait() would hold its lock).
            while (rc := self._proc.poll()) is None:
                time.sleep(0.5)
        finally:
            if self._proc.poll() is None:
                self._proc.terminate()
        if rc == 0:
            return self.run_dir
        if rc == self.exit_requeue:
            if rank != 0:
                return self.run_dir  # rank 0 decides about requeueing
            raise RuntimeError(
                f"the trainer checkpointed and stopped (exit {rc}) without submitit's "
                f"time-limit signal (cancelled or preempted?); resubmit with "
                f"--run-dir {self.run_dir} to resume"
            )
        raise RuntimeError(f"the trainer failed with exit code {rc}; run dir {self.run_dir}")

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 on SIGUSR2: wait for the trainer to save, requeue.

        The trainer got the signal too (from SLURM, or from ``forward``). It finishes
        its step, writes a checkpoint and exits; ``scontrol requeue`` must come after
        that, because it kills the job. Requeueing also when the trainer exited 0 is
        harmless: the next run finds training complete and exits at once.
        """
        import submitit

        proc = self._proc
        deadline = time.monotonic() + self.stop_timeout_s
        while proc is not None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        rc = None if proc is None else proc.poll()
        print(f"[cmscale submit] trainer exit code {rc}; requeueing with run dir {self.run_dir}",
              flush=True)
        fresh = TrainJob(self.argv, self.run_dir, self.stop_timeout_s, self.exit_requeue)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)


# ----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/submit.py",
        description="Submit a cmscale recipe with submitit (SLURM, local processes or in-process debug).",
        epilog="Extra key=value arguments are trainer overrides (e.g. train.total_steps=100). "
               "Quote values with braces: 'data.shards=/data/{000000..000099}.tar'.",
    )
    p.add_argument("--recipe", required=True, help="one of: " + ", ".join(recipes()))
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="submitit backend (default: slurm if sbatch is found, else local)")
    p.add_argument("--nodes", type=int, help="nodes (default: the recipe's #SBATCH --nodes)")
    p.add_argument("--gpus-per-node", type=int,
                   help="GPUs per node; also the tasks per node unless --tasks-per-node is given")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--timeout-min", type=float,
                   help="time limit per job run, minutes (SLURM rounds up to whole minutes)")
    p.add_argument("--signal-delay-s", type=int,
                   help="warning (SIGUSR2) this long before the time limit (default: the recipe's)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. --slurm-arg account=abc (repeatable)")
    p.add_argument("--max-requeues", type=int, default=int(os.environ.get("CMSCALE_MAX_REQUEUES", 20)),
                   help="timeouts a job may be requeued after (default 20)")
    p.add_argument("--run-dir", help="run directory (sweeps: parent of one per job); "
                                     "default runs/<recipe>-<date-time>")
    p.add_argument("--log-dir", help="submitit's logs and pickles (default <run-dir>/submitit)")
    p.add_argument("--python", default=os.environ.get("CMSCALE_PYTHON", sys.executable),
                   help="interpreter for the trainer (default: this one)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a key over values; several give their cartesian product")
    p.add_argument("--dry-run", action="store_true",
                   help="print the jobs as JSON lines and submit nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="trainer overrides")
    return p


def plan_jobs(args) -> tuple[Resources, list[dict]]:
    """Resources and the list of jobs ({name, run_dir, overrides, argv}) to submit."""
    for o in args.overrides:
        if "=" not in o:
            raise SystemExit(f"submit.py: override {o!r} is not key=value")
    if args.recipe not in recipes():
        raise SystemExit(f"submit.py: unknown recipe {args.recipe!r} (known: {', '.join(recipes())})")
    res = recipe_resources(args.recipe)
    if args.nodes is not None:
        res.nodes = args.nodes
    if args.gpus_per_node is not None:
        res.gpus_per_node = args.gpus_per_node
        res.tasks_per_node = max(args.gpus_per_node, 1)
    if args.tasks_per_node is not None:
        res.tasks_per_node = args.tasks_per_node
    if args.cpus_per_task is not None:
        res.cpus_per_task = args.cpus_per_task
    if args.timeout_min is not None:
        res.timeout_min = args.timeout_min
    if args.signal_delay_s is not None:
        res.signal_delay_s = args.signal_delay_s

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(args.run_dir or ROOT / "runs" / f"{args.recipe}-{stamp}").resolve()
    config = os.environ.get("CMSCALE_CONFIG") or str(ROOT / "configs" / f"{args.recipe}.yaml")
    module = os.environ.get("CMSCALE_TRAIN_MODULE", "cmscale.train")
    combos = expand_sweeps(args.sweep) if args.sweep else [[]]
    jobs = []
    for i, combo in enumerate(combos):
        run_dir = base if not args.sweep else base / f"{i:03d}-{slug(combo)}"
        overrides = list(args.overrides) + combo
        argv = [args.python, "-m", module, "--config", config, "--run-dir", str(run_dir), *overrides]
        name = res.name if not args.sweep else f"{res.name}-{i:03d}"
        jobs.append({"name": name, "run_dir": str(run_dir), "overrides": overrides, "argv": argv})
    return res, jobs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    res, jobs = plan_jobs(args)
    cluster = args.cluster
    if cluster is None:
        cluster = "slurm" if subprocess.run(["sh", "-c", "command -v sbatch"],
                                            capture_output=True).returncode == 0 else "local"
    if cluster != "slurm":
        res.nodes = 1

    config = jobs[0]["argv"][jobs[0]["argv"].index("--config") + 1]
    if not os.path.isfile(config) and not args.dry_run:
        raise SystemExit(f"submit.py: no recipe config {config} (set CMSCALE_CONFIG or add it)")
    if args.dry_run:
        for job in jobs:
            print(json.dumps({"cluster": cluster, **dataclasses.asdict(res), **job}))
        return 0

    import submitit

    # submitit's logs and pickles: beside the run dirs of a sweep, inside a single run's.
    sweep_parent = Path(jobs[0]["run_dir"]).parent
    log_dir = Path(args.log_dir) if args.log_dir else (
        sweep_parent / "submitit" if args.sweep else Path(jobs[0]["run_dir"]) / "submitit")
    if cluster == "local":
        # Directly, not through AutoExecutor: that one hides the local signal delay.
        executor = submitit.LocalExecutor(folder=str(log_dir), max_num_timeout=args.max_requeues)
    else:
        executor = submitit.AutoExecutor(
            folder=str(log_dir / "%j"), cluster=cluster, slurm_max_num_timeout=args.max_requeues,
        )
    params = dict(
        nodes=res.nodes, tasks_per_node=res.tasks_per_node, cpus_per_task=res.cpus_per_task,
        timeout_min=res.timeout_min if cluster == "local" else math.ceil(res.timeout_min),
        name=res.name,
    )
    if cluster == "slurm":
        extra = {"requeue": True}  # `scontrol requeue` needs it where JobRequeue=0
        for kv in args.slurm_arg:
            key, sep, value = kv.partition("=")
            extra[key] = value if sep else True
        params.update(
            gpus_per_node=res.gpus_per_node or None,
            slurm_signal_delay_s=res.signal_delay_s,
            slurm_additional_parameters=extra,
        )
        if args.partition:
            params["slurm_partition"] = args.partition
    elif cluster == "local":
        params.pop("name")
        params.pop("cpus_per_task")
        params.update(gpus_per_node=res.gpus_per_node, signal_delay_s=res.signal_delay_s)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})

    stop_timeout = max(res.signal_delay_s - 15, 10)  # leave time for `scontrol requeue`
    callables = [TrainJob(job["argv"], job["run_dir"], stop_timeout) for job in jobs]
    if len(callables) > 1 and cluster == "slurm":
        with executor.batch():  # one array job
            submitted = [executor.submit(c) for c in callables]
    else:
        submitted = [executor.submit(c) for c in callables]
    for job, sub in zip(jobs, submitted):
        print(f"submitted {sub.job_id}: {job['name']} run dir {job['run_dir']}", flush=True)
    if cluster in ("local", "debug"):
        # Local jobs are children of this process: wait for them.
        for sub in submitted:
            print(f"{sub.job_id}: {sub.results()[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
