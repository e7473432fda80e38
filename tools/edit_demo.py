"""Run every zero-shot editing task on scikit-learn's digits and write PNGs a person can judge.

    python tools/edit_demo.py --checkpoint runs/digits16 --out edit_demo [--num 4]
    python tools/edit_demo.py --checkpoint tiny16.pt --preset tiny16 --out edit_demo

Uses ``cmscale edit`` itself: the inputs (a digit, a mask hiding its right half, its 4x4 patch
means, a two-level blocky "stroke painting" of it, the digit itself for denoising with exact
Gaussian noise) are written to ``OUT/inputs/``, each task's outputs to ``OUT/<task>/`` and all
side-by-side strips (input | ``--num`` variants) stacked into ``OUT/overview.png``. The
network must work at the digits' resolution (``--resolution``, default: the network's). A
grey (one-channel) network skips colorization.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale import editing  # noqa: E402
from cmscale.runs import load_network  # noqa: E402
from cmscale.imageio import save_png  # noqa: E402


def digit(index: int, res: int) -> np.ndarray:
    from cmscale.data.images import center_crop_arr
    from cmscale.data.sources import EmbeddedSource

    return center_crop_arr(EmbeddedSource("sklearn:digits").load(index)[0], res)


def make_inputs(folder: Path, res: int, factor: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def put(name, array):
        files[name] = str(folder / f"{name}.png")
        save_png(array, files[name])

    # different digits per task, so the overview shows several shapes
    put("inpaint", digit(0, res))
    mask = np.full((res, res), 255, np.uint8)
    mask[:, res // 2:] = 0  # black = to be filled: the right half
    put("mask", mask)
    put("colorize", digit(3, res))
    d = digit(2, res).astype(np.float64)
    low = d.reshape(res // factor, factor, res // factor, factor, 3).mean((1, 3))
    put("superres", np.rint(low).astype(np.uint8))
    d = digit(7, res)
    blocky = d.reshape(res // 2, 2, res // 2, 2, 3).mean((1, 3)) > 96  # strokes, 2x2 pixels
    put("stroke", np.repeat(np.repeat(blocky * 255, 2, 0), 2, 1).astype(np.uint8))
    put("denoise", digit(5, res))
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="anything `cmscale sample` takes")
    p.add_argument("--preset", default=None, help="UNet preset of a reference .pt")
    p.add_argument("--ema", default="", help="network of a run (EMA name/rate, online)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=4, help="variants per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factor", type=int, default=4, help="super-resolution factor")
    p.add_argument("--stroke-sigma", type=float, default=20.0)
    p.add_argument("--denoise-sigma", type=float, default=0.5)
    args = p.parse_args(argv)

    net, info = load_network(args.checkpoint, args.ema, args.preset)
    res, grey = net.model.image_size, net.model.in_channels == 1
    del net
    out = Path(args.out)
    inputs = make_inputs(out / "inputs", res, args.factor)
    common = ["--checkpoint", args.checkpoint, "--seed", str(args.seed)]
    common += ["--preset", args.preset] if args.preset else []
    common += ["--ema", args.ema] if args.ema else []
    tasks = {
        "inpaint": ["--image", inputs["inpaint"], "--mask", inputs["mask"]],
        "colorize": ["--image", inputs["colorize"]],
        "superres": ["--image", inputs["superres"], "--factor", str(args.factor)],
        "stroke": ["--image", inputs["stroke"], "--sigma", str(args.stroke_sigma)],
        "denoise": ["--image", inputs["denoise"], "--sigma", str(args.denoise_sigma),
                    "--add-noise"],
        "interpolate": ["--seed-a", str(args.seed), "--seed-b", str(args.seed + 1)],
    }
    if grey:
        del tasks["colorize"]  # a grey (one-channel) network has no colour to give
    strips = []
    for task, extra in tasks.items():
        num = max(args.num, 5) if task == "interpolate" else args.num
        code = editing.main([task, *common, *extra, "--num", str(num), "--out", str(out / task)])
        if code != 0:
            return code
        strips.append(np.asarray(Image.open(out / task / "side_by_side.png").convert("RGB")))
    width = max(s.shape[1] for s in strips)
    rows = [np.pad(s, ((0, 8), (0, width - s.shape[1]), (0, 0)), constant_values=255)
            for s in strips]
    save_png(np.concatenate(rows), str(out / "overview.png"))
    print(f"network: {info.get('network') or info['source']} at nimg={info.get('nimg')}; rows of "
          f"{out / 'overview.png'}: {', '.join(tasks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
