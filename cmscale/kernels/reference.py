"""PyTorch reference implementations of the fused kernels (``cmscale.kernels``).

These are what the network runs when ``net.kernels`` resolves to ``torch``, and what the Triton
kernels are tested against. Each is written with the ops the network used before fusion, so
the ``torch`` path is bitwise the unfused network.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F


def has_tangent(*tensors) -> bool:
    """Whether any tensor carries a forward-mode tangent (``torch.func.jvp`` or
    ``torch.autograd.forward_ad``): kernels without a forward-mode rule then take the
    reference path."""
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v from elementary ops (q, k, v: (B, H, L, d)); every op has
    forward- and reverse-mode derivatives, so ``torch.func.jvp`` works through it."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    # the softmax in at least float32 (bf16/fp16 scores are cast up, float64 kept)
    return torch.softmax(s.float() if s.element_size() < 4 else s, dim=-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention, scale 1/sqrt(d), on (B, H, L, d) views of any strides.

    ``F.scaled_dot_product_attention`` when no input carries a tangent; its fused CPU/GPU
    kernels have no forward-mode derivative, so under ``torch.func.jvp`` the same function is
    computed by ``attention_math``."""
    if has_tangent(q, k, v):
        return attention_math(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(GroupNorm(x) * (1 + scale) + shift), GroupNorm in float32 (ADM's GroupNorm32) and
    cast back to x's dtype before the scale-shift; ``scale``/``shift``: (B, C) or None."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 kept (checks)
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    return scale_shift_silu(F.group_norm(x.to(ct), groups, w, b, eps).to(x.dtype), scale, shift)


def scale_shift_silu(h: torch.Tensor, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(h * (1 + scale) + shift) of a normalised ``h``; ``scale``/``shift``: (B, C) or None."""
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


@torch.no_grad()
def ema_update(averages: list[torch.Tensor], src: list[torch.Tensor], rates: list[float]) -> None:
    """``avg <- rate * avg + (1 - rate) * src`` for every average (rate 0: a copy).

    ``averages``: flat float32 tensors of as many entries as the pieces of ``src`` together
    (``src``: the parameters' slices, in order)."""
    sizes = [t.numel() for t in src]
    for avg, rate in zip(averages, rates):
        if not src:
            continue
        dst = list(avg[:sum(sizes)].split(sizes))
        src_flat = [t.reshape(-1) for t in src]
        if rate == 0.0:
            torch._foreach_copy_(dst, src_flat)
        else:
            torch._foreach_mul_(dst, rate)
            torch._foreach_add_(dst, src_flat, alpha=1.0 - rate)
