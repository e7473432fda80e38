"""Preconditioning: the only place that knows c_skip, c_out, c_in, c_noise.

A raw network ``F`` is any ``nn.Module`` with ``forward(x, noise_labels, class_labels=None)``
(the ADM UNet, or an MLP on vectors). The wrappers below turn it into

- a consistency function (Song et al. 2023, eq. 7 and appendix C):
  ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))`` whose
  boundary condition ``f(x, sigma_min) = x`` holds exactly, because c_skip(sigma_min) = 1 and
  c_out(sigma_min) = 0 are exact in floating point;
- an EDM denoiser ``D(x, sigma)`` (Karras et al. 2022, table 1) with the same form but no
  sigma_min shift, used for teachers.

Both use the reference's time input ``c_noise = 250 ln(sigma + 1e-44)``, so the public
openai/consistency_models checkpoints (edm_*, cd_*, ct_*) work unchanged.

The skip connection is applied in float32 (or float64 for float64 inputs) even under autocast:
the output of a low-precision network is cast up before ``c_skip x + c_out F``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) tensor in the skip connection's precision, on x's device."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def cm_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Consistency-model scalings ``(c_skip, c_out, c_in)`` (Song et al. 2023, appendix C).

    ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``,
    ``c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``.
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = 0.5):
    """EDM denoiser scalings ``(c_skip, c_out, c_in)`` (Karras et al. 2022, table 1)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """The reference's network time input, ``250 ln(sigma + 1e-44)``."""
    return 250.0 * torch.log(sigma + 1e-44)


class _Precond(nn.Module):
    """Shared wrapper; subclasses choose the scalings."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def scalings(self, sigma: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = _as_sigma(sigma, x)
        c_skip, c_out, c_in = (_bcast(c, x) for c in self.scalings(sigma))
        x_hp = x.to(sigma.dtype)
        F = self.model((c_in * x_hp).to(x.dtype), c_noise(sigma), class_labels)
        return c_skip * x_hp + c_out * F.to(sigma.dtype)


class ConsistencyPrecond(_Precond):
    """``f(x, sigma)``: the consistency parametrisation with f(x, sigma_min) = x exactly."""

    def scalings(self, sigma):
        return cm_scalings(sigma, self.sigma_data, self.sigma_min)


class EDMPrecond(_Precond):
    """``D(x, sigma)``: the EDM denoiser parametrisation, for teachers and EDM training."""

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)

