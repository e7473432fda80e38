"""Image grids and PNG files shared by training, sampling and editing."""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def make_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 (3, rows*(H+pad), cols*(W+pad)) square-ish grid."""
    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    img = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
    tmp = f"{path}.tmp-{os.getpid()}"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
