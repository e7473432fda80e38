"""``cmscale make-shards SRC --out DIR --resolution R``: images -> WebDataset tar shards.

    cmscale make-shards SRC --out OUT_DIR --resolution R [--shard-size N] [--format png|jpg|webp]
        [--workers W] [--bad-input convert|skip|raise] [--seed S] [--num N] [--overwrite]

(logic: cmscale.data.shards; ``OUT_DIR`` may also be given as the second positional argument.)

SRC: a folder tree of images (class = first sub-folder), an LSUN lmdb export, an .npz with
`arr_0` uint8 NHWC (optional `arr_1` labels), or an embedded dataset (sklearn:digits, skimage:lfw).
Images are center-cropped and resized as guided-diffusion's center_crop_arr. Shards are renamed
into place only when complete; manifest.json is written last.
"""
from __future__ import annotations

import argparse
import sys

from .cli import out_path
from .data.images import BadInputError
from .data.shards import make_shards, summary

EXAMPLE = "example: cmscale make-shards sklearn:digits --out data/digits16 --resolution 16"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmscale make-shards", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder, lmdb, .npz, sklearn:digits or skimage:lfw")
    p.add_argument("out_pos", nargs="?", metavar="OUT_DIR", help="same as --out")
    p.add_argument("--out", default=None, help="output directory for the shards and manifest")
    p.add_argument("--resolution", type=int, required=True, help="output side in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"], help="image encoding")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--workers", type=int, default=0, help="decode/encode processes (0 or 1: in process)")
    p.add_argument("--bad-input", default="convert", choices=["convert", "skip", "raise"],
                   help="non-RGB / too small / corrupt images: fix what can be fixed, skip, or stop")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--num", "--limit", dest="limit", type=int, default=None,
                   help="write at most this many samples")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    a = p.parse_args(argv)
    a.out_dir = out_path(p, a.out_pos, a.out)
    try:
        m = make_shards(a.src, a.out_dir, a.resolution, shard_size=a.shard_size, image_format=a.format,
                        quality=a.quality, workers=a.workers, seed=a.seed, shuffle=not a.no_shuffle,
                        bad_input=a.bad_input, overwrite=a.overwrite, limit=a.limit)
    except (BadInputError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"make-shards: error: {e}", file=sys.stderr)
        return 1
    print(summary(m, a.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
