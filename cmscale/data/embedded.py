"""Embedded datasets as shards, built once into a cache by the same code path as cmscale make-shards.

    shard_dir = ensure_embedded_shards("sklearn:digits", resolution=16)
    loader = build_loader(shard_dir, batch_size_per_rank=64, class_cond=True)

The shards of `name` at `resolution` live in `<cache_dir>/<name>-<R>px-<format>/` (cache_dir
defaults to $CMSCALE_CACHE, else ~/.cache/cmscale). A directory counts as built when its
manifest exists and matches; it is built in a temporary directory and renamed into place, so
concurrent callers (ranks, test workers) never see a half-built one.
"""
from __future__ import annotations

import os
import shutil
import uuid

from .shardlist import MANIFEST_NAME, read_manifest
from .shards import make_shards
from .sources import EMBEDDED


def default_cache_dir() -> str:
    return os.environ.get("CMSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cmscale")


def _built(path: str, name: str, resolution: int, image_format: str) -> bool:
    manifest = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return False
    m = read_manifest(manifest)
    return (m.get("source") == name and m.get("resolution") == resolution
            and m.get("image_format") == image_format
            and all(os.path.isfile(os.path.join(path, s["name"])) for s in m["shards"]))


def ensure_embedded_shards(name: str = "sklearn:digits", cache_dir: str | None = None,
                           resolution: int = 16, *, image_format: str = "png",
                           shard_size: int = 1000) -> str:
    """Build (once) and return the shard directory of embedded dataset `name` (see module docstring).

    name: "sklearn:digits" (1797 digits, 10 classes) or "skimage:lfw" (100 faces, no classes).
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; known: {', '.join(EMBEDDED)}")
    root = cache_dir or default_cache_dir()
    final = os.path.join(root, f"{name.replace(':', '-')}-{resolution}px-{image_format}")
    if _built(final, name, resolution, image_format):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        make_shards(name, tmp, resolution, shard_size=shard_size, image_format=image_format,
                    progress=False)
        if _built(final, name, resolution, image_format):
            return final  # another process (rank, test worker) finished first: use its copy
        if os.path.isdir(final):  # stale or broken: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _built(final, name, resolution, image_format):  # lost a race to a broken copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
