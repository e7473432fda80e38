"""FID throughput: cmscale.metrics against clean-fid's compute_fid, same images, same network.

    python benchmarks/bench_fid.py [--num 1000] [--res 32] [--batch-size 50] [--workers 1]
                                   [--threads 1] [--ranks 2] [--skip-cleanfid] [--cleanfid-first]

Two folders of --num/2 PNG images each (scikit-learn digits upsampled to --res; the second
folder with pixel noise so the FID is not small). The feature network is torchvision's
Inception-v3 architecture with random weights (no pretrained weights offline), its batch-norm
statistics calibrated once on a few images so features are O(1), applied to (x - 128) / 128 as
clean-fid's InceptionV3W does. Both pipelines get the same network:
- clean-fid: `compute_fid(A, B, mode="clean", custom_feat_extractor=fn, device=cpu,
  num_workers=W, batch_size=B)`; fn receives float B x 3 x 299 x 299 in [0, 255];
- ours: `CustomExtractor(net, optimize=True)` + `compute_stats_from_folder`: decode and clean
  resize in W DataLoader workers, the network in the main process under inference_mode, with
  batch norms folded into the convolutions (torch.fx), NHWC (channels_last) convolutions and
  the network run in stages over cache-sized chunks of the batch (`ChunkedStages`); then
  `fid_from_stats` (Tr sqrt(S1 S2) from eigenvalues; clean-fid runs scipy's sqrtm). And the
  same on --ranks gloo processes (each rank one share of the files, statistics all-reduced). `--no-optimize` keeps the module as it is.
The resize is identical (Pillow "clean" mode in both), so the FID values must agree; they differ
by float32 rounding of the folded NHWC convolutions (about 1e-7 relative in the features).
Prints images/s for each (both folders, i.e. --num images, per wall-clock second), the ratio
and the FID values. Every process uses --threads torch threads (default 1).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_folders(root: str, num: int, res: int) -> tuple[str, str]:
    from PIL import Image

    from cmscale.metrics.features import digits_images

    x, _ = digits_images(res)
    if num > len(x):
        raise SystemExit(f"--num {num}: the digits dataset has {len(x)} images")
    rng = np.random.default_rng(0)
    half = num // 2
    dirs = []
    for name, part in (("a", x[:half]), ("b", x[half:2 * half])):
        if name == "b":
            part = np.clip(part.astype(int) + rng.integers(-60, 61, part.shape), 0, 255).astype(np.uint8)
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for i, im in enumerate(part):
            Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).save(os.path.join(d, f"{i:05d}.png"))
        dirs.append(d)
    return dirs[0], dirs[1]


def make_net(seed: int = 0) -> torch.nn.Module:
    """Random-weight torchvision Inception-v3 (2048-D pool features), BN statistics calibrated."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = torch.nn.Identity()
    # Calibrate batch-norm statistics on 8 fixed smooth random images (cumulative averages), so
    # that features are O(1) instead of vanishing through 90 randomly initialised layers.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    g = torch.Generator().manual_seed(seed)
    calib = torch.nn.functional.interpolate(torch.rand(8, 3, 16, 16, generator=g), size=299, mode="bilinear")
    net.train()
    with torch.no_grad():
        net(calib * 2 - 1)
    return net.eval()


class Normalised(torch.nn.Module):
    """net((x - 128) / 128) * scale: clean-fid's InceptionV3W input normalisation around any network.

    scale = 0.1 brings the random network's features to the magnitude of real Inception pool
    features. With fewer images than feature dimensions (here 500 < 2048) the covariances are
    singular and sqrtm returns small imaginary parts, which clean-fid rejects above 1e-3
    (absolute): at the unscaled magnitude its compute_fid raised "Imaginary component 0.006".
    """

    def __init__(self, net, scale: float = 0.1):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net((x - 128) / 128) * self.scale


def run_ours(a: str, b: str, net, args) -> float:
    from cmscale.metrics import CustomExtractor
    from cmscale.metrics.fid import compute_stats_from_folder, fid_from_stats

    ex = CustomExtractor(net, name="inception-v3-random", dim=2048, optimize=args.optimize)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, max_kept=0)
    return fid_from_stats(compute_stats_from_folder(a, ex, **kw), compute_stats_from_folder(b, ex, **kw)).fid


def _rank_main(rank: int, world: int, store: str, a: str, b: str, args, out: str):
    import torch.distributed as tdist

    torch.set_num_threads(args.threads)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        net = Normalised(make_net())
        tdist.barrier()
        t0 = time.perf_counter()
        fid = run_ours(a, b, net, args)
        tdist.barrier()
        if rank == 0:
            np.save(out, np.array([fid, time.perf_counter() - t0]))
    finally:
        tdist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1000, help="images in total (two folders of num/2)")
    p.add_argument("--res", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (both pipelines)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--ranks", type=int, default=2, help="also run ours on this many gloo processes (0: no)")
    p.add_argument("--skip-cleanfid", action="store_true")
    p.add_argument("--cleanfid-first", action="store_true", help="run clean-fid before ours (load drift)")
    p.add_argument("--no-optimize", dest="optimize", action="store_false",
                   help="ours without batch-norm folding, channels_last and chunked stages")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_fid_") as tmp:
        return _run(args, tmp)


def _run(args, tmp: str) -> int:
    a, b = make_folders(tmp, args.num, args.res)
    n = 2 * (args.num // 2)
    print(f"{n} PNG images {args.res}x{args.res} in two folders; random Inception-v3 (torchvision), "
          f"batch {args.batch_size}, {args.workers} worker(s), {args.threads} thread(s)/process, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    net = Normalised(make_net())
    rows = {}

    def ours():
        t0, c0 = time.perf_counter(), time.process_time()
        fid = run_ours(a, b, net, args)
        rows["ours, 1 process"] = (fid, time.perf_counter() - t0)
        print(f"ours, 1 process: {n / rows['ours, 1 process'][1]:.2f} images/s, FID {fid:.6f}, "
              f"main-process CPU {1000 * (time.process_time() - c0) / n:.0f} ms/image", flush=True)

    def theirs():
        from cleanfid import fid as cfid

        def fn(x):
            with torch.no_grad():
                return net(x)

        t0, c0 = time.perf_counter(), time.process_time()
        fid = cfid.compute_fid(a, b, mode="clean", custom_feat_extractor=fn, device=torch.device("cpu"),
                               num_workers=args.workers, batch_size=args.batch_size, verbose=False)
        rows["clean-fid"] = (fid, time.perf_counter() - t0)
        print(f"clean-fid: {n / rows['clean-fid'][1]:.2f} images/s, FID {fid:.6f}, "
              f"main-process CPU {1000 * (time.process_time() - c0) / n:.0f} ms/image", flush=True)

    order = [theirs, ours] if args.cleanfid_first else [ours, theirs]
    for run in order:
        if run is theirs and args.skip_cleanfid:
            continue
        run()

    if args.ranks > 1:
        import torch.multiprocessing as mp

        out = os.path.join(tmp, "ranks.npy")
        mp.spawn(_rank_main, args=(args.ranks, os.path.join(tmp, "store"), a, b, args, out),
                 nprocs=args.ranks, join=True)
        fid, secs = np.load(out)
        rows[f"ours, {args.ranks} gloo ranks"] = (float(fid), float(secs))
        print(f"ours, {args.ranks} gloo ranks: {n / secs:.2f} images/s, FID {fid:.6f} "
              f"(timed after process start and model build)", flush=True)

    print("\n| pipeline | images/s | FID |\n|---|---|---|")
    for name, (fid, secs) in rows.items():
        print(f"| {name} | {n / secs:.2f} | {fid:.10g} |")
    if "clean-fid" in rows:
        ref_fid, ref_secs = rows["clean-fid"]
        for name, (fid, secs) in rows.items():
            if name != "clean-fid":
                print(f"{name} vs clean-fid: {ref_secs / secs:.2f}x faster, FID relative difference "
                      f"{abs(fid - ref_fid) / abs(ref_fid):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
