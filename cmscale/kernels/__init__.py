"""Fused kernels for the ADM UNet and the averages, each with a PyTorch reference.

``net.kernels`` chooses: ``torch`` (the references, :mod:`cmscale.kernels.reference`),
``triton`` (:mod:`cmscale.kernels.triton_kernels`), or ``auto``: Triton on a CUDA device when
Triton imports, the references otherwise. The decision is per call, from the input's device.

- ``attention(q, k, v)``: softmax(q k^T / sqrt(d)) v on (B, H, L, d) views of the ADM block's
  qkv convolution; forward, backward and forward-mode JVP (``torch.func.jvp``) on both paths.
- ``group_norm_silu(x, groups, weight, bias, eps, scale, shift)``: SiLU(GroupNorm(x) (1 + scale)
  + shift) of every ADM ResBlock, forward and backward; under forward-mode AD the reference.
- ``ema_update(averages, src, rates)``: the target and all evaluation averages updated from
  one read of the parameters.

Triton runs on a CPU only under ``TRITON_INTERPRET=1`` (slow; for tests): ``triton`` on a CPU
without it is an error, ``auto`` never picks it there.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from . import reference

__all__ = ["KERNELS", "attention", "ema_update", "group_norm_silu", "resolve", "triton_available"]

KERNELS = ("auto", "triton", "torch")


@functools.cache  # asked on every kernel call (resolve): look the package up once
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(kernels: str, device: torch.device | str) -> str:
    """``triton`` or ``torch`` for the ``net.kernels`` choice on ``device``."""
    if kernels not in KERNELS:
        raise ValueError(f"net.kernels={kernels!r}: choose one of {list(KERNELS)}")
    device = torch.device(device)
    if kernels == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if kernels == "triton":
        if not triton_available():
            raise RuntimeError("net.kernels=triton: the triton package is not installed "
                               "(use net.kernels=auto or torch)")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"net.kernels=triton on {device.type}: Triton kernels need a CUDA "
                               f"GPU (on a CPU only under TRITON_INTERPRET=1, for tests); use "
                               f"net.kernels=auto or torch")
    return kernels


def _triton():
    # Loaded on first use, by name: triton is an optional dependency, and it reads
    # TRITON_INTERPRET once, when its kernels are defined (so not at ``import cmscale``).
    return importlib.import_module(".triton_kernels", __name__)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kernels: str = "auto") -> torch.Tensor:
    """Attention with scale 1/sqrt(d); q, k, v: (B, H, L, d) of any strides."""
    if resolve(kernels, q.device) == "triton":
        return _triton().attention(q, k, v)
    return reference.attention(q, k, v)


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, kernels: str = "auto") -> torch.Tensor:
    """SiLU(GroupNorm(x) * (1 + scale) + shift); ``scale``, ``shift``: (B, C) or None."""
    if (resolve(kernels, x.device) == "triton"
            and not reference.has_tangent(x, weight, bias, scale, shift)):
        return _triton().group_norm_silu(x, groups, weight, bias, eps, scale, shift)
    return reference.group_norm_silu(x, groups, weight, bias, eps, scale, shift)


def ema_update(averages: list[torch.Tensor], src: list[torch.Tensor], rates: list[float],
               kernels: str = "auto") -> None:
    """``avg <- rate * avg + (1 - rate) * src`` for each flat float32 average at once."""
    if not averages or not src:
        return
    if resolve(kernels, averages[0].device) == "triton":
        _triton().ema_update(averages, src, rates)
    else:
        reference.ema_update(averages, src, rates)
