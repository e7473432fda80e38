"""Sharded checkpoints that resume: save, load_latest, keep_last.

``save(run_dir, state, meta)`` writes ``RUN_DIR/checkpoints/nimg-{nimg:012d}/`` with
torch.distributed.checkpoint (one ``.distcp`` file per rank, ``.metadata``) and then the commit
marker ``commit.json``; a checkpoint counts only once the marker exists. ``load_latest``
restores the newest complete one in place (tensors, ``Stateful`` objects, ``ModelOptimizer``,
Python values, and ``FlatShard`` slices, resharded at another world size); ``keep_last`` prunes.
The marker records the size and CRC-32 of every file; a load verifies them, and ``load_latest``
sets a damaged checkpoint aside and falls back to the previous one. ``check_run_dir`` tells
before any training whether the run directory can hold checkpoints. Nothing is unpickled as
code. Layout, commit protocol, checksums and resharding: docs/checkpoints.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import socket
import time
import uuid
import warnings
import zlib
from typing import Any

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from cmscale import dist
from cmscale.atomic import atomic_path, write_json

__all__ = [
    "DAMAGED",
    "MARKER",
    "CheckpointInfo",
    "DamagedCheckpoint",
    "RunDirError",
    "FlatShard",
    "ModelOptimizer",
    "check_run_dir",
    "checkpoint_path",
    "keep_last",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_latest",
    "save",
    "shard_range",
    "verify",
]

MARKER = "commit.json"
DAMAGED = "commit.damaged.json"  # the marker of a checkpoint found damaged, set aside
FORMAT = 2  # 2: the marker lists every file with its size and CRC-32 ("files")
_CHUNK = 1 << 22  # bytes read at a time for checksums


class DamagedCheckpoint(RuntimeError):
    """A complete checkpoint whose files differ from what its marker recorded."""


class RunDirError(ValueError):
    """The run directory cannot hold checkpoints (not creatable, read-only, not shared)."""
_SUBDIR = "checkpoints"
_NAME = re.compile(r"nimg-(\d+)")


def checkpoint_path(run_dir: str | os.PathLike, nimg: int) -> pathlib.Path:
    """Directory of the checkpoint taken after ``nimg`` training images."""
    return pathlib.Path(run_dir) / _SUBDIR / f"nimg-{int(nimg):012d}"


# ----------------------------------------------------------------------------
# What can be put into a state


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the elements of a flat tensor of ``numel`` owned by ``rank``.

    Every rank gets ``c = ceil(numel / world_size)`` elements, cut at ``numel``:
    rank r owns ``[min(r*c, numel), min((r+1)*c, numel))``. This is DTensor's
    ``Shard(0)`` split, which is what lets DCP reshard. A sharded EMA keeps a
    padded buffer of ``c`` elements per rank (equal sizes suit ``all_gather``);
    only the first ``stop - start`` of them are real.
    """
    c = -(-numel // world_size)
    return min(rank * c, numel), min((rank + 1) * c, numel)


class FlatShard:
    """This rank's slice of a 1-D tensor of ``numel`` elements (see ``shard_range``).

    ``local`` is a 1-D tensor with at least ``stop - start`` elements for the
    current rank and world size; the first ``stop - start`` are saved and loaded in
    place, the rest (padding) is left alone. On load, the world size of the run that
    saved may differ: the slice is read from whichever saved slices overlap it.
    """

    def __init__(self, local: torch.Tensor, numel: int):
        start, stop = shard_range(numel, dist.get_rank(), dist.get_world_size())
        if local.dim() != 1 or not local.is_contiguous() or local.numel() < stop - start:
            raise ValueError(
                f"FlatShard needs a contiguous 1-D tensor of >= {stop - start} elements for rank "
                f"{dist.get_rank()} of {dist.get_world_size()} (numel={numel}), "
                f"got shape {tuple(local.shape)}"
            )
        self.local = local
        self.numel = int(numel)
        self.start, self.stop = start, stop

    @property
    def view(self) -> torch.Tensor:
        """The real (unpadded) part of ``local``; shares its storage."""
        return self.local[: self.stop - self.start]


class ModelOptimizer:
    """Stateful for a model and (optionally) its optimizer, via DCP's state_dict helpers.

    ``get_state_dict``/``set_state_dict`` key optimizer state by parameter name
    instead of position, strip wrapper prefixes (DDP's ``module.``, compile's
    ``_orig_mod.``), and initialise lazy optimizer state (Adam's moments) before a
    load, so a fresh optimizer is restored completely. Pass the plain ``net`` (the
    unwrapped module the run exports); a DDP-wrapped one gives the same keys.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
        else:
            set_state_dict(
                self.model, self.optimizer,
                model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"],
            )


# ----------------------------------------------------------------------------
# Translation between our state and the flat dict of (D)Tensors DCP understands

_meshes: dict[str, tuple[Any, Any]] = {}  # device type -> (process group, mesh)


def _mesh(device_type: str):
    # One 1-D mesh over the whole world per device type, built on the default group;
    # rebuilt if that group was destroyed and re-created (tests, restarts in-process).
    from torch.distributed.device_mesh import init_device_mesh

    world_group = tdist.group.WORLD
    cached = _meshes.get(device_type)
    if cached is None or cached[0] is not world_group:
        cached = (world_group, init_device_mesh(device_type, (tdist.get_world_size(),)))
        _meshes[device_type] = cached
    return cached[1]


def _as_dtensor(local: torch.Tensor, global_shape: tuple[int, ...]):
    from torch.distributed.tensor import DTensor, Shard

    # from_local keeps `local`'s storage (a view), so DCP's load writes in place.
    return DTensor.from_local(
        local, _mesh(local.device.type), [Shard(0)], run_check=False,
        shape=torch.Size(global_shape), stride=_contiguous_stride(global_shape),
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


class _FromStateful(dict):
    """DCP view of a Stateful's state_dict, remembering whom to hand it back to."""

    def __init__(self, items: dict, owner: Any, user_sd: Any):
        super().__init__(items)
        self.owner, self.user_sd = owner, user_sd


def _to_dcp(obj: Any) -> Any:
    """Our state -> the nested dict of tensors, DTensors and values DCP sees.

    Tensors in the result share storage with ours, so DCP's in-place load fills ours.
    """
    if isinstance(obj, FlatShard):
        if not dist.is_initialized():
            return obj.view  # one process owns everything: the chunk (0, numel)
        return _as_dtensor(obj.view, (obj.numel,))
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint state keys must be str, got {key!r}")
            out[key] = _to_dcp(value)
        return out
    if isinstance(obj, Stateful) and not isinstance(obj, torch.Tensor):
        user_sd = obj.state_dict()
        return _FromStateful(_to_dcp(user_sd), obj, user_sd)
    return obj


def _fill(ours: Any, loaded: Any) -> Any:
    """Put DCP's result ``loaded`` for ``_to_dcp(ours)`` back into ``ours``.

    Returns what should stand where ``ours`` stood: ``ours`` itself for containers,
    tensors and shards (filled in place), the loaded object for Python values.
    """
    if isinstance(loaded, _FromStateful):
        loaded.owner.load_state_dict(_fill(loaded.user_sd, dict(loaded)))
        return ours
    if isinstance(ours, FlatShard):
        return ours  # DCP wrote into a view of its storage
    if isinstance(ours, torch.Tensor):
        if loaded is not ours:  # DCP loads in place; copy in case a version did not
            ours.copy_(loaded)
        return ours
    if isinstance(ours, dict):
        for key in ours:
            if key in loaded:
                ours[key] = _fill(ours[key], loaded[key])
        return ours
    return loaded


# ----------------------------------------------------------------------------
# Safe reading: no code is unpickled


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for DCP's ``.metadata``: its dataclasses, torch.Size, dtypes, paths."""

    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata":  # dataclasses and enums
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which is not allowed"
        )


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by ``_SafeUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        # `rank` asks for the per-rank index of DCP's no-collectives format, which
        # DCP tries when the global one fails; we never write it, so it is absent.
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with open(os.path.join(self.path, name), "rb") as f:
            metadata = _SafeUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that unpickles non-tensor values with ``weights_only=True``.

    Same as DefaultLoadPlanner.load_bytes (which passes ``weights_only=False``)
    otherwise: the value goes to its place in the nested state.
    """

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ----------------------------------------------------------------------------
# Listing


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One ``nimg-*`` directory. ``meta`` is the marker's JSON when ``complete``."""

    path: pathlib.Path
    nimg: int
    complete: bool
    meta: dict[str, Any] | None


def _read_marker(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        with open(path / MARKER) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        # os.replace makes a torn marker impossible; this is damage from outside.
        warnings.warn(f"unreadable checkpoint marker {path / MARKER}: {e}; ignoring {path}")
        return None
    return meta if isinstance(meta, dict) else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """All checkpoint directories of ``run_dir``, complete or not, oldest first."""
    root = pathlib.Path(run_dir) / _SUBDIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME.fullmatch(entry.name)
        if m is None or not entry.is_dir():
            continue
        meta = _read_marker(entry)
        found.append(CheckpointInfo(entry, int(m.group(1)), meta is not None, meta))
    return sorted(found, key=lambda c: c.nimg)


def latest_checkpoint(run_dir: str | os.PathLike, *, warn: bool = True) -> CheckpointInfo | None:
    """The newest complete checkpoint, or None. Warns about newer incomplete ones.

    Reads the file system; collective callers should use ``load_latest``, which
    decides on rank 0 and broadcasts so that all ranks load the same checkpoint.
    """
    ckpts = list_checkpoints(run_dir)
    complete = [c for c in ckpts if c.complete]
    latest = complete[-1] if complete else None
    if warn:
        for c in ckpts:
            if not c.complete and (latest is None or c.nimg > latest.nimg):
                if (c.path / DAMAGED).exists():
                    warnings.warn(f"skipping damaged checkpoint {c.path} (set aside: {DAMAGED})")
                    continue
                warnings.warn(
                    f"skipping incomplete checkpoint {c.path} (no {MARKER}: the job "
                    f"writing it was stopped, or it is still being written)"
                )
    return latest


# ----------------------------------------------------------------------------
# Checksums


def _data_files(path: pathlib.Path) -> list[str]:
    """The checkpoint's files (relative, sorted), except the marker and its temporaries."""
    names = []
    for root, _, files in os.walk(path):
        for name in files:
            if name.startswith(("commit", ".commit")):
                continue
            names.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(names)


def _crc32(file: pathlib.Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _share(names: list[str]) -> list[str]:
    # Every rank reads a part of the files: the checkpoint is read once, by all ranks together.
    return names[dist.get_rank()::dist.get_world_size()]


def _checksums(path: pathlib.Path) -> dict[str, dict[str, int]]:
    """{name: {"size", "crc32"}} of every file of ``path`` (collective; rank 0 lists)."""
    names = dist.broadcast_object(_data_files(path) if dist.is_main() else None)
    mine: dict[str, Any] = {}
    try:
        for name in _share(names):
            mine[name] = {"size": (path / name).stat().st_size, "crc32": _crc32(path / name)}
    except OSError as e:  # every rank must reach the gather, or the others wait
        mine = {"error": f"rank {dist.get_rank()}: {e}"}
    files: dict[str, dict[str, int]] = {}
    for part in dist.all_gather_object(mine):
        if "error" in part:
            raise OSError(f"cannot read back checkpoint {path}: {part['error']}")
        files.update(part)
    return dict(sorted(files.items()))


def verify(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with the files of the complete checkpoint ``path``: [] when nothing.

    Collective. Compares each file's size and CRC-32 with the marker's ``files`` (a file
    missing, truncated, or with a flipped bit). A checkpoint written before checksums were
    recorded (format 1) has nothing to compare and passes.
    """
    path = pathlib.Path(path)
    if meta is None:
        meta = _read_marker(path)
    recorded = (meta or {}).get("files")
    if not isinstance(recorded, dict):
        return []
    problems = []
    for name in _share(sorted(recorded)):
        want, file = recorded[name], path / name
        try:
            size = file.stat().st_size
            if size != want["size"]:
                problems.append(f"{name}: {size} bytes, {want['size']} when written")
            elif _crc32(file) != want["crc32"]:
                problems.append(f"{name}: CRC-32 differs from the one recorded when written")
        except OSError as e:
            problems.append(f"{name}: {e.strerror or e}")
    return sorted(p for part in dist.all_gather_object(problems) for p in part)


def _set_aside(path: pathlib.Path, meta: dict[str, Any], problems: list[str]) -> None:
    """Rank 0: make a damaged checkpoint incomplete, keeping its marker as DAMAGED.

    It is then what a killed write leaves: ignored by loads, replaced by a save of the same
    nimg, deleted by keep_last once a newer checkpoint is complete."""
    write_json(path / DAMAGED, {**meta, "damage": problems})
    (path / MARKER).unlink()
    _fsync_dir(path)


# ----------------------------------------------------------------------------
# The run directory


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Raise RunDirError unless every rank can use ``run_dir`` for checkpoints (collective).

    Rank 0 creates it (with its parents) and writes, fsyncs and reads back a probe file;
    then every rank checks that it sees that probe, i.e. that the directory is on a file
    system all nodes share. Meant to run before any training, so that a read-only mount, a
    path that cannot be created, or a node-local directory is an error at once rather than
    when the first checkpoint is due.
    """
    run_dir = pathlib.Path(run_dir)
    probe = run_dir / f".probe-{uuid.uuid4().hex}"
    token = None
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            token = f"error: the run directory {run_dir} cannot be created: {e}"
        else:
            try:
                with open(probe, "w") as f:
                    f.write(probe.name)
                    f.flush()
                    os.fsync(f.fileno())
                token = probe.name
            except OSError as e:
                token = f"error: the run directory {run_dir} is not writable: {e}"
                with contextlib.suppress(OSError):
                    probe.unlink()
    token = dist.broadcast_object(token)
    if token.startswith("error: "):
        raise RunDirError(token[len("error: "):])
    try:
        seen = (run_dir / token).read_text() == token
    except OSError:
        seen = False
    missing = [f"{r} ({host})" for r, host in enumerate(dist.all_gather_object(
        None if seen else socket.gethostname())) if host is not None]
    if dist.is_main():
        with contextlib.suppress(OSError):
            (run_dir / token).unlink()
    if missing:
        raise RunDirError(
            f"ranks {missing} do not see the files rank 0 writes in the run directory "
            f"{run_dir}: it must be on a file system shared by all nodes")


# ----------------------------------------------------------------------------
# Save


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(path: pathlib.Path, meta: dict[str, Any]) -> None:
    # Temporary file, fsync, rename (atomic_path), then fsync of the directory: the marker
    # is either absent or whole, and it survives a crash of the machine once save() returns.
    with atomic_path(path / MARKER) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    _fsync_dir(path)


@contextlib.contextmanager
def _calling_dcp(what: str, path: pathlib.Path):
    # DCP warns on every call without a process group; that is our single-process
    # case by design. Checkpoint directories are always fresh, so the "overwriting"
    # warning of older defaults is noise too.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        try:
            yield
        except CheckpointException as e:
            # DCP's CheckpointException derives from BaseException, so `except
            # Exception` would not see it; it also carries every rank's traceback.
            raise RuntimeError(f"checkpoint {what} failed for {path}:\n{e}") from e


def _prepare_dir(path: pathlib.Path) -> str:
    """Rank 0: "exists" for a complete checkpoint, else an empty directory and "write"."""
    if (path / MARKER).exists():
        warnings.warn(f"checkpoint {path} already exists; not overwritten")
        return "exists"
    if path.exists():
        warnings.warn(f"replacing incomplete checkpoint {path}")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return "write"


def save(run_dir: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]) -> pathlib.Path:
    """Write ``state`` as the checkpoint ``nimg-{meta['nimg']}``; return its directory.

    Collective: every rank calls it with the same keys. ``meta`` must be a JSON
    object with an integer ``nimg`` (training images seen); it is stored in the
    marker together with ``world_size``, ``time``, ``unix_time``, ``torch_version``
    and ``format``. If a complete checkpoint with this ``nimg`` exists, nothing is
    written (same progress, same state: e.g. a preemption right after a periodic
    save) and a warning is given. A directory with this ``nimg`` but no marker is a
    leftover of a killed job and is replaced. Returns once the marker is durable on
    every rank's behalf, so a rank may exit right after.
    """
    record = dict(meta)
    nimg = int(record["nimg"])
    record.update(
        nimg=nimg, world_size=dist.get_world_size(), format=FORMAT,
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        unix_time=time.time(), torch_version=torch.__version__,
    )
    json.dumps(record)  # fail before writing anything if meta is not JSON
    path = checkpoint_path(run_dir, nimg)

    decision = None
    if dist.is_main():
        try:
            decision = _prepare_dir(path)
        except OSError as e:  # tell the other ranks instead of leaving them waiting
            decision = f"cannot prepare {path}: {e}"
    # Rank 0 decides for all (no rank races a slow file system's view), and the
    # broadcast also orders the mkdir before any rank writes.
    decision = dist.broadcast_object(decision)
    if decision == "exists":
        return path
    if decision != "write":
        raise RuntimeError(decision)

    try:
        with _calling_dcp("save", path):
            dcp.save(
                _to_dcp(state),
                storage_writer=FileSystemWriter(path, sync_files=True),
                no_dist=not dist.is_initialized(),
            )
        # Every rank's shard is on disk before the marker says so (DCP's save ends with a
        # collective), and the checksums are of what is on disk, read back.
        record["files"] = _checksums(path)
    except (RuntimeError, OSError) as e:  # raised on every rank alike
        raise _save_failed(run_dir, path, e) from e
    error = None
    if dist.is_main():
        try:
            _write_marker(path, record)
        except OSError as e:
            error = e
    # Nobody returns before the marker exists: a rank that exits (EXIT_REQUEUE) makes
    # torchrun/srun kill the others, and rank 0 must not be killed mid-marker. The
    # broadcast is also how a failed marker reaches the other ranks.
    error = dist.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise _save_failed(run_dir, path, OSError(error))
    return path


def _save_failed(run_dir: str | os.PathLike, path: pathlib.Path, error: BaseException) -> RuntimeError:
    """The error of a failed save (every rank), after rank 0 removed what was written.

    The partial directory is worth nothing (no marker) and may be what filled the disk.
    A full disk is recognised by its errno or by the free space left when the write
    failed: torch's serialisation reports a short write without the errno."""
    text = str(error)
    full = (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
            or _nearly_full(path))
    if dist.is_main():
        shutil.rmtree(path, ignore_errors=True)
    previous = latest_checkpoint(run_dir, warn=False)
    msg = (f"checkpoint {path} could not be written; its partial files were removed, and "
           f"the newest complete checkpoint is still "
           f"{previous.path if previous else 'none (the run has none yet)'}")
    if full:
        msg += (f". The file system of {run_dir} is full: free space (or lower "
                f"checkpoint.keep_last), then re-run the same command to resume")
    # The cause: the last line of the (last) traceback DCP gathered, else the message.
    lines = [line for line in text.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if not line.startswith((" ", "Traceback"))),
                 text)
    return RuntimeError(f"{msg}. Cause: {cause.strip()}")


def _nearly_full(path: pathlib.Path) -> bool:
    """Less than 1 MiB or 0.1% left on the file system of ``path``'s parent."""
    try:
        usage = shutil.disk_usage(path.parent)
    except OSError:
        return False
    return usage.free < max(2**20, usage.total // 1000)


# ----------------------------------------------------------------------------
# Load


def load(path: str | os.PathLike, state: dict[str, Any], *, strict: bool = True,
         check: bool = True) -> dict[str, Any]:
    """Restore ``state`` in place from the complete checkpoint at ``path``; return its meta.

    Collective. See the module docstring for how each kind of entry is restored.
    ``strict``: every key of ``state`` must be in the checkpoint (extra keys in the
    checkpoint are always fine). Raises FileNotFoundError for a directory without
    marker, and DamagedCheckpoint (``check``, before anything is restored) when a file
    differs from the size and CRC-32 its marker recorded.
    """
    path = pathlib.Path(path)
    meta = _read_marker(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER})")
    if check:
        problems = verify(path, meta)
        if problems:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: " + "; ".join(problems))
    dcp_state = _to_dcp(state)
    try:
        with _calling_dcp("load", path):
            dcp.load(
                dcp_state,
                storage_reader=_SafeReader(path),
                planner=_SafeLoadPlanner(allow_partial_load=not strict),
                no_dist=not dist.is_initialized(),
            )
    except (ValueError, RuntimeError) as e:
        if "Size mismatch" not in str(e):
            raise
        detail = next(line for line in str(e).splitlines() if "Size mismatch" in line)
        raise ValueError(
            f"checkpoint {path} holds tensors of another shape than the network this run "
            f"builds ({detail.strip()}): net.preset, net.overrides or data.channels differ from "
            f"the ones it was written with, or the preset changed between cmscale versions "
            f"(tiny16 has used scale-shift normalisation since 0.2: for an older run add "
            f"net.overrides.use_scale_shift_norm=false and net.overrides.allow_time_blind=true "
            f"to its config.yaml)") from None
    _fill(state, dcp_state)
    return meta


def load_latest(run_dir: str | os.PathLike, state: dict[str, Any], *, strict: bool = True) -> dict[str, Any] | None:
    """Restore ``state`` from the newest complete checkpoint of ``run_dir``.

    Collective. Returns that checkpoint's marker metadata (``nimg``, ``world_size``,
    the caller's fields...) or None, leaving ``state`` untouched, when there is none.
    Newer directories without marker are skipped with a warning. Rank 0 chooses and
    broadcasts the choice, so all ranks load the same checkpoint. A checkpoint whose
    files fail ``verify`` (truncated, a flipped bit, a file missing) is set aside (its
    marker becomes ``DAMAGED``) with a warning, and the next older complete one is
    tried; if every complete checkpoint is damaged, DamagedCheckpoint is raised.
    """
    found = None
    if dist.is_main():
        latest_checkpoint(run_dir)  # the warnings about newer incomplete directories
        ckpts = list_checkpoints(run_dir)
        found = ([str(c.path) for c in reversed(ckpts) if c.complete],
                 [str(c.path) for c in ckpts if (c.path / DAMAGED).exists()])
    choices, set_aside = dist.broadcast_object(found)
    if not choices and set_aside:
        # Starting from scratch beside them would delete them (keep_last): a human decides.
        raise DamagedCheckpoint(
            f"{run_dir} holds no complete checkpoint, only damaged ones set aside earlier "
            f"({', '.join(set_aside)}): restore them from a copy, or delete "
            f"{pathlib.Path(run_dir) / _SUBDIR} to start from scratch")
    damaged = []
    for choice in choices:
        path = pathlib.Path(choice)
        meta = _read_marker(path)
        problems = verify(path, meta) if meta is not None else [f"{MARKER} unreadable"]
        if not problems:
            if damaged:
                dist.print0(f"resuming from {path}, the newest undamaged checkpoint")
            return load(path, state, strict=strict, check=False)
        damaged.append(path)
        if dist.is_main():
            warnings.warn(f"checkpoint {path} is damaged ({'; '.join(problems)}): set aside as "
                          f"{path / DAMAGED}; trying the previous complete checkpoint")
            if meta is not None:
                _set_aside(path, meta, problems)
        dist.barrier()
    if damaged:
        raise DamagedCheckpoint(
            f"all {len(damaged)} complete checkpoints of {run_dir} are damaged (each set aside as "
            f"{DAMAGED}, see the warnings): restore them from a copy, or delete "
            f"{pathlib.Path(run_dir) / _SUBDIR} to start from scratch")
    return None


# ----------------------------------------------------------------------------
# Pruning


def keep_last(run_dir: str | os.PathLike, k: int, protect=()) -> list[pathlib.Path]:
    """Delete all but the ``k`` newest complete checkpoints; return what was deleted.

    Also deletes incomplete directories *older* than the newest complete checkpoint
    (leftovers of killed jobs). Never deletes the newest complete checkpoint
    (``k >= 1`` is enforced) nor an incomplete one newer than it, which a live job
    may still be writing. Runs on rank 0 only (other ranks return []), so call it
    after ``save`` on every rank or on rank 0 alone. The marker is removed first, so
    a kill during deletion leaves a directory that is ignored, never a marker over
    missing files. ``protect``: nimg values whose complete checkpoints are kept as well
    (the best one by FID).
    """
    if k < 1:
        raise ValueError(f"keep_last needs k >= 1, got {k}")
    if not dist.is_main():
        return []
    ckpts = list_checkpoints(run_dir)
    complete = [c for c in ckpts if c.complete]
    if not complete:
        return []
    keep = {c.path for c in complete[-k:]} | {c.path for c in complete
                                              if c.nimg in {int(n) for n in protect}}
    newest = complete[-1].nimg
    deleted = []
    for c in ckpts:
        if c.path in keep or (not c.complete and c.nimg >= newest):
            continue
        marker = c.path / MARKER
        if marker.exists():
            marker.unlink()
            _fsync_dir(c.path)
        shutil.rmtree(c.path, ignore_errors=True)
        deleted.append(c.path)
    return deleted
