"""Process-group set-up, rank helpers and the preemption stop flag.

``init()`` reads the environment, picks the launcher and initialises ``torch.distributed``
(NCCL for CUDA tensors plus gloo for CPU ones when CUDA is available, else gloo):

==========  ===========================================  ==========================
launcher    detected by                                  rank / world / local rank
==========  ===========================================  ==========================
torchrun    ``RANK`` and ``WORLD_SIZE``                  ``RANK``, ``WORLD_SIZE``,
                                                         ``LOCAL_RANK``
mpi         ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK`` or    mpi4py ``COMM_WORLD``;
            ``PMIX_RANK``                                local rank from a
                                                         shared-memory split
slurm       ``SLURM_PROCID`` and ``SLURM_STEP_ID`` (a    ``SLURM_PROCID``,
            task of an ``srun`` step)                    ``SLURM_STEP_NUM_TASKS``
                                                         (or ``SLURM_NTASKS``),
                                                         ``SLURM_LOCALID``
single      none of the above                            0 / 1 / 0, no process group
==========  ===========================================  ==========================

The order is the table's: torchrun is often one ``srun`` task per node (then SLURM's
variables describe the node), and ``mpirun`` inside an allocation starts its daemons through
``srun`` (every rank would read ``SLURM_PROCID=0``). A batch shell without ``srun`` has no step
id and is one process. Rendezvous: torchrun's ``MASTER_ADDR``/``MASTER_PORT``; under SLURM the
first host of the step's node list and a port derived from the job id; under MPI rank 0 sends
its host and a free port. The result is written back to ``RANK``/``WORLD_SIZE``/... for
libraries that join an existing run (DeepSpeed). Without a process group every helper behaves
as world size 1, so training code never branches on it.

Stop flag: SIGUSR1/SIGUSR2/SIGTERM only raise a flag; ``should_stop()`` is a collective (MAX of
the flags) called at step boundaries, so all ranks stop at the same step, checkpoint and exit
with ``EXIT_REQUEUE`` (75). Protocol and launcher side: docs/preemption.md.

Only this module, the parallel wrapper, checkpointing and metrics (through this module) touch
``torch.distributed``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import signal
import socket
import subprocess
import warnings
from typing import Any, Mapping

import torch
import torch.distributed as tdist

__all__ = [
    "EXIT_REQUEUE",
    "STOP_SIGNALS",
    "DistInfo",
    "LaunchEnv",
    "all_gather",
    "all_gather_flat",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "broadcast_object",
    "detect_launch",
    "expand_hostlist",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "info",
    "init",
    "install_signal_handlers",
    "is_initialized",
    "is_main",
    "print0",
    "request_stop",
    "should_stop",
    "shutdown",
    "stop_requested",
    "sum_counts",
    "worker_ignore_signals",
]

# Exit code of a run that stopped on a signal *after* writing a complete checkpoint:
# "preempted, checkpointed, please requeue". 75 is EX_TEMPFAIL from sysexits.h
# ("temporary failure, the user is invited to retry"), so it cannot be mistaken for
# a Python traceback (1), a usage error (2) or a signal death (128+N). A launch
# script requeues only on this code: `[ $rc -eq 75 ] && scontrol requeue $SLURM_JOB_ID`.
# Note: torchrun's agent does not pass a worker's exit code through (it exits 1
# when a worker fails), so under torchrun the wrapper must not rely on it.
EXIT_REQUEUE = 75

# SIGUSR1/SIGUSR2: SLURM's `--signal` warning before the time limit (submitit uses
# USR2). SIGTERM: SLURM preemption/scancel and torchrun's shutdown. SIGINT is left
# alone so that Ctrl-C still interrupts an interactive run at once.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

# Ports for SLURM runs without MASTER_PORT: 10000 + job_id % 20000, i.e. below
# Linux's ephemeral range (32768-60999), so the OS does not hand the port to an
# outgoing connection, and different jobs sharing a node rarely collide.
_SLURM_PORT_BASE = 10000
_SLURM_PORT_SPAN = 20000


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this process, before any communication.

    ``rank``/``world_size``/``local_rank`` are None for MPI, where they come from
    mpi4py; ``master_addr``/``master_port`` are None when rank 0 chooses them.
    """

    launcher: str  # "single", "torchrun", "slurm" or "mpi" ("external": adopted group)
    rank: int | None = 0
    world_size: int | None = 1
    local_rank: int | None = 0
    master_addr: str | None = None
    master_port: int | None = None


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """The result of ``init()``: who this process is and where it computes."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created (single process)
    master_addr: str | None = None
    master_port: int | None = None


_info: DistInfo | None = None
_stop_signal: int | None = None  # number of the first stop signal received


# ----------------------------------------------------------------------------
# SLURM host lists


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range_list(body: str, text: str) -> list[str]:
    """Expand "01-03,07" -> ["01", "02", "03", "07"], keeping zero padding."""
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"bad range {item!r} in host list {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        # SLURM pads every number to the width of the range's first bound ("08-10").
        width = len(lo)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {text!r}")
        out.extend(f"{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(host: str, text: str) -> list[str]:
    """Expand one host pattern; several bracket groups give their product."""
    m = re.search(r"\[([^\]]*)\]", host)
    if m is None:
        return [host]
    prefix, suffix = host[: m.start()], host[m.end():]
    return [
        prefix + mid + rest
        for mid in _expand_range_list(m.group(1), text)
        for rest in _expand_one(suffix, text)
    ]


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM host list into host names, in SLURM's order.

    ``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07", "gpu5"]``;
    ``"r[1-2]n[1-2]"`` -> ``["r1n1", "r1n2", "r2n1", "r2n2"]``. Zero padding follows
    the width of each range's first bound. Raises ValueError on syntax this parser
    does not know (then ``_slurm_hosts`` asks ``scontrol show hostnames``).
    """
    hosts = []
    for part in _split_top_level(text.strip()):
        hosts.extend(_expand_one(part.strip(), text))
    return hosts


def _slurm_hosts(nodelist: str) -> list[str]:
    try:
        return expand_hostlist(nodelist)
    except ValueError:
        # Only for syntax we do not parse; scontrol exists wherever SLURM runs.
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True, capture_output=True, text=True,
        ).stdout
        return out.split()


# ----------------------------------------------------------------------------
# Launch detection (pure: reads only the given mapping)

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Tell the launcher and what the environment fixes about this process.

    Pure function of ``env`` (default ``os.environ``) except that a SLURM node list
    in syntax ``expand_hostlist`` rejects is expanded by ``scontrol``. See the
    module docstring for the detection order and its reasons.
    """
    env = os.environ if env is None else env
    port = _int_env(env, "MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            # A hand-made RANK/WORLD_SIZE environment may lack LOCAL_RANK.
            local_rank=_int_env(env, "LOCAL_RANK") or 0,
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=port if port is not None else 29500,
        )
    if any(name in env for name in _MPI_RANK_VARS):
        return LaunchEnv(
            launcher="mpi", rank=None, world_size=None, local_rank=None,
            master_addr=env.get("MASTER_ADDR") or None, master_port=port,
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int_env(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or 1
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = (
                env.get("SLURM_STEP_NODELIST")
                or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST")
            )
            addr = _slurm_hosts(nodelist)[0] if nodelist else "127.0.0.1"
        if port is None:
            job_id = _int_env(env, "SLURM_JOB_ID", "SLURM_JOBID") or 0
            port = _SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN
        return LaunchEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=_int_env(env, "SLURM_LOCALID") or 0,
            master_addr=addr,
            master_port=port,
        )
    return LaunchEnv(launcher="single")


# ----------------------------------------------------------------------------
# Initialisation


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _resolve_mpi(launch: LaunchEnv) -> LaunchEnv:
    """Fill rank, world, local rank and the rendezvous point from MPI."""
    from mpi4py import MPI  # imported only here: MPI_Init must not run otherwise

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    # Ranks sharing a node's memory are that node's local ranks (portable across
    # Open MPI, MPICH and Intel MPI, unlike their *_LOCAL_RANK variables).
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = local.Get_rank()
    local.Free()
    addr, port = launch.master_addr, launch.master_port
    if rank == 0:
        addr = addr or socket.gethostname()
        port = port or _free_port()
    addr, port = comm.bcast((addr, port), root=0)
    return LaunchEnv("mpi", rank, world, local_rank, addr, port)


def init(backend: str | None = None, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` from the launch environment; return DistInfo.

    Idempotent: a second call returns the first result. If a process group already
    exists (e.g. created by a test or by DeepSpeed), it is adopted as it is.
    ``backend`` overrides the default: ``"cuda:nccl,cpu:gloo"`` when CUDA is
    available (NCCL for CUDA tensors, gloo for the few CPU ones), else ``"gloo"``.
    ``timeout`` is passed to ``init_process_group`` (its default when None): how long a
    collective waits for the other ranks (a lost node) before it raises. With CUDA,
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is set to 1 unless set, so that NCCL honours it.
    """
    global _info
    if _info is not None:
        return _info
    launch = detect_launch()
    ntasks = _int_env(os.environ, "SLURM_NTASKS") or 1
    if launch.launcher == "single" and ntasks > 1:
        warnings.warn(
            f"one process in a SLURM allocation of {ntasks} tasks (a batch shell?): "
            f"running as world size 1; start the ranks with `srun`"
        )
    if launch.launcher == "mpi":
        try:
            launch = _resolve_mpi(launch)
        except ImportError:
            # `srun --mpi=pmix` sets PMIX_RANK too; SLURM's variables suffice there.
            env = {k: v for k, v in os.environ.items() if k not in _MPI_RANK_VARS}
            launch = detect_launch(env)
            if launch.launcher != "slurm":
                raise RuntimeError("launched by an MPI launcher, but mpi4py is not "
                                   "installed: pip install mpi4py") from None

    if tdist.is_available() and tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
        if launch.launcher == "single":  # a group made by hand, without launcher env
            launch = dataclasses.replace(launch, launcher="external")
        local_rank = launch.local_rank or 0
        backend = tdist.get_backend()
    else:
        rank, world, local_rank = launch.rank, launch.world_size, launch.local_rank
    assert rank is not None and world is not None and local_rank is not None

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # One GPU per local rank; modulo so that oversubscribed test runs still work.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if launch.launcher != "single" and not tdist.is_initialized():
        # With CUDA, gloo as well for CPU tensors (checkpointed RNG states, small
        # flags): NCCL alone cannot communicate them.
        backend = backend or ("cuda:nccl,cpu:gloo" if use_cuda else "gloo")
        for key, value in (
            ("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
            ("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port),
        ):
            os.environ[key] = str(value)
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if use_cuda:
            # NCCL collectives then honour the timeout: a watchdog aborts the communicator
            # and ends the process instead of leaving it blocked on a lost rank forever.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        tdist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs
        )
    elif not tdist.is_initialized():
        backend = None

    _info = DistInfo(
        launcher=launch.launcher, rank=rank, world_size=world, local_rank=local_rank,
        device=device, backend=backend,
        master_addr=launch.master_addr, master_port=launch.master_port,
    )
    return _info


def shutdown() -> None:
    """Destroy the process group, if any, and forget ``init()``'s result.

    Call it before the process exits: a process group left to interpreter exit
    occasionally aborts a finished rank ("terminate called without an active
    exception"). No barrier here: if another rank died, a barrier
    would hang instead of letting this one exit.
    """
    global _info
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _info = None


# ----------------------------------------------------------------------------
# Rank helpers (all work without a process group, as world size 1)


def is_initialized() -> bool:
    """True when a process group exists (not in a single-process run)."""
    return tdist.is_available() and tdist.is_initialized()


def info() -> DistInfo:
    """``init()``'s result; a single-process CPU/CUDA description if not called."""
    if _info is not None:
        return _info
    if is_initialized():
        return DistInfo("external", tdist.get_rank(), tdist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu"),
                        tdist.get_backend())
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo("single", 0, 1, 0, device, None)


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return info().local_rank


def is_main() -> bool:
    """True on global rank 0 (the rank that writes logs, markers and exports)."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def _comm_device(device: torch.device | None = None) -> torch.device:
    """Where a collective on a tensor from ``device`` (None: no preference) runs.

    NCCL communicates CUDA tensors only, gloo CPU tensors; with both ("cuda:nccl,
    cpu:gloo") CPU tensors stay on the CPU instead of a round trip to the GPU.
    """
    backend = str(tdist.get_backend()) if is_initialized() else "gloo"
    if "nccl" in backend and (device is None or device.type == "cuda" or "gloo" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value, op):
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if is_initialized():
            moved = out.to(_comm_device(out.device))
            tdist.all_reduce(moved, op=op)
            out = moved.to(value.device)
        return out
    t = torch.tensor(float(value), dtype=torch.float64)
    return float(_all_reduce(t, op))


def all_reduce_sum(value):
    """Sum of ``value`` over ranks. A tensor gives a new tensor (the input is not
    modified) on the input's device; a Python number gives a float."""
    return _all_reduce(value, tdist.ReduceOp.SUM if tdist.is_available() else None)


def all_reduce_mean(value):
    """Mean of ``value`` over ranks (sum / world size); same types as ``all_reduce_sum``.

    Integer tensors are averaged with integer division; pass floats for a mean.
    """
    total = all_reduce_sum(value)
    world = get_world_size()
    if isinstance(total, torch.Tensor):
        return total // world if not total.is_floating_point() else total / world
    return total / world


def sum_counts(counts: dict) -> dict:
    """Sum dicts of counters (e.g. bad-input counts) over ranks; keys may differ per rank."""
    if not is_initialized() or get_world_size() == 1:
        return dict(counts)
    gathered: list = [None] * get_world_size()
    tdist.all_gather_object(gathered, dict(counts))
    total: dict = {}
    for c in gathered:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (the same shape on all ranks), in rank order, on its device."""
    if not is_initialized() or get_world_size() == 1:
        return [tensor]
    moved = tensor.to(_comm_device(tensor.device))
    parts = [torch.empty_like(moved) for _ in range(get_world_size())]
    tdist.all_gather(parts, moved)
    return [p.to(tensor.device) for p in parts]


def all_gather_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's equally sized 1-D ``tensor``, in rank order."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    moved = tensor.to(_comm_device(tensor.device))
    parts = [torch.empty_like(moved) for _ in range(get_world_size())]
    tdist.all_gather(parts, moved)
    return torch.cat(parts).to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s values; returns it."""
    if is_initialized():
        moved = tensor.to(_comm_device(tensor.device))
        tdist.broadcast(moved, src=src)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled: small objects only)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (pickled: small objects only)."""
    if not is_initialized():
        return [obj]
    out: list = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only, flushed (logs of several ranks interleave otherwise)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# ----------------------------------------------------------------------------
# Stop flag


def _on_stop_signal(signum, frame) -> None:
    # Only raise a flag: the handler runs between two bytecodes of whatever the main
    # thread is doing (maybe inside a collective), so acting here is unsafe.
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = signum


def install_signal_handlers(signals=STOP_SIGNALS) -> None:
    """Make each of ``signals`` only set the stop flag. Call from the main thread."""
    for sig in signals:
        signal.signal(sig, _on_stop_signal)


def request_stop(signum: int = 0) -> None:
    """Set the local stop flag by hand (tests, or a time budget)."""
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = signum


def stop_requested() -> int | None:
    """The first stop signal received by *this* process (0 if set by hand), or None."""
    return _stop_signal


def should_stop() -> bool:
    """True on every rank if any rank has received a stop signal. Collective.

    All ranks must call it at the same step boundary: it is an all-reduce (MAX) of
    the local flag, so the answer is the same everywhere and no rank is left
    waiting in the next step's collectives.
    """
    flag = torch.tensor([1 if _stop_signal is not None else 0], dtype=torch.int32)
    if is_initialized():
        flag = flag.to(_comm_device(flag.device))
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item())


def worker_ignore_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: make a worker ignore the stop signals.

    SLURM and ``scancel --signal`` signal every process of a step, workers included.
    A worker killed by SIGTERM makes the main process's next ``next(loader)`` raise
    before it can save; ignoring the signals keeps workers serving batches until the
    main process has checkpointed and closes the loader. Compose it with another
    init function by calling it first.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _reset_for_tests() -> None:
    """Forget the stop flag and init() result (tests only)."""
    global _stop_signal, _info
    _stop_signal = None
    _info = None
