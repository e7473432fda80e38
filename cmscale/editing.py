"""Zero-shot image editing with a consistency model (Song et al. 2023, section 6, Algorithm 4).

    cmscale edit inpaint     --checkpoint CK --image I --mask M --out DIR
    cmscale edit colorize    --checkpoint CK --image I --out DIR
    cmscale edit superres    --checkpoint CK --image I --factor 8 --out DIR
    cmscale edit stroke      --checkpoint CK --image SKETCH --sigma 20 --out DIR
    cmscale edit denoise     --checkpoint CK --image NOISY --sigma 0.5 --out DIR [--add-noise]
    cmscale edit interpolate --checkpoint CK --seed-a 0 --seed-b 1 --num 8 --out DIR

``CK`` is anything ``cmscale sample`` takes (run dir, checkpoint dir, export, reference ``.pt``
with ``--preset``). Each command writes ``DIR/input.png`` (what the model is given: the masked,
grey, low-resolution, sketched or noisy image), ``DIR/output_000.png ...`` (``--num`` variants,
one noise stream per variant, seeded per index as in ``cmscale sample``) and
``DIR/side_by_side.png`` (input | outputs, enlarged so that a person can see them).

Algorithm 4. Let ``A`` be an invertible linear map under which the known part of the image is
a set of coordinates (``Omega`` marks the unknown ones), ``y`` the reference image, and
``t_1 > ... > t_N`` noise levels. Then

    x  <- A^-1[(A y) (1 - Omega)] + t_1 z                    (start: known part, unknown = 0)
    for n = 1..N:
        x0 <- clamp(f(x, t_n))
        x0 <- A^-1[(A y) (1 - Omega) + (A x0) Omega]          (put the known part back)
        x  <- x0 + sqrt(t_{n+1}^2 - eps^2) z                   (re-noise; none after t_N)
    output x0

Tasks (what is kept exactly, in float32, in the output):

- ``inpaint``: A = identity, the known part is the pixels where the mask is white (>= 128;
  black = to be filled). The unknown part starts at 0 (mid grey).
- ``colorize``: A = the reference's orthogonal colour transform, whose first axis is the
  luminance direction ``v = (0.2989, 0.5870, 0.1140) / |v|``; the known coordinate is
  ``v . rgb`` of the input (its luminance: a colour input is reduced to it). Putting it back is
  ``x0 + v (v.y - v.x0)``; the other two axes need not be built, they are orthogonal to v.
  The start is Algorithm 4's: ``v (v.y)``, the two chroma coordinates zero (a tinted image,
  not the grey of the same luminance; ``input.png`` shows that grey, for people).
- ``superres``: A = per-patch orthonormal basis whose first vector is the constant one (the
  reference's QR construction), i.e. the known coordinate is each ``factor x factor`` patch's
  mean per channel. Putting it back is ``x0 - mean_patch(x0) + mean_patch(y)``. ``--image`` is
  the low-resolution image (side = resolution / factor) or a full-resolution one that is
  reduced by patch averaging. ``--factor`` defaults to 8, the reference's patch size (it uses
  8x8 patches at 256 px); it must divide the resolution.
- ``stroke`` (SDEdit-like): no constraint; start from ``sketch + sigma z`` at ``--sigma`` and run
  the levels below it.
- ``denoise``: no constraint; the input already holds noise of std ``--sigma`` (on the [-1, 1]
  scale), so the first step is ``f(y, sigma)`` with no noise added. A noisy PNG has its noise
  clipped to the pixel range; ``--add-noise`` instead adds exact Gaussian noise to a clean
  image (seeded, the same for all variants) for demonstrations.
- ``interpolate``: one step from ``sigma_max slerp(z_a, z_b, alpha)``, ``alpha`` in
  ``linspace(0, 1, num)``, where z_a, z_b are the noises of image 0 under ``--seed-a`` and
  ``--seed-b``; the ends are exactly ``cmscale sample --seed A/B``'s first image.

A one-channel (grey) network reads its input images as grey (PIL's convert("L")) and writes
R = G = B PNGs; ``colorize`` needs a colour (three-channel) network and refuses a grey one.

One departure from the reference, so that the known part survives the final conversion to
pixels: the reference clamps f before the replacement, and the replacement can then leave
[-1, 1] (a pale pixel given a strong colour, a patch mean near white given texture); the
final clamp then changes the known part. Here the replacement is followed by the smallest
move back into range that keeps the known coordinates: colorization shrinks each pixel's
chroma towards the grey of the same luminance, super-resolution shrinks each patch's
deviations towards its mean. Both grey and the mean are in range, so this always exists.

Noise levels: by default ``--ts 0,5,10,15,20,25,30,35,39 --steps 40``, i.e. eight evaluations
on the 40-point Karras grid of the reference's CD models, ending without re-noising. This is
our choice (the paper does not list its editing levels); ``--ts/--steps`` or ``--sigmas``
change it. ``stroke``/``denoise`` use ``--sigma`` and then the levels below it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import dist, schedules
from .imageio import save_png, to_uint8
from .sampling import PerImageNoise, ts_to_sigmas
from .runs import load_network
from .sample import FixedShapeNet, add_network_args, from_uint8, image_labels
from .sampler import parse_floats, parse_ints

EDIT_TS = (0, 5, 10, 15, 20, 25, 30, 35, 39)
EDIT_STEPS = 40
LUMA = (0.2989, 0.5870, 0.1140)  # the reference's (ITU-R 601) luminance weights
_CORRUPTION_STREAM = 0x6E6F6973  # "nois": --add-noise draws, apart from the images' streams


# ----------------------------------------------------------------------------- known parts


class Inpaint:
    """Known: the pixels where ``keep`` is 1 (``keep`` (1 or B, 1, H, W) of 0/1)."""

    def __init__(self, y: torch.Tensor, keep: torch.Tensor):
        self.y, self.keep = y, keep.to(y.dtype)

    def start(self) -> torch.Tensor:
        return self.y * self.keep

    def shown(self) -> torch.Tensor:
        return self.start()

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return self.y * self.keep + x0 * (1 - self.keep)


class Colorize:
    """Known: the luminance coordinate ``v . rgb`` (v the unit luminance direction)."""

    def __init__(self, y: torch.Tensor):
        self.v = torch.tensor(LUMA, dtype=y.dtype, device=y.device)
        self.v = (self.v / self.v.norm()).view(1, 3, 1, 1)
        self.luma = (y * self.v).sum(1, keepdim=True)           # A y, first coordinate
        self.grey = self.luma / self.v.sum() * torch.ones_like(y)  # in range, same luminance

    def start(self) -> torch.Tensor:
        """Algorithm 4's start A^-1[(A y)(1 - Omega)]: the luminance, chroma coordinates 0."""
        return self.v * self.luma

    def shown(self) -> torch.Tensor:
        return self.grey

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0 + self.v * (self.luma - (x0 * self.v).sum(1, keepdim=True))
        # back into [-1, 1] along the chroma: grey + s (x - grey), largest s <= 1
        return _shrink_towards(self.grey, x - self.grey, per_patch=None)


class SuperRes:
    """Known: the mean of every ``factor x factor`` patch, per channel (``low`` is those means)."""

    def __init__(self, low: torch.Tensor, factor: int):
        self.low, self.factor = low, int(factor)
        self.mean_up = F.interpolate(low, scale_factor=self.factor, mode="nearest")

    def start(self) -> torch.Tensor:
        return self.mean_up

    def shown(self) -> torch.Tensor:
        return self.mean_up

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        k = self.factor
        dev = x0 - F.interpolate(F.avg_pool2d(x0, k), scale_factor=k, mode="nearest")
        return _shrink_towards(self.mean_up, dev, per_patch=k)


def _shrink_towards(centre: torch.Tensor, dev: torch.Tensor, per_patch: int | None):
    """``centre + s dev`` with the largest s in [0, 1] that keeps every value in [-1, 1].

    ``centre`` must be in range. s is per pixel (over channels) when ``per_patch`` is None,
    else per patch and channel, so that patch means (``dev`` sums to 0 per patch) are kept.
    """
    inf = torch.full_like(dev, float("inf"))
    room = torch.where(dev > 0, (1 - centre) / dev.clamp(min=1e-30),
                       torch.where(dev < 0, (-1 - centre) / dev.clamp(max=-1e-30), inf))
    if per_patch is None:
        s = room.amin(1, keepdim=True)
    else:
        s = -F.max_pool2d(-room, per_patch)
        s = F.interpolate(s, scale_factor=per_patch, mode="nearest")
    s = s.clamp(0, 1)
    return centre + s * dev


def patch_means(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, factor)


# ----------------------------------------------------------------------------- the loop


def edit_levels(ts: Sequence[int] = EDIT_TS, steps: int = EDIT_STEPS, sigmas=None,
                sigma_min: float = schedules.SIGMA_MIN, sigma_max: float = schedules.SIGMA_MAX,
                rho: float = schedules.RHO) -> list[float]:
    """Noise levels to evaluate at: explicit ``sigmas``, or ``ts`` into a ``steps`` grid.

    ``ts`` must end at ``steps - 1`` (no re-noising after the last step: the output must
    hold the known part exactly)."""
    if sigmas is not None:
        levels = [float(s) for s in sigmas]
    else:
        levels, final = ts_to_sigmas(ts, steps, sigma_min, sigma_max, rho)
        if final > sigma_min:
            raise ValueError(f"editing ts must end at steps - 1 = {steps - 1} (got {list(ts)}): "
                             f"the output would be re-noised after the last replacement")
    if any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"noise levels must decrease, got {levels}")
    return levels


def levels_from(sigma: float, levels: Sequence[float]) -> list[float]:
    """``sigma`` followed by the given levels below it (stroke, denoise)."""
    return [float(sigma)] + [s for s in levels if s < sigma]


@torch.no_grad()
def edit_sample(net: Callable, noise: PerImageNoise, levels: Sequence[float], start: torch.Tensor,
                replace: Callable | None = None, add_noise: bool = True, class_labels=None,
                sigma_min: float = schedules.SIGMA_MIN,
                sigma_max: float = schedules.SIGMA_MAX) -> torch.Tensor:
    """Algorithm 4 (see the module docstring): multistep sampling with replacement.

    ``start`` (1 or B, C, H, W) is ``x`` before noise; ``add_noise=False`` takes it as already
    noised at ``levels[0]`` (denoising). ``replace`` puts the known part back into each
    ``x0 = clamp(f(x, t_n))``. Returns the last ``x0`` (B, C, H, W)."""
    levels = [float(s) for s in levels]
    if not levels:
        raise ValueError("need at least one noise level")
    if any(not (sigma_min < s <= sigma_max) for s in levels):
        raise ValueError(f"noise levels must lie in ({sigma_min}, {sigma_max}], got {levels}")
    b = len(noise.generators)
    x = start.to(noise.device, noise.dtype).expand(b, *start.shape[1:])
    if add_noise:
        x = x + levels[0] * noise.next()
    x0 = x
    for n, t in enumerate(levels):
        x0 = net(x, torch.full((b,), t, device=x.device), class_labels)
        x0 = x0.clamp(-1, 1).to(noise.dtype)
        if replace is not None:
            x0 = replace(x0)
        if n + 1 < len(levels):
            x = x0 + (levels[n + 1] ** 2 - sigma_min**2) ** 0.5 * noise.next()
    return x0


def slerp(z_a: torch.Tensor, z_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (exact at alpha = 0 and 1)."""
    if alpha == 0:
        return z_a.clone()
    if alpha == 1:
        return z_b.clone()
    a, b = z_a.double(), z_b.double()
    cos = (a * b).sum() / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if theta.abs() < 1e-8:
        out = (1 - alpha) * a + alpha * b
    else:
        out = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)
    return out.to(z_a.dtype)


@torch.no_grad()
def interpolate(net: Callable, z_a: torch.Tensor, z_b: torch.Tensor, num: int, class_labels=None,
                sigma_max: float = schedules.SIGMA_MAX) -> torch.Tensor:
    """One-step samples along slerp(z_a, z_b, alpha), alpha = linspace(0, 1, num)."""
    alphas = np.linspace(0.0, 1.0, num) if num > 1 else np.zeros(1)
    z = torch.stack([slerp(z_a, z_b, float(a)) for a in alphas])
    x = sigma_max * z
    return net(x, torch.full((num,), sigma_max, device=x.device), class_labels).clamp(-1, 1)


# ----------------------------------------------------------------------------- image files


def load_image(path: str, size: int | None = None, *, mode: str = "RGB",
               mask: bool = False) -> torch.Tensor:
    """An image file in PIL ``mode`` (RGB, or L: grey) as (1, C, H, W) float in [-1, 1];
    resized (centre crop + Lanczos, nearest for a ``mask``) when ``size`` is given and differs."""
    from PIL import Image

    img = Image.open(path).convert(mode)
    if size is not None and img.size != (size, size):
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side,
                        (h - side) // 2 + side))
        img = img.resize((size, size), Image.NEAREST if mask else Image.LANCZOS)
        print(f"note: {path} resized from {w}x{h} to {size}x{size}", file=sys.stderr)
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return from_uint8(a[None])


def _pixels(x: torch.Tensor) -> np.ndarray:
    # uint8 (B, H, W, 3) for PNG files; clamped first: a noisy input may lie far outside [-1, 1].
    return to_uint8(x.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()


def write_outputs(out: str, shown: torch.Tensor | None, outputs: torch.Tensor) -> list[str]:
    """``input.png``, ``output_NNN.png`` and ``side_by_side.png`` (input | outputs)."""
    os.makedirs(out, exist_ok=True)
    paths = []
    u = _pixels(outputs)
    for i, img in enumerate(u):
        paths.append(os.path.join(out, f"output_{i:03d}.png"))
        save_png(img, paths[-1])
    tiles = list(u)
    if shown is not None:
        s = _pixels(shown[:1])[0]
        save_png(s, os.path.join(out, "input.png"))
        tiles = [s] + tiles
    h, w = tiles[0].shape[:2]
    pad, gap = 2, 6  # white gutter; a wider one after the input
    extra = gap if shown is not None else 0
    width = sum(t.shape[1] for t in tiles) + pad * (len(tiles) + 1) + extra
    row = np.full((h + 2 * pad, width, 3), 255, np.uint8)
    x = pad
    for k, t in enumerate(tiles):
        row[pad:pad + h, x:x + w] = t
        x += w + pad + (gap if k == 0 and shown is not None else 0)
    save_png(row, os.path.join(out, "side_by_side.png"), min_side=256)
    return paths


# ----------------------------------------------------------------------------- command


TASK_HELP = {
    "inpaint": "fill the black part of --mask, keep the white part of --image",
    "colorize": "colour --image, keeping its luminance",
    "superres": "--factor x larger image whose patch means are the low-resolution --image",
    "stroke": "image from a stroke painting (SDEdit-like, starting at --sigma)",
    "denoise": "remove Gaussian noise of std --sigma (on the [-1, 1] scale)",
    "interpolate": "one-step samples along a slerp between the noises of two seeds",
}
TASKS = tuple(TASK_HELP)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cmscale edit", description=__doc__.split("\n")[0],
                                epilog="example: cmscale edit inpaint --checkpoint runs/digits "
                                       "--image img.png --mask mask.png --out edits/\n"
                                       "Algorithm and defaults: cmscale/editing.py's docstring.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    for task in TASKS:
        s = sub.add_parser(task, help=TASK_HELP[task], description=TASK_HELP[task])
        add_network_args(s)
        s.add_argument("--out", required=True, help="output directory")
        s.add_argument("--num", "--num-images", dest="num", type=int,
                       default=8 if task == "interpolate" else 1,
                       help="interpolation points" if task == "interpolate" else
                       "variants (one noise stream each)")
        s.add_argument("--class", dest="class_label", type=int, default=None,
                       help="class-conditional networks: the class (default: random per index)")
        if task == "interpolate":
            s.add_argument("--seed-a", type=int, required=True)
            s.add_argument("--seed-b", type=int, required=True)
            continue
        s.add_argument("--image", required=True, help="input image file")
        s.add_argument("--ts", default=None,
                       help="indices into the --steps grid (default "
                            f"{','.join(map(str, EDIT_TS))})")
        s.add_argument("--steps", type=int, default=None, help=f"grid size (default {EDIT_STEPS})")
        s.add_argument("--sigmas", default=None, help="explicit noise levels instead of --ts")
        if task == "inpaint":
            s.add_argument("--mask", required=True, help="mask image: white = keep, black = fill")
        if task == "superres":
            s.add_argument("--factor", type=int, default=8,
                           help="patch side (default 8, the reference's)")
        if task == "stroke":
            s.add_argument("--sigma", type=float, default=20.0, help="start noise level (20)")
        if task == "denoise":
            s.add_argument("--sigma", type=float, required=True,
                           help="noise std of the input on the [-1, 1] scale")
            s.add_argument("--add-noise", action="store_true",
                           help="the input is clean: add Gaussian noise of std --sigma first")
    return p.parse_args(argv)


def corruption_noise(seed: int, shape) -> torch.Tensor:
    """The --add-noise draw: its own stream of ``seed``, the same for every variant."""
    g = torch.Generator()
    state = np.random.SeedSequence([int(seed), _CORRUPTION_STREAM]).generate_state(2, np.uint32)
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=g)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("CMSCALE_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


@torch.no_grad()
def run(args) -> int:

    if args.num < 1 or args.batch_size < 1:
        raise ValueError("--num and --batch-size must be >= 1")
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    net, info = load_network(args.checkpoint, args.ema, args.preset, args.mode)
    if info["mode"] == "edm":
        raise ValueError("editing needs a consistency model, not an EDM denoiser")
    device = dist.info().device
    net = net.to(device).requires_grad_(False)
    raw = net.model
    res, ch = raw.image_size, raw.in_channels
    if args.task == "colorize" and ch != 3:
        raise ValueError(f"colorize needs a colour network (3 channels); this one has {ch} "
                         f"(grey)")
    mode = "L" if ch == 1 else "RGB"  # what the network's images are
    smin, smax = float(info["sigma_min"]), float(info["sigma_max"])
    shaped = FixedShapeNet(net, 1 if args.batch_invariant else min(args.batch_size, args.num))
    indices = range(args.num)

    if args.task == "interpolate":
        z_a = PerImageNoise(args.seed_a, [0], (ch, res, res), device=device).next()[0]
        z_b = PerImageNoise(args.seed_b, [0], (ch, res, res), device=device).next()[0]
        label = args.class_label
        if raw.num_classes and label is None:  # seed A's label, as `cmscale sample` gives it
            label = int(image_labels(args.seed_a, [0], raw.num_classes)[0])
        labels = image_labels(0, indices, raw.num_classes, label, device)
        out = interpolate(shaped, z_a, z_b, args.num, labels, sigma_max=smax)
        write_outputs(args.out, None, out)
        print(f"{args.num} images: {args.out}/output_*.png, side_by_side.png")
        return 0

    rho = float(info.get("rho", schedules.RHO))
    ts = parse_ints(args.ts) if args.ts else list(EDIT_TS)
    steps = args.steps or EDIT_STEPS
    if args.ts is None and args.steps and args.sigmas is None:
        raise ValueError("--steps without --ts")
    levels = edit_levels(ts, steps, parse_floats(args.sigmas) if args.sigmas else None,
                         smin, smax, rho)
    noise = PerImageNoise(args.seed, indices, (ch, res, res), device=device)
    labels = image_labels(args.seed, indices, raw.num_classes, args.class_label, device)
    replace, add_noise = None, True

    if args.task == "superres":
        img = load_image(args.image, mode=mode)
        if img.shape[-1] * args.factor == res and img.shape[-2] * args.factor == res:
            low = img
        else:
            if img.shape[-2:] != (res, res):
                img = load_image(args.image, res, mode=mode)
            if res % args.factor:
                raise ValueError(f"--factor {args.factor} does not divide resolution {res}")
            low = patch_means(img, args.factor)
        replace = SuperRes(low.to(device), args.factor)
        start = shown = replace.start()
    else:
        y = load_image(args.image, res, mode=mode).to(device)
        if args.task == "inpaint":
            keep = load_image(args.mask, res, mode="L", mask=True) >= 0.0  # >= 128 of 255
            keep = keep.to(device)
            replace = Inpaint(y, keep)
            start = shown = replace.start()
        elif args.task == "colorize":
            replace = Colorize(y)
            start, shown = replace.start(), replace.shown()
        else:  # stroke, denoise: start at --sigma
            if not smin < args.sigma <= smax:
                raise ValueError(f"--sigma must lie in ({smin}, {smax}]")
            levels = levels_from(args.sigma, levels)
            start = shown = y
            if args.task == "denoise":
                add_noise = False
                if args.add_noise:
                    start = shown = y + args.sigma * corruption_noise(args.seed, y.shape).to(device)
    out = edit_sample(shaped, noise, levels, start, replace, add_noise, labels, smin, smax)
    write_outputs(args.out, shown, out)
    print(f"{args.task}: {args.num} output(s) in {args.out} (levels "
          f"{', '.join(f'{s:.3g}' for s in levels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
