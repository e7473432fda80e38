"""Consistency distillation (CD): one teacher ODE step gives the pair, EMA target.

``d(f(x_n, sigma_n), f_target(Phi(x_n; sigma_n -> sigma_{n+1}), sigma_{n+1}))`` with Phi a Heun
(or Euler) step of the teacher's probability-flow ODE (:class:`cmscale.losses.CDLoss`); fixed
N and mu (:func:`cmscale.schedules.cd_schedule`). The teacher is an EDM denoiser loaded from
``loss.teacher``; with ``loss.init_from_teacher`` the student starts from its weights.
"""

from __future__ import annotations

import torch

from .. import losses, schedules
from ..config import Config
from ..netfile import load_strict
from ..networks import EDMPrecond, create_unet
from .base import Method, consistency_kwargs, init_from_teacher


def build_teacher(cfg: Config, device) -> torch.nn.Module:
    """The CD teacher: an EDM denoiser from a weights file (ours, or a reference edm_*.pt)."""
    preset = cfg.loss.teacher_preset or cfg.net.preset
    raw = create_unet(preset, **{**cfg.net.overrides, **cfg.loss.teacher_overrides,
                                 "dropout": cfg.loss.teacher_dropout})
    load_strict(raw, cfg.loss.teacher, preset, what="loss.teacher")
    teacher = EDMPrecond(raw, sigma_data=cfg.net.sigma_data, sigma_min=cfg.net.sigma_min,
                         sigma_max=cfg.net.sigma_max)
    return teacher.to(device).eval().requires_grad_(False)


class CD(Method):
    needs_target = True

    def __init__(self, cfg: Config, device):
        super().__init__(cfg, None)  # the loss, with its teacher, comes with the student
        self.device = device

    def schedule(self, step: int) -> tuple[int, float]:
        return schedules.cd_schedule(step, self.cfg.loss.num_scales, self.cfg.loss.target_ema)

    def prepare(self, net: torch.nn.Module) -> None:
        """Load the teacher; with ``loss.init_from_teacher`` first copy its weights into the
        student, as the reference's CD does (a resume then loads its checkpoint over them)."""
        cfg = self.cfg
        init_from_teacher(cfg, net)
        self.loss_fn = losses.CDLoss(build_teacher(cfg, self.device), solver=cfg.loss.solver,
                                     **consistency_kwargs(cfg, self.device))
