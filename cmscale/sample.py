"""``cmscale sample --checkpoint CK --num N --out OUT``: images from a consistency model.

    cmscale sample --checkpoint runs/cat --num 50000 --out samples/cat            # one step
    cmscale sample --checkpoint runs/cat --num 50000 --out s --ts 0,62,150 --steps 151
    cmscale sample --checkpoint cd_imagenet64_lpips.pt --preset imagenet64 --num 500 --out s \\
        --sigmas 80,0.8 --class-cond-random
    torchrun --nproc_per_node=8 -m cmscale.sample --num-images 50000 ...   (srun, mpiexec too)

(Under torchrun write ``--num-images``: torchrun's parser reads ``--num`` as an ambiguous
abbreviation of its own ``--numa-binding`` and refuses to start.)

``CK`` is one of: a run directory (its newest complete checkpoint), a checkpoint directory
``RUN/checkpoints/nimg-*``, an export written by ``cmscale export`` (``.safetensors``/``.pt``
with its ``.json`` beside it), a public openai/consistency_models ``.pt`` (then ``--preset``
names the UNet; it must load with strict=True), or a diffusers folder (``unet/`` +
``scheduler/``, e.g. written by ``cmscale export --format diffusers``). ``--ema`` picks the
network of a run: an EMA name (``ema_0_9999``) or rate (``0.9999``), ``online`` or ``target``.

Sampling (Song et al. 2023, Algorithm 1): one step ``clamp(f(sigma_max z, sigma_max))`` by default;
``--ts/--steps`` is the reference's multistep form (indices into a Karras grid), ``--sigmas`` an
explicit list of levels. Runs saved in ``edm`` mode are EDM denoisers: they get the Heun
sampler with ``--steps`` (default 40, NFE 79, the reference's teacher setting) instead. Runs
saved in ``sct``/``scd`` mode (TrigFlow) sample one step at t = pi/2 by default and take
``--times max,1.1`` (TrigFlow times) as well as the options above.

Outputs, all written atomically (temporary name, then ``os.replace``):

- ``OUT/images/000000.png ...`` one PNG per image index (written by the rank that made it);
- ``OUT/samples.npz`` the reference evaluator's layout: ``arr_0`` uint8 (N, H, W, 3) and, for
  class-conditional networks, ``arr_1`` int64 labels; assembled by rank 0 from per-rank part
  files (``OUT/.parts-W/``, deleted afterwards), streamed so that N x H x W x 3 bytes never sit
  in memory, with fixed zip timestamps so that equal images give equal bytes;
- ``OUT/grid.png`` the first (up to) 64 images; ``OUT/sample.json`` the settings.

A one-channel (grey) network's images are written as RGB with R = G = B (``to_uint8``), so the
files have the same layout as any other and every FID tool reads them.

Pixels are ``round((x + 1) * 127.5)`` (the reference truncates instead; 0.5 level darker).

Files do not depend on the world size, and with ``--batch-invariant`` not on the batch size
either: image ``i`` gets noise stream (seed, i) and every network call has the same shape
(``docs/determinism.md``, "Sampling").

Loading happens before the process group exists: ``runs.load_network`` assembles the
EMA as one process (its sharded state is meant for that), every rank reads the files itself,
and then rank 0's weights are broadcast so that all ranks use the same checkpoint even if a
training run commits a newer one meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import zipfile
from typing import Iterable, Sequence

import numpy as np
import torch

from . import dist
from .imageio import make_grid, save_png, to_uint8
from .runs import RECORD_KEYS, load_network
from .sampler import Sampler
from .sampling import PerImageNoise

GRID_IMAGES = 64
_LABEL_STREAM = 0x6C61626C  # "labl": separates label draws from the noise stream (seed, i)


# ----------------------------------------------------------------------------- loading


def broadcast_weights(net: torch.nn.Module) -> None:
    """Make every rank's weights rank 0's (no-op for one process)."""
    if dist.get_world_size() > 1:
        for t in net.state_dict().values():
            dist.broadcast(t, src=0)


# ----------------------------------------------------------------------------- sampling


class FixedShapeNet:
    """Calls ``net(x, sigma, labels)`` in chunks of exactly ``rows`` images.

    A short chunk is padded with copies of its last image and the padding's outputs are
    dropped, so every network call has the same shape (see the module docstring for why).
    """

    def __init__(self, net, rows: int):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.net, self.rows = net, int(rows)

    def __call__(self, x: torch.Tensor, sigma, class_labels=None, **kw) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma.reshape(b)
        outs = []
        for start in range(0, b, self.rows):
            sl = slice(start, start + self.rows)
            xs, ss = x[sl], sigma[sl]
            ls = None if class_labels is None else class_labels[sl]
            n = xs.shape[0]
            if n < self.rows:
                pad = self.rows - n
                xs = torch.cat([xs, xs[-1:].expand(pad, *xs.shape[1:])])
                ss = torch.cat([ss, ss[-1:].expand(pad)])
                if ls is not None:
                    ls = torch.cat([ls, ls[-1:].expand(pad, *ls.shape[1:])])
            outs.append(self.net(xs, ss, ls, **kw)[:n])
        return torch.cat(outs)


def image_labels(seed: int, indices: Sequence[int], num_classes: int | None,
                 fixed: int | None = None, device=None) -> torch.Tensor | None:
    """Class label of each image index: ``fixed``, or a draw from the stream (seed, i, labels).

    None for an unconditional network (then ``fixed`` must be None)."""
    if not num_classes:
        if fixed is not None:
            raise ValueError("--class given, but the network is not class-conditional")
        return None
    if fixed is not None:
        if not 0 <= fixed < num_classes:
            raise ValueError(f"--class {fixed} outside [0, {num_classes - 1}]")
        labels = [fixed] * len(indices)
    else:
        labels = [int(np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([int(seed), int(i), _LABEL_STREAM]))).integers(num_classes))
                  for i in indices]
    return torch.tensor(labels, dtype=torch.long, device=device)


def from_uint8(u: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1] (exact inverse of
    cmscale.imageio.to_uint8)."""
    return torch.from_numpy(np.array(u, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- files


def image_name(i: int, num: int) -> str:
    return f"{i:0{max(6, len(str(max(num - 1, 0))))}d}.png"


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def save_npy(array: np.ndarray, path: str) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_npz(path: str, arrays: dict) -> None:
    """Write an uncompressed ``.npz`` atomically, streaming each array.

    ``arrays`` maps a name to an ndarray or to ``(shape, dtype, chunks)`` where ``chunks`` is an
    iterable of C-ordered arrays whose concatenation along axis 0 is the array. Zip entries get a
    fixed timestamp, so the file's bytes depend only on the arrays. ``np.load`` reads it.
    """
    tmp = _tmp(path)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            if isinstance(value, np.ndarray):
                shape, dtype, chunks = value.shape, value.dtype, [value]
            else:
                shape, dtype, chunks = value
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": tuple(int(s) for s in shape)}
            written = 0
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    f.write(chunk.tobytes())
                    written += chunk.shape[0] if chunk.ndim else 1
            if shape and written != shape[0]:
                raise RuntimeError(f"{name}: wrote {written} rows, expected {shape[0]}")
    os.replace(tmp, path)


def grid_png(images: np.ndarray, path: str) -> None:
    """Save a square-ish grid of uint8 (B, H, W, 3) images (enlarged to be seen)."""
    grid = make_grid(from_uint8(images))
    save_png(grid.permute(1, 2, 0).numpy(), path, min_side=512)


def _assemble(out: str, num: int, world: int, shape: tuple, labels) -> str:
    """Rank 0: the npz from the per-rank parts (image i is row i // W of rank i % W's part)."""
    parts_dir = os.path.join(out, f".parts-{world}")
    parts = [np.load(os.path.join(parts_dir, f"rank-{r:05d}.npy"), mmap_mode="r")
             for r in range(world)]

    def chunks(step: int = 256) -> Iterable[np.ndarray]:
        for start in range(0, num, step):
            idx = range(start, min(num, start + step))
            yield np.stack([parts[i % world][i // world] for i in idx])

    arrays = {"arr_0": ((num, *shape), np.uint8, chunks())}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy().astype(np.int64)
    path = os.path.join(out, "samples.npz")
    write_npz(path, arrays)
    grid_png(np.stack([parts[i % world][i // world] for i in range(min(num, GRID_IMAGES))]),
             os.path.join(out, "grid.png"))
    parts.clear()  # drop the memory maps before deleting their files
    for r in range(world):
        os.remove(os.path.join(parts_dir, f"rank-{r:05d}.npy"))
    os.rmdir(parts_dir)
    return path


# ----------------------------------------------------------------------------- command


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run dir, RUN/checkpoints/nimg-* dir, export (.safetensors/.pt + .json), "
                        "reference .pt (with --preset) or diffusers folder")
    p.add_argument("--ema", default="", help="network of a run: EMA name or rate (default: "
                   "the run's first EMA), 'online' or 'target'")
    p.add_argument("--preset", default=None, help="UNet preset of a reference .pt "
                   "(lsun256, imagenet64, ...)")
    p.add_argument("--mode", default=None, choices=["cm", "edm"],
                   help="reference .pt kind: consistency model (default) or EDM denoiser")
    p.add_argument("--seed", type=int, default=0, help="noise seed; image i uses stream (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="images per network call per rank")
    p.add_argument("--batch-invariant", action="store_true",
                   help="one image per network call: files identical for any --batch-size")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) (GPU runs)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="cmscale sample", description=__doc__.split("\n")[0],
        epilog="example: cmscale sample --checkpoint runs/digits --num 64 --out samples/ "
               "--ts 0,20,39 --steps 40", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_args(p)
    # --num-images too: torchrun's own parser takes "--num" for an abbreviation of its
    # --numa-binding and stops ("ambiguous option"), even after the script's name.
    p.add_argument("--num", "--num-images", dest="num", type=int, required=True,
                   help="number of images (write --num-images under torchrun)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ts", default=None, help="multistep: indices into a Karras grid, "
                   "e.g. 0,62,150 (with --steps 151)")
    p.add_argument("--steps", type=int, default=None,
                   help="Karras grid size for --ts (EDM denoisers: Heun steps, default 40)")
    p.add_argument("--sigmas", default=None, help="multistep: noise levels, e.g. 80,0.8")
    p.add_argument("--times", default=None,
                   help="sct/scd runs: TrigFlow times, e.g. max,1.1 (default: one step at pi/2)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class-conditional networks: this class for every image")
    g.add_argument("--class-cond-random", action="store_true",
                   help="class-conditional networks: a random class per image (the default)")
    return p.parse_args(argv)


def prepare(args):
    """Load the network, join the process group, move to the device. Returns (net, info, d)."""
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    net, info = load_network(args.checkpoint, args.ema, args.preset, args.mode)
    # After loading: checkpoint loading must run as one process (see the module docstring).
    d = dist.init(timeout=datetime.timedelta(hours=2))
    broadcast_weights(net)
    return net.to(d.device).requires_grad_(False), info, d


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.num < 1 or args.batch_size < 1:
            raise ValueError("--num and --batch-size must be >= 1")
        net, info, d = prepare(args)
        try:
            run(args, net, info, d)
        finally:
            dist.shutdown()
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("CMSCALE_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@torch.no_grad()
def run(args, net, info: dict, d) -> None:
    rank, world, device = d.rank, d.world_size, d.device
    sampler = Sampler.from_flags(info["mode"], args.ts, args.steps, args.sigmas, args.times)
    grid = dict(sigma_min=float(info["sigma_min"]), sigma_max=float(info["sigma_max"]),
                rho=float(info["rho"]))
    raw = net.model
    res, channels, num_classes = raw.image_size, raw.in_channels, raw.num_classes
    shaped = FixedShapeNet(net, 1 if args.batch_invariant else min(args.batch_size, args.num))
    fixed = args.class_label
    images_dir = os.path.join(args.out, "images")
    parts_dir = os.path.join(args.out, f".parts-{world}")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(parts_dir, exist_ok=True)
    if rank == 0:
        stale = [n for n in os.listdir(images_dir) if re.fullmatch(r"\d+\.png", n)
                 and int(n[:-4]) >= args.num]
        if stale:
            print(f"warning: {images_dir} holds {len(stale)} images with index >= {args.num} "
                  f"from an earlier run (left alone)", file=sys.stderr)

    mine = list(range(rank, args.num, world))
    part = np.zeros((len(mine), res, res, 3), np.uint8)  # grey: replicated by to_uint8
    for start in range(0, len(mine), args.batch_size):
        chunk = mine[start:start + args.batch_size]
        noise = PerImageNoise(args.seed, chunk, (channels, res, res), device=device)
        labels = image_labels(args.seed, chunk, num_classes, fixed, device)
        images = sampler.run(shaped, noise, labels, **grid).clamp(-1, 1)
        images = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        part[start:start + len(chunk)] = images
        for i, img in zip(chunk, images):
            save_png(img, os.path.join(images_dir, image_name(i, args.num)))
        done = min(args.num, (start + len(chunk)) * world)
        dist.print0(f"sampled ~{done}/{args.num}")
    save_npy(part, os.path.join(parts_dir, f"rank-{rank:05d}.npy"))
    dist.barrier()
    if rank == 0:
        labels = image_labels(args.seed, range(args.num), num_classes, fixed)
        path = _assemble(args.out, args.num, world, (res, res, 3), labels)
        settings = dict(checkpoint={k: info[k] for k in RECORD_KEYS if k in info},
                        num=args.num, seed=args.seed, resolution=res, class_label=fixed,
                        class_conditional=bool(num_classes), **sampler.describe(**grid))
        tmp = _tmp(os.path.join(args.out, "sample.json"))
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=2)
        os.replace(tmp, os.path.join(args.out, "sample.json"))
        print(f"{args.num} images: {images_dir}/, {path}, {os.path.join(args.out, 'grid.png')}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
