"""Reference statistics of a real image set: image folders, reference batch .npz, WebDataset shards.

Used by ``cmscale ref-stats`` (the command) and by periodic evaluation in training, which makes
the statistics of the embedded datasets itself (:func:`embedded_stats`). Under a process group
the ranks split the images (image i to rank i % W); the result does not depend on W.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .. import dist
from ..data import load_shard_set  # shard lists as the training loader expands them
from ..data.embedded import default_cache_dir, ensure_embedded_shards
from ..data.sources import NpzSource
from . import fid as M

_IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


def _decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def _tar_samples(url: str):
    """(key, {ext: bytes}) of a shard in tar order: webdataset's tar reader and its grouping of
    consecutive members by key (`base_plus_ext`), as WebDataset itself streams samples."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, sample = None, {}
    with gopen(url, "rb") as stream:
        for member in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if prefix != key and sample:
                yield key, sample
                sample = {}
            key = prefix
            sample.setdefault(suffix.lower(), member["data"])
    if sample:
        yield key, sample


def _shard_batches(spec, batch_size: int, limit: int | None):
    """(uint8 NCHW batch, global indices) of this rank's samples (sample i to rank i % W)."""

    rank, world = dist.get_rank(), dist.get_world_size()
    shards = load_shard_set(spec)
    total = shards.num_samples if limit is None else min(limit, shards.num_samples)
    images, indices, i = [], [], 0
    for url in shards.urls:
        for key, sample in _tar_samples(url):
            if i >= total:
                break
            if i % world == rank:
                ext = next((e for e in _IMAGE_MEMBERS if e in sample), None)
                if ext is None:
                    raise ValueError(f"{url}: sample {key} has no image member ({', '.join(sorted(sample))})")
                images.append(torch.from_numpy(_decode(sample[ext])).permute(2, 0, 1))
                indices.append(i)
                if len(images) == batch_size:
                    yield torch.stack(images), torch.tensor(indices)
                    images, indices = [], []
            i += 1
        if i >= total:
            break
    if images:
        yield torch.stack(images), torch.tensor(indices)


def _is_shard_spec(src: str) -> bool:
    if os.path.isdir(src):
        has_tar = any(n.endswith(".tar") for n in os.listdir(src))
        return has_tar and not M.list_images(src)
    return src.endswith(".tar") or "{" in src or "*" in src or "::" in src or src.startswith("pipe:")


def compute(src: str, extractor, *, batch_size: int, limit: int | None, workers: int,
            max_kept: int) -> M.FeatureStats:
    if src.endswith(".npz") and os.path.isfile(src):

        npz = NpzSource(src)  # validates arr_0 (uint8 NHWC) and memory-maps it when possible
        n = len(npz.refs()) if limit is None else min(limit, len(npz.refs()))

        def generate(indices):
            arr = np.stack([np.array(npz.load(int(i))[0].convert("RGB")) for i in indices])
            return torch.from_numpy(arr).permute(0, 3, 1, 2)

        return M.compute_stats_from_generator(generate, n, extractor, batch_size=batch_size, max_kept=max_kept)
    if _is_shard_spec(src):
        return M.compute_stats_from_images(_shard_batches(src, batch_size, limit), extractor, max_kept=max_kept)
    if os.path.isdir(src):
        return M.compute_stats_from_folder(src, extractor, batch_size=batch_size, num_workers=workers,
                                           limit=limit, max_kept=max_kept)
    raise FileNotFoundError(f"{src}: not an image folder, a .npz reference batch or WebDataset shards")




def embedded_stats(name: str, resolution: int, extractor, *, cache_dir: str | None = None,
                   batch_size: int = 64, max_kept: int = 0) -> M.FeatureStats:
    """Statistics of embedded dataset ``name`` at ``resolution`` (all images), cached.

    The cache file is keyed by the dataset, resolution and the extractor's settings (name,
    weights hash, resize); rank 0 computes and writes it atomically, the others wait and
    read it. Collective under a process group."""

    root = cache_dir or default_cache_dir()
    s = extractor.settings()
    ident = repr(sorted((k, str(v)) for k, v in s.items())) + f"|{name}|{resolution}|{max_kept}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    path = os.path.join(root, "refstats", f"{name.replace(':', '-')}-{resolution}px-{key}.npz")
    exists = dist.broadcast_object(os.path.isfile(path) if dist.is_main() else None)
    if not exists:
        if dist.is_main():
            ensure_embedded_shards(name, cache_dir=cache_dir, resolution=resolution)
        dist.barrier()
        shards = ensure_embedded_shards(name, cache_dir=cache_dir, resolution=resolution)
        stats = M.compute_stats_from_images(_shard_batches(shards, batch_size, None), extractor,
                                            max_kept=max_kept)
        if dist.is_main():
            stats.save(path)
    dist.barrier()
    return M.load_stats(path)
