"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one.

Every file cmscale writes outside ``torch.distributed.checkpoint`` goes through
:func:`atomic_path`: the content is written under a temporary name in the same directory
(same file system, so the rename is atomic), flushed to disk, and renamed over ``path``.
If writing fails, the temporary file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    The temporary name keeps ``path``'s extension, for writers that choose the format from it
    (``PIL.Image.save``, ``matplotlib``'s ``savefig``, ``numpy.savez``)."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(directory, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` at ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj, **kwargs) -> None:
    """``obj`` as JSON at ``path`` (``indent=1`` unless given), atomically."""
    kwargs.setdefault("indent", 1)
    write_text(path, json.dumps(obj, **kwargs) + "\n")
