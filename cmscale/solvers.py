"""Probability-flow ODE solvers for a denoiser D(x, sigma) (Karras et al. 2022).

The PF ODE in the EDM convention is ``dx/dsigma = (x - D(x, sigma)) / sigma``. These steps
are the teacher's move in consistency distillation and the EDM sampler for teachers.
"""

from __future__ import annotations

import torch

from . import schedules


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)


def euler_step(denoiser, x, sigma, sigma_next, class_labels=None):
    """One Euler step of the PF ODE from sigma to sigma_next."""
    d = (x - denoiser(x, sigma, class_labels).to(x.dtype)) / _b(sigma, x)
    return x + d * (_b(sigma_next, x) - _b(sigma, x))


def heun_step(denoiser, x, sigma, sigma_next, class_labels=None):
    """One Heun (2nd-order) step from sigma to sigma_next > 0 (Karras et al. 2022, Alg. 1)."""
    s, s_next = _b(sigma, x), _b(sigma_next, x)
    d = (x - denoiser(x, sigma, class_labels).to(x.dtype)) / s
    x_euler = x + d * (s_next - s)
    d_next = (x_euler - denoiser(x_euler, sigma_next, class_labels).to(x.dtype)) / s_next
    return x + 0.5 * (d + d_next) * (s_next - s)


EDM_STEPS = 40  # default Heun steps (NFE 79): the reference's published teacher figures


def clamped(denoiser):
    """``denoiser`` with its estimate clamped to [-1, 1] at every evaluation (the reference's
    ``clip_denoised``, on by default in its sampler)."""
    def den(x, sigma, class_labels=None):
        return denoiser(x, sigma, class_labels).clamp(-1, 1)
    return den


@torch.no_grad()
def edm_sample(denoiser, noise, num_steps: int = EDM_STEPS, class_labels=None,
               sigma_min: float = schedules.SIGMA_MIN, sigma_max: float = schedules.SIGMA_MAX,
               rho: float = schedules.RHO, clamp: bool = True):
    """The deterministic EDM Heun sampler (Karras et al. 2022, Algorithm 1, no churn).

    ``noise`` is standard normal; sampling starts at ``sigma_max * noise`` and follows the
    Karras grid of ``num_steps`` levels, then 0. Uses ``2 * num_steps - 1`` network
    evaluations (the last step is Euler down to sigma = 0); the default 40 steps (NFE 79) are
    the reference's setting for its teachers. ``num_steps = 1`` is a single Euler step, i.e.
    ``D(x_T, sigma_max)`` (NFE 1). ``clamp``: as the reference, every denoised estimate is
    clamped to [-1, 1] before it enters the ODE step, and so is the output.
    """
    dtype = noise.dtype if noise.dtype == torch.float64 else torch.float32
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        sigmas = schedules.karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(dtype)
    den = clamped(denoiser) if clamp else denoiser
    x = noise.to(dtype) * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next > 0:
            x = heun_step(den, x, s, s_next, class_labels)
        else:
            x = euler_step(den, x, s, s_next, class_labels)
    return x.clamp(-1, 1) if clamp else x
