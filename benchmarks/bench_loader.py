"""Loader throughput on 256x256 JPEG shards against the practical limit: PIL decode + crop in a plain loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py [--images 768] [--batch 32] [--workers 1,2]
                                                        [--decoder auto|pil]

1. Builds JPEG shards (quality 95) of 256x256 crops of scikit-image's photos with make_shards.
2. Limit: the same encoded images, already in memory, decoded and center-cropped with PIL in a
   plain loop (`Image.open`, `convert("RGB")`, `center_crop_arr`). It is measured twice: in
   this process, and inside W DataLoader worker processes that each loop over their share and
   hand over only a token per 32 images: the same processes, scheduling and machine load as
   the loader with W workers, so the ratio per W is like for like.
3. Loader: `build_loader(..., num_workers=W)`, after a warm-up, for two outputs:
   `dtype=torch.uint8` (what the workers deliver; on a GPU the loader copies uint8 to the device
   and mirrors and converts there; here, a CPU consumer, the workers also mirror) and float32
   [-1, 1] NCHW converted on this CPU by the consuming process (which then competes with the
   workers for the cores). The loader decodes these R x R JPEGs with torchvision's libjpeg-turbo
   op when it gives PIL's pixels (`cmscale.data.images.fast_jpeg_decoder`, printed below);
   `--decoder pil` makes it use PIL as the limit does (CMSCALE_PIL_ONLY=1).
Reported per configuration: images/s in total and per worker (wall clock), and images per CPU-
second of the worker processes (from /proc): the rate of a worker with a core to itself, robust
to other jobs on the machine. Runs are interleaved and the best of `--repeat` is kept.
Goal: per worker >= 90% of the limit, and near-linear in workers while each has a core.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.data import build_loader, center_crop_arr, make_shards  # noqa: E402
from cmscale.data.loader import _cache_pil_blocks  # noqa: E402


def make_jpeg_shards(out: str, n: int) -> str:
    """n distinct 256x256 photo crops (random position and scale) as JPEG shards of 128."""
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    photos = [getattr(data, name)() for name in names]
    rng = np.random.default_rng(0)
    crops = np.empty((n, 256, 256, 3), np.uint8)
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        side = int(rng.integers(256, min(photo.size) + 1))
        x, y = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
        crops[i] = np.asarray(photo.crop((x, y, x + side, y + side)).resize((256, 256), Image.BICUBIC))
    np.savez(os.path.join(out, "crops.npz"), arr_0=crops)
    make_shards(os.path.join(out, "crops.npz"), os.path.join(out, "shards"), 256, shard_size=128,
                image_format="jpg", quality=95, progress=False)
    return os.path.join(out, "shards")


def read_blobs(shard_dir: str) -> list:
    blobs = []
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as tf:
                blobs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    return blobs


def decode_crop(b: bytes) -> np.ndarray:
    """The practical limit's work per image: what a plain PIL loop does (the reference's steps)."""
    return center_crop_arr(Image.open(io.BytesIO(b)).convert("RGB"), 256)


def pil_loop(blobs: list, passes: int) -> tuple:
    """(images/s, images per CPU-second) of the plain loop in this process."""
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for b in blobs:
            decode_crop(b)
    n = passes * len(blobs)
    return n / (time.perf_counter() - t), n / (time.process_time() - cpu)


class PilLoopInWorkers(IterableDataset):
    """The plain loop inside DataLoader workers: worker i decodes blobs i, i+W, ...; a token per 32."""

    def __init__(self, blobs: list):
        self.blobs = blobs

    def __iter__(self):
        info = get_worker_info()
        _cache_pil_blocks()  # as the loader's workers
        mine = self.blobs[info.id::info.num_workers] if info else self.blobs
        while True:
            for k in range(0, len(mine) - 31, 32):
                for b in mine[k:k + 32]:
                    decode_crop(b)
                yield torch.zeros(1)


def children_cpu() -> float:
    """CPU seconds (user + system) used so far by this process's live children (the workers)."""
    total, me, tick = 0.0, os.getpid(), os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:  # ppid
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def measure(iterable, workers: int, n_batches: int, batch: int) -> tuple:
    """(images/s, images per worker-CPU-second, main-process CPU ms per image) after a warm-up."""
    it = iter(iterable)
    for _ in range(2 * workers):  # workers started, first shuffle blocks read
        next(it)
    t, cpu_main, cpu_workers = time.perf_counter(), time.process_time(), children_cpu()
    for _ in range(n_batches):
        next(it)
    n = n_batches * batch
    wall, cpu_main, cpu_workers = time.perf_counter() - t, time.process_time() - cpu_main, children_cpu() - cpu_workers
    del it
    return n / wall, n / max(cpu_workers, 1e-9), 1e3 * cpu_main / n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=768, help="images in the shards")
    p.add_argument("--batch", type=int, default=32, help="batch size per rank")
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure")
    p.add_argument("--repeat", type=int, default=5, help="runs per configuration (best is reported)")
    p.add_argument("--decoder", choices=("auto", "pil"), default="auto",
                   help="the loader's JPEG decoder: auto (the exact fast path when available) or pil")
    a = p.parse_args()
    if a.decoder == "pil":
        os.environ["CMSCALE_PIL_ONLY"] = "1"  # read once, at the first probe (none has run yet)
    from cmscale.data.images import fast_jpeg_decoder
    _cache_pil_blocks()  # the in-process loop gets the same allocator settings as the workers
    workers = [int(x) for x in a.workers.split(",")]
    n_batches = 3 * a.images // a.batch
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_jpeg_shards(tmp, a.images)
        blobs = read_blobs(shards)
        size = sum(len(b) for b in blobs) / len(blobs)
        print(f"shards: {a.images} JPEG 256x256 images (q95, {size / 1024:.1f} KiB each), batch {a.batch}")
        print("loader's JPEG decoder: " + ("torchvision's libjpeg-turbo op (checked bit-exact against PIL)"
                                           if fast_jpeg_decoder() else "PIL"))
        configs = [("pil", w) for w in workers] + [(d, w) for d in (torch.uint8, torch.float32) for w in workers]
        runs = {c: [] for c in configs}
        runs["pil-main"] = []
        for _ in range(a.repeat):  # interleaved, so that load from other jobs hits all alike
            runs["pil-main"].append(pil_loop(blobs, 2) + (0.0,))
            for kind, w in configs:
                if kind == "pil":
                    it = DataLoader(PilLoopInWorkers(blobs), batch_size=None, num_workers=w)
                else:
                    it = build_loader(shards, batch_size_per_rank=a.batch, num_workers=w, seed=0, dtype=kind)
                runs[kind, w].append(measure(it, w, n_batches, a.batch))
        best = {k: (max(r[0] for r in v), max(r[1] for r in v), min(r[2] for r in v)) for k, v in runs.items()}

    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other jobs may share them)")
    wall, cpu, _ = best["pil-main"]
    print(f"PIL loop in this process: {wall:.1f} images/s, {cpu:.1f} images per CPU-second")
    print(f"{'':<24}{'total/s':>9}{'per worker/s':>14}{'% limit':>9}{'per CPU-s':>11}{'% limit':>9}"
          f"{'vs fewest':>13}{'main ms/img':>13}")
    for kind in ("pil", torch.uint8, torch.float32):
        for w in workers:
            wall, cpu, main_ms = best[kind, w]
            lim_wall, lim_cpu, _ = best["pil", w]
            name = ("PIL loop (limit)" if kind == "pil" else f"loader {str(kind).split('.')[1]}") + f", {w} w"
            print(f"{name:<24}{wall:9.1f}{wall / w:14.1f}{100 * wall / lim_wall:8.1f}%{cpu:11.1f}"
                  f"{100 * cpu / lim_cpu:8.1f}%{wall / best[kind, min(workers)][0]:12.2f}x{main_ms:13.3f}")
    print("(% limit: against the PIL loop run in the same number of worker processes; per CPU-s: images "
          "per CPU-second of one worker process)")


if __name__ == "__main__":
    main()
