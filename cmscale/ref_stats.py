"""``cmscale ref-stats SRC --out OUT.npz``: reference statistics for FID/KID from images.

    cmscale ref-stats SRC --out OUT.npz [--extractor inception|digits] [--inception PATH]
        [--download] [--batch-size 64] [--num N] [--workers 2] [--max-kept 10000]

(``OUT.npz`` may also be given as the second positional argument.)

SRC is one of
- an image folder (recursive; clean-fid's extensions and sorted order);
- a reference batch .npz: `arr_0` uint8 NHWC (openai/guided-diffusion's layout), memory-mapped
  when stored uncompressed;
- WebDataset shards as cmscale.data reads them: a directory of .tar shards (with or without
  its manifest.json), a brace pattern or glob of .tar files; the first image member of each
  sample is used.
`--num N` uses the first N images (folder: sorted order; npz: array order; shards: stream order).

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
import sys
import time

from . import dist
from .cli import out_path
from .metrics import features as F
from .metrics.refstats import compute

EXAMPLE = ("example: cmscale ref-stats data/digits16 --out digits16_ref.npz --extractor digits\n"
           "         torchrun --nproc_per_node=4 -m cmscale.ref_stats /data/cat256 --out cat.npz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmscale ref-stats", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image folder, reference batch .npz, or WebDataset shards")
    p.add_argument("out_pos", nargs="?", metavar="OUT", help="same as --out")
    p.add_argument("--out", default=None, help="output statistics .npz")
    p.add_argument("--extractor", default="inception", choices=["inception", "digits"])
    p.add_argument("--inception", default=None, help="path of inception-2015-12-05.pt (or its directory)")
    p.add_argument("--download", action="store_true", help="download the Inception weights if missing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num", "--limit", dest="limit", type=int, default=None,
                   help="use the first N images")
    p.add_argument("--workers", type=int, default=2, help="decode/resize workers (image folders)")
    p.add_argument("--max-kept", type=int, default=10_000, help="features kept in the file for KID (0: none)")
    p.add_argument("--device", default=None, help="extractor device (default: the rank's device)")
    a = p.parse_args(argv)
    a.out = out_path(p, a.out_pos, a.out)

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
        print(f"ref-stats: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
