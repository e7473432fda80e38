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
    """(B, 3, H, W) in [-1, 1] (clamped) -> uint8 (3, rows*(H+pad), cols*(W+pad)) square-ish grid."""
    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
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
