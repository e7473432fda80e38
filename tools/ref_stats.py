"""Reference statistics for FID/KID: features of a reference image set -> OUT.npz.

    python tools/ref_stats.py SRC OUT.npz [--extractor inception|digits] [--inception PATH] [--download]
                              [--batch-size 64] [--limit N] [--workers 2] [--max-kept 10000]

SRC is one of
- an image folder (recursive; clean-fid's extensions and sorted order);
- a reference batch .npz: `arr_0` uint8 NHWC (openai/guided-diffusion's layout), memory-mapped
  when stored uncompressed;
- WebDataset shards as cmscale.data reads them: a directory of .tar shards (with or without
  its manifest.json), a brace pattern or glob of .tar files; the first image member of each
  sample is used.
`--limit N` uses the first N images (folder: sorted order; npz: array order; shards: stream order).

The file format is described in cmscale/metrics/fid.py (mu, sigma, count, kept features for
KID, and the evaluator settings, which are checked whenever the file is used). The default
extractor is clean-fid's "clean" Inception; it needs inception-2015-12-05.pt locally (see the
error message for where to get it). `--extractor digits` is the offline evaluator for the
embedded digits dataset.

Under torchrun / srun / mpirun the ranks split the images (image i to rank i % W) and rank 0
writes OUT; the result does not depend on the number of ranks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cmscale import dist  # noqa: E402
from cmscale.metrics import features as F  # noqa: E402
from cmscale.metrics import fid as M  # noqa: E402

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
    from cmscale.data import load_shard_set  # shard lists as the training loader expands them

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
        from cmscale.data.sources import NpzSource

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image folder, reference batch .npz, or WebDataset shards")
    p.add_argument("out", help="output statistics .npz")
    p.add_argument("--extractor", default="inception", choices=["inception", "digits"])
    p.add_argument("--inception", default=None, help="path of inception-2015-12-05.pt (or its directory)")
    p.add_argument("--download", action="store_true", help="download the Inception weights if missing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="use the first N images")
    p.add_argument("--workers", type=int, default=2, help="decode/resize workers (image folders)")
    p.add_argument("--max-kept", type=int, default=10_000, help="features kept in the file for KID (0: none)")
    p.add_argument("--device", default=None, help="extractor device (default: the rank's device)")
    a = p.parse_args(argv)

    info = dist.init()
    device = a.device or str(info.device)
    try:
        if a.extractor == "inception":
            extractor = F.InceptionExtractor(a.inception, device=device, download=a.download)
        else:
            extractor = F.DigitsExtractor(device=device)
        t0 = time.time()
        stats = compute(a.src, extractor, batch_size=a.batch_size, limit=a.limit, workers=a.workers,
                        max_kept=a.max_kept)
        if dist.is_main():
            stats.save(a.out)
            s = stats.settings
            print(f"{a.out}: {stats.count} images, {s['extractor']} ({s['resize']} resize to "
                  f"{s['input_resolution']}), {s['feature_dim']}-D, image resolution {s.get('image_resolution')}, "
                  f"{len(stats.kept())} kept features; {time.time() - t0:.1f} s on {dist.get_world_size()} rank(s)")
    except (F.InceptionWeightsNotFound, FileNotFoundError, ValueError) as e:
        print(f"ref_stats: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
