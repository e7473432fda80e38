"""Turn an image source into WebDataset tar shards and a JSON manifest (logic: cmscale.data.shards).

    python tools/make_shards.py SRC OUT_DIR --resolution R [--shard-size N] [--format png|jpg|webp]
                                [--workers W] [--bad-input convert|skip|raise] [--seed S] [--overwrite]

SRC: a folder tree of images (class = first sub-folder), an LSUN lmdb export, an .npz with
`arr_0` uint8 NHWC (optional `arr_1` labels), or an embedded dataset (sklearn:digits, skimage:lfw).
Images are center-cropped and resized as guided-diffusion's center_crop_arr. Shards are renamed
into place only when complete; manifest.json is written last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.data.images import BadInputError  # noqa: E402
from cmscale.data.shards import make_shards, summary  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder, lmdb, .npz, sklearn:digits or skimage:lfw")
    p.add_argument("out_dir")
    p.add_argument("--resolution", type=int, required=True, help="output side in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"], help="image encoding")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--workers", type=int, default=0, help="decode/encode processes (0 or 1: in process)")
    p.add_argument("--bad-input", default="convert", choices=["convert", "skip", "raise"],
                   help="non-RGB / too small / corrupt images: fix what can be fixed, skip, or stop")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--limit", type=int, default=None, help="write at most this many samples")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    a = p.parse_args(argv)
    try:
        m = make_shards(a.src, a.out_dir, a.resolution, shard_size=a.shard_size, image_format=a.format,
                        quality=a.quality, workers=a.workers, seed=a.seed, shuffle=not a.no_shuffle,
                        bad_input=a.bad_input, overwrite=a.overwrite, limit=a.limit)
    except (BadInputError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 1
    print(summary(m, a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
