"""uint8 conversion, image grids and PNG files shared by training, sampling, editing and FID.

``to_uint8`` is the one quantisation of images in [-1, 1]: ``round((clamp(x, -1, 1) + 1) * 127.5)``,
as EDM writes its sample PNGs (openai/consistency_models truncates instead, half a grey level
lower). The FID of samples computed in memory therefore equals the FID of the same samples saved
as PNG.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .atomic import atomic_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W): uint8 input as is; float input in [-1, 1] -> round((x + 1) * 127.5).

    (B, 1, H, W) is replicated to 3 channels. Float input far outside [-1, 1] (e.g. [0, 255]
    floats) is an error rather than silently saturated: pass uint8 for [0, 255] data. Values
    slightly outside [-1, 1] (an unclamped sample) are clamped.
    """
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels (NCHW), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 [0, 255] or float [-1, 1], got {images.dtype}")
    if images.numel() and float(images.detach().abs().max()) > 2.0:
        raise ValueError("float images must be in [-1, 1] (generated samples); pass uint8 for [0, 255] data")
    return _quantize(images)


def _quantize(images: torch.Tensor) -> torch.Tensor:
    # The formula of to_uint8, without its checks: grids also show noisy inputs far outside [-1, 1].
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] (clamped) -> uint8 (3, rows*(H+pad), cols*(W+pad)) square-ish grid.

    (B, 1, H, W) is replicated to 3 channels, as in ``to_uint8``: a grey grid is R = G = B."""
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NCHW), got {tuple(images.shape)}")
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    img = _quantize(images.cpu())
    for i in range(b):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + q * (w + pad):pad + q * (w + pad) + w] = img[i]
    return out


def save_png(array: np.ndarray, path: str, min_side: int = 0) -> None:
    """Write a uint8 HWC (or HW) array as PNG atomically; ``min_side`` enlarges (nearest)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(array))
    scale = max(1, min_side // max(1, min(img.size))) if min_side else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    # No fsync: sampling writes tens of thousands of PNGs, and a killed process (what the
    # rename guards against) leaves no torn file either way.
    with atomic_path(path, fsync=False) as tmp:
        img.save(tmp, format="PNG")


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 x 10^k within [lo, hi] (values, not logarithms)."""
    out = []
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10.0**k for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
    return out or [lo]


def plot_lines(series: dict, path: str, title: str, xlabel: str, ylabel: str,
               log: bool = False) -> None:
    """A PNG line plot (PIL only) of ``{label: [(x, y), ...]}``; ``log``: both axes log10."""
    from PIL import Image, ImageDraw, ImageFont

    def f(v):
        return math.log10(v) if log else v

    W, H = 900, 560
    left, right, top, bottom = 80, 20, 40, 60 + 16 * ((len(series) + 1) // 2)
    img = Image.new("RGB", (W, H + 16 * ((len(series) + 1) // 2)), "white")
    H = img.height
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = [p for v in series.values() for p in v]
    xs, ys = [f(p[0]) for p in pts], [f(p[1]) for p in pts]
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    y0, y1 = (min(ys), max(ys)) if ys else (0, 1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.05, 1.0)
    y0, y1 = y0 - pad, y1 + pad
    if log:
        pad = (x1 - x0) * 0.03
        x0, x1 = x0 - pad, x1 + pad
    pw, ph = W - left - right, H - top - bottom

    def tx(x):
        return left + (f(x) - x0) / (x1 - x0) * pw

    def ty(y):
        return top + (1 - (f(y) - y0) / (y1 - y0)) * ph

    def ticks(lo, hi):
        return _log_ticks(10**lo, 10**hi) if log else _nice_ticks(lo, hi)

    d.text((left, 12), title, fill="black", font=font)
    for t in ticks(y0, y1):
        d.line([(left, ty(t)), (left + pw, ty(t))], fill=(225, 225, 225))
        d.text((5, ty(t) - 6), f"{t:g}", fill="black", font=font)
    for t in ticks(x0, x1):
        d.line([(tx(t), top), (tx(t), top + ph)], fill=(235, 235, 235))
        d.text((tx(t) - 15, top + ph + 5), f"{t:g}", fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 60, top + ph + 22), xlabel, fill="black", font=font)
    d.text((5, top - 16), ylabel, fill="black", font=font)
    for k, (label, pts) in enumerate(series.items()):
        col = _COLORS[k % len(_COLORS)]
        xy = [(tx(x), ty(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for x, y in xy:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
        lx = left + (k % 2) * (pw // 2)
        ly = top + ph + 40 + 16 * (k // 2)
        d.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=col, width=3)
        d.text((lx + 26, ly), label, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        img.save(tmp, format="PNG")
