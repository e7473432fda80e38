"""Start tests/support/dist_worker.py as several ranks and collect their results.

Ranks are started the way a cluster would start them: real ``torchrun`` and
``mpiexec``, or two plain processes given the environment torchrun or ``srun``
would give them (cheaper than torchrun's agent, and the same to ``dist.init()``).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import warnings

from tests.support import REPO

WORKER = str(REPO / "tests" / "support" / "dist_worker.py")
TIMEOUT = 90  # seconds for one multi-process scenario; they take about 5-10 s

# Launcher variables of the surrounding shell must not leak into the ranks
# (e.g. a test suite itself run inside a SLURM job or under mpiexec).
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "HYDRA_")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# A finished rank occasionally aborts at interpreter exit ("terminate called without an active
# exception", SIGABRT from the process group's teardown); it wrote
# its result before, and that result is what the tests judge.
_EXIT_NOISE = (-6, 134)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def train_subprocess(run_dir, overrides: list[str], cache, timeout: float = 600) -> str:
    """Train with ``python -m cmscale.train --run-dir run_dir *overrides`` in a clean
    environment (one thread, ``CMSCALE_CACHE=cache``) as a user would; assert it exits 0 and
    return its output."""
    cmd = [sys.executable, "-m", "cmscale.train", "--run-dir", str(run_dir),
           "data.num_workers=0", "log.progress_bar=false", *overrides]
    r = subprocess.run(cmd, env=clean_env(CMSCALE_CACHE=str(cache)), cwd=str(REPO),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(scenario: str, out: pathlib.Path, rank_envs: list[dict[str, str]]):
    """One ``python dist_worker.py`` per env; returns the Popen objects."""
    return [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(out)], env=clean_env(**e),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for e in rank_envs
    ]


def torchrun_env(world: int, port: int) -> list[dict[str, str]]:
    return [
        dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for r in range(world)
    ]


def srun_env(world: int, port: int, job_id: int = 4242) -> list[dict[str, str]]:
    # What `srun -n WORLD` sets on one node (checked against SLURM 22.05).
    return [
        dict(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS=str(world),
             SLURM_STEP_NUM_TASKS=str(world), SLURM_STEP_ID="0", SLURM_STEPID="0",
             SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost",
             SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port))
        for r in range(world)
    ]


def run_command(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def torchrun_cmd(scenario: str, out: pathlib.Path, nproc: int = 2) -> list[str]:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    prefix = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return prefix + ["--standalone", f"--nproc_per_node={nproc}", WORKER, scenario, str(out)]


def torchrun_node_cmd(node_rank: int, port: int, args: list[str], nnodes: int = 2,
                      nproc: int = 1) -> list[str]:
    """One torchrun agent of an ``nnodes``-node job, all on this machine: what each node of a
    real multi-node job runs (c10d rendezvous on node 0's endpoint). ``args``: the script or
    ``-m module`` and its arguments.

    Node 0 hosts the rendezvous store (``is_host``), as node 0 of a real job does when the
    endpoint is its address: on one machine every agent matches the endpoint's host, and
    whichever bound the port first would host it, so a "lost" node 1 could take the store
    with it and leave the survivor waiting on store timeouts instead of the collective's."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    prefix = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return prefix + [f"--nnodes={nnodes}", f"--node_rank={node_rank}",
                     f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cmscale-test",
                     f"--rdzv-conf=is_host={int(node_rank == 0)}",
                     "--max-restarts=0", *args]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces, split after its ")"
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to ``pid`` and its descendants: a whole "node" of a job on this machine
    (torchrun starts each worker in a session of its own, so a process group is not enough).
    Returns the pids signalled."""
    tree = process_tree(pid)
    for p in tree:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return tree


def mpiexec_path() -> str | None:
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def wait(procs, world: int, out: pathlib.Path, expect_rc: int = 0) -> list[dict]:
    """Wait for all processes; return the ranks' results, failing with their output."""
    deadline = time.monotonic() + TIMEOUT
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("ranks timed out:\n" + "\n".join(q.communicate()[0] for q in procs))
    results = []
    for r in range(world):
        f = out / f"result-rank{r}.json"
        if not f.exists():
            raise AssertionError(f"rank {r} wrote no result; output:\n" + "\n----\n".join(logs))
        results.append(json.loads(f.read_text()))
    for p, log in zip(procs, logs):
        if p.returncode in _EXIT_NOISE:
            warnings.warn(f"a rank aborted at exit after finishing (rc {p.returncode})")
        elif p.returncode != expect_rc:
            raise AssertionError(f"exit code {p.returncode} != {expect_rc}; output:\n{log}")
    return results
