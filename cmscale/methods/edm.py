"""EDM teacher training: denoising score matching of an EDM denoiser D(x; sigma).

``lambda(sigma) ||D(x + sigma z; sigma) - x||^2`` with ln(sigma) ~ N(P_mean, P_std^2)
(:class:`cmscale.losses.EDMLoss`); no grid, no target network. The preview grid samples with
the EDM Heun sampler at 1 and 18 steps.
"""

from __future__ import annotations

from .. import losses
from ..config import Config
from ..networks import EDMPrecond
from ..solvers import edm_sample
from .base import Method


class EDM(Method):
    precond = EDMPrecond

    def __init__(self, cfg: Config, device):
        super().__init__(cfg, losses.EDMLoss(sigma_data=cfg.net.sigma_data))

    def logs(self, step: int) -> dict:
        return {}

    def preview(self, net, noise, labels) -> list:
        grid = dict(sigma_min=self.cfg.net.sigma_min, sigma_max=self.cfg.net.sigma_max)
        z = noise().next()
        return [edm_sample(net, z, 1, labels, **grid), edm_sample(net, z, 18, labels, **grid)]
