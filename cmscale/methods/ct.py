"""Consistency training (CT): the pair (x + sigma_n z, x + sigma_{n+1} z), EMA target.

``d(f(x + sigma_n z, sigma_n), f_target(x + sigma_{n+1} z, sigma_{n+1}))`` with n ~ U{0..N-2}
(:class:`cmscale.losses.CTLoss`); N(k) and mu(k) follow the reference's curriculum
(:func:`cmscale.schedules.ct_schedule`).
"""

from __future__ import annotations

from .. import losses, schedules
from ..config import Config
from .base import Method, consistency_kwargs


class CT(Method):
    needs_target = True

    def __init__(self, cfg: Config, device):
        super().__init__(cfg, losses.CTLoss(**consistency_kwargs(cfg, device)))

    def schedule(self, step: int) -> tuple[int, float]:
        lc = self.cfg.loss
        return schedules.ct_schedule(step, self.cfg.train.total_steps, lc.start_scales,
                                     lc.end_scales, lc.start_ema)
