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

from . import losses, schedules
from .ema import frozen_copy, update_average
from .networks import MLP, ConsistencyPrecond, TrigFlowPrecond
from .sampling import PerImageNoise, sample_sigmas
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

    def trigflow(self, x_t: torch.Tensor, t, class_labels=None, trigflow: bool = True,
                 raw: bool = True, sigma_data: float = 0.5):
        """The exact TrigFlow network ``(F, None)`` at (x_t, t): the sCD teacher.

        ``F = (cos t x_t - D(x_t / cos t, sigma_d tan t)) / (sigma_d sin t)``, so that
        ``sigma_d F`` is the PF-ODE velocity dx_t/dt in TrigFlow's variables."""
        del trigflow, raw  # the call protocol of TrigFlowPrecond's training outputs
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        x = x_t.to(torch.float64)
        cos, sin = torch.cos(t), torch.sin(t)
        D = self.denoise(x / cos, (sigma_data * sin / cos).reshape(-1))
        return ((cos * x - D) / (sigma_data * sin)).to(x_t.dtype), None

    def nearest_mode_distance(self, x: torch.Tensor) -> torch.Tensor:
        """Distance from each point to its nearest mode centre (a sample-quality figure)."""
        return torch.cdist(x.to(self.means.dtype), self.means).min(dim=1).values


def train_toy(method: str, gm: GaussianMixture, steps: int = 3000, batch: int = 512,
              lr: float = 1e-3, seed: int = 0, hidden: int = 128, depth: int = 3,
              log_every: int = 0, ct_s0: int = 2, ct_s1: int = 150, ct_mu0: float = 0.95,
              cd_num_scales: int = 18, adaptive_weight: bool = True):
    """Train a small MLP consistency function on the mixture with CD (exact teacher), CT, iCT,
    sCT or sCD (exact TrigFlow teacher).

    A compact single-process loop over the same pieces the real trainer uses (preconditioning,
    loss objects, schedules, target EMA); returns the online network and the target.
    CD: N = ``cd_num_scales``, target mu = 0.95, Heun teacher.
    CT: the reference's adaptive curriculum (``ct_s0``, ``ct_s1``, ``ct_mu0``) over ``steps``.
    sCT/sCD: :class:`~cmscale.losses.SCMLoss` with its defaults, the tangent warm-up over the
    first quarter of the steps; the target is the network itself; ``adaptive_weight=False``:
    without the learned weighting.
    """
    if method not in ("cd", "ct", "ict", "sct", "scd"):
        raise ValueError(f"method must be 'cd', 'ct', 'ict', 'sct' or 'scd', got {method!r}")
    torch.manual_seed(seed)
    trig = method in ("sct", "scd")
    net = (TrigFlowPrecond if trig else ConsistencyPrecond)(MLP(dim=gm.dim, hidden=hidden,
                                                                depth=depth))
    # iCT's and sCM's target is the online network itself (evaluated under no_grad).
    target = net if method in ("ict", "sct", "scd") else frozen_copy(net)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = {"cd": lambda: losses.CDLoss(gm, solver="heun"), "ct": lambda: losses.CTLoss("l2"),
               "ict": lambda: losses.ICTLoss(),
               "sct": lambda: losses.SCMLoss(tangent_warmup=steps // 4,
                                             adaptive_weight=adaptive_weight),
               "scd": lambda: losses.SCMLoss(gm.trigflow, tangent_warmup=steps // 4,
                                             adaptive_weight=adaptive_weight)}[method]()
    gen = torch.Generator().manual_seed(seed + 1)
    for k in range(steps):
        N, mu = None, 0.0
        if method == "cd":
            N, mu = schedules.cd_schedule(k, num_scales=cd_num_scales)
        elif method == "ict":
            N, mu = schedules.ict_schedule(k, steps)
        elif method == "ct":
            N, mu = schedules.ct_schedule(k, steps, s0=ct_s0, s1=ct_s1, mu0=ct_mu0)
        x = gm.sample(batch, generator=gen).float()
        if trig:
            loss = loss_fn(net, x, target=target, step=k).mean()
        else:
            loss = loss_fn(net, x, num_scales=N, target=target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target is not net:
            update_average(target, net, mu)
        if log_every and k % log_every == 0:
            print(f"{method} step {k} N={N} mu={mu} loss={loss.item():.3e}")
    return net, target


@torch.no_grad()
def evaluate_toy(net, gm: GaussianMixture, n: int = 2000, seed: int = 1234,
                 two_step_sigma: float = 0.8, sigma_max: float = schedules.SIGMA_MAX):
    """Figures for a learned consistency function on the mixture.

    - ``map_err``: mean |f(x_T, T) - Phi(x_T)| where Phi is the exact PF-ODE map (fine Heun);
    - ``mode_dist_1``/``mode_dist_2``: mean distance of one-/two-step samples to the nearest
      mode centre, against ``mode_dist_data`` for real samples.
    """

    noise = PerImageNoise(seed, range(n), (gm.dim,))
    z = PerImageNoise(seed, range(n), (gm.dim,)).next()
    exact = gm.pf_ode_map(z.double() * sigma_max, sigma_max).float()
    one = sample_sigmas(net, noise, [sigma_max])
    two = sample_sigmas(net, PerImageNoise(seed, range(n), (gm.dim,)),
                        [sigma_max, two_step_sigma])
    data = gm.sample(n, generator=torch.Generator().manual_seed(seed))
    return {
        "map_err": (one - exact.clamp(-1, 1)).norm(dim=1).mean().item(),
        "mode_dist_1": gm.nearest_mode_distance(one).mean().item(),
        "mode_dist_2": gm.nearest_mode_distance(two).mean().item(),
        "mode_dist_data": gm.nearest_mode_distance(data).mean().item(),
        "exact_map_mode_dist": gm.nearest_mode_distance(exact).mean().item(),
    }
