"""An exact toy: a 2-D Gaussian mixture whose denoiser is known in closed form.

Data ``x0 ~ sum_k w_k N(m_k, s_k^2 I)``. Noised at level sigma, ``x = x0 + sigma z`` is again
a mixture, ``sum_k w_k N(m_k, (s_k^2 + sigma^2) I)``, and the ideal denoiser is

    D(x, sigma) = E[x0 | x] = sum_k r_k(x) (m_k + s_k^2 / (s_k^2 + sigma^2) (x - m_k)),

with responsibilities ``r_k(x) ∝ w_k N(x; m_k, (s_k^2 + sigma^2) I)``. It serves as a perfect
teacher for CD and, solved finely with Heun, as ground truth for the probability-flow map
that a consistency function must learn.
"""

from __future__ import annotations

import math

import torch

from . import schedules
from .solvers import heun_step


class GaussianMixture:
    """Isotropic 2-D (or d-D) Gaussian mixture with a closed-form denoiser."""

    def __init__(self, means, stds, weights=None, dtype=torch.float64):
        self.means = torch.as_tensor(means, dtype=dtype)  # (K, d)
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=dtype).expand(K).clone()  # (K,)
        w = torch.ones(K, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        self.weights = w / w.sum()
        self.dim = self.means.shape[1]

    @classmethod
    def ring(cls, k: int = 8, radius: float = 0.6, std: float = 0.05):
        """k equal modes on a circle; radius 0.6 gives a data std close to sigma_data = 0.5."""
        angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1)
        return cls(means, std)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return self.means[k] + self.stds[k, None] * z

    def denoise(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """The exact E[x0 | x_sigma = x] (same call protocol as a preconditioned network)."""
        del class_labels
        dt = x.dtype
        x = x.to(self.means.dtype)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2  # (B, K)
        diff = x[:, None, :] - self.means[None]  # (B, K, d)
        log_r = (torch.log(self.weights)[None] - 0.5 * diff.pow(2).sum(-1) / var
                 - 0.5 * self.dim * torch.log(var))
        r = torch.softmax(log_r, dim=1)
        shrink = (self.stds[None, :] ** 2 / var)[..., None]  # (B, K, 1)
        post = self.means[None] + shrink * diff
        return (r[..., None] * post).sum(1).to(dt)

    __call__ = denoise

    @torch.no_grad()
    def pf_ode_map(self, x: torch.Tensor, sigma, steps: int = 512,
                   sigma_min: float = schedules.SIGMA_MIN) -> torch.Tensor:
        """The probability-flow map from noise level ``sigma`` to sigma_min: a fine Heun solve.

        Uses a Karras grid of ``steps`` points between sigma and sigma_min (float64)."""
        x = x.to(torch.float64)
        sigma = float(sigma)
        if sigma <= sigma_min:
            return x
        grid = schedules.karras_sigmas(steps, sigma_min, sigma)
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = heun_step(self.denoise, x, s, s_next)
        return x

    def nearest_mode_distance(self, x: torch.Tensor) -> torch.Tensor:
        """Distance from each point to its nearest mode centre (a sample-quality figure)."""
        return torch.cdist(x.to(self.means.dtype), self.means).min(dim=1).values
