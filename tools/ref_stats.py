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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from cmscale import dist  # noqa: E402
from cmscale.metrics import features as F  # noqa: E402
from cmscale.metrics.refstats import compute  # noqa: E402


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
