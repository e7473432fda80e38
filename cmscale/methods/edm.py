"""EDM teacher training: denoising score matching of an EDM denoiser D(x; sigma).

``lambda(sigma) ||D(x + sigma z; sigma) - x||^2`` with ln(sigma) ~ N(P_mean, P_std^2)
(:class:`cmscale.losses.EDMLoss`); no grid, no target network. The preview grid samples with
the EDM Heun sampler at 1 and 40 steps (NFE 79, the reference's teacher setting).
"""

from __future__ import annotations

from .. import losses
from ..config import Config
from ..networks import EDMPrecond
from ..sampler import Sampler
from ..solvers import EDM_STEPS
from .base import Method


class EDM(Method):
    precond = EDMPrecond

    def __init__(self, cfg: Config, device):
        super().__init__(cfg, losses.EDMLoss(sigma_data=cfg.net.sigma_data))

    def logs(self, step: int) -> dict:
        return {}

    def preview(self) -> list[Sampler]:
        return [Sampler("edm", steps=1), Sampler("edm", steps=EDM_STEPS)]

    @classmethod
    def default_samplers(cls, cfg: Config) -> list[Sampler]:
        return [Sampler("edm", steps=EDM_STEPS)]
