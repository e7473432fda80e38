"""Improved consistency training (iCT): CT with the online network as its own target.

The target is the stop-gradient online network (mu = 0), pairs come from the discretised
lognormal with weights 1 / (sigma_n - sigma_{n+1}) (:class:`cmscale.losses.ICTLoss`), and N
doubles from s0 to s1 over the run (:func:`cmscale.schedules.ict_schedule`).
"""

from __future__ import annotations

from .. import losses, schedules
from ..config import Config
from .base import Method, consistency_kwargs


class ICT(Method):
    def __init__(self, cfg: Config, device):
        lc = cfg.loss
        super().__init__(cfg, losses.ICTLoss(p_mean=lc.p_mean, p_std=lc.p_std,
                                             **consistency_kwargs(cfg, device)))

    def schedule(self, step: int) -> tuple[int, float]:
        lc = self.cfg.loss
        return schedules.ict_schedule(step, self.cfg.train.total_steps, lc.ict_s0, lc.ict_s1)
