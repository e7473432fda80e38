"""Easy consistency tuning (ECT, Geng et al. 2025): a pretrained EDM denoiser tuned into a
consistency model.

The student is built and initialised as the teacher, ``loss.teacher`` (an EDM denoiser:
a cmscale export of an ``edm`` run, or a reference ``edm_*.pt``); the teacher is used for
nothing else. The loss (:class:`cmscale.losses.ECTLoss`) is iCT's self-target, the
stop-gradient online network under shared dropout masks, on pairs (t, r): ln t ~ N(P_mean,
P_std^2) and r from the mapping function, whose gap t - r shrinks by ``loss.ect_q`` every
``loss.ect_stage_steps`` steps (:func:`cmscale.schedules.ect_stage`). At the first stage r = 0
for most t, i.e. the student keeps training as a denoiser; as the gap shrinks the objective
becomes the consistency condition. The network keeps EDM's parametrisation (``EDMPrecond``):
``D(x, sigma) -> x`` as sigma -> 0, the consistency function's boundary at sigma = 0, which the
loss applies exactly (r = 0: the target is the clean image).
"""

from __future__ import annotations

import json
import os

import torch

from .. import losses, schedules
from ..config import Config
from ..netfile import load_strict
from ..networks import EDMPrecond
from ..sampler import Sampler
from .base import Method, build_metric

# The two-step sampler's second noise level: iCT's CIFAR-10 setting, which ECT's code uses.
TWO_STEP_SIGMA = 0.821


def check_teacher_file(path: str) -> None:
    """ValueError if ``path`` is a cmscale export of a consistency model, not a denoiser."""
    side = path + ".json"
    if not os.path.isfile(side):
        return  # a plain state dict (e.g. a reference edm_*.pt): its shapes are checked
    with open(side) as f:
        mode = json.load(f).get("export", {}).get("mode", "edm")
    if mode != "edm":
        raise ValueError(f"loss.teacher {path} is an export of a {mode!r} run; ECT starts from "
                         f"an EDM denoiser (an export of a loss.mode=edm run)")


class ECT(Method):
    precond = EDMPrecond

    def __init__(self, cfg: Config, device):
        lc = cfg.loss
        super().__init__(cfg, losses.ECTLoss(
            metric=build_metric(cfg, device), p_mean=lc.p_mean, p_std=lc.p_std, q=lc.ect_q,
            k=lc.ect_k, b=lc.ect_b, weighting=lc.ect_weighting, sigma_data=cfg.net.sigma_data))

    def schedule(self, step: int) -> tuple[int, float]:
        """``(a, 0.0)``: the stage in place of N, and no target EMA (the target is the
        stop-gradient online network)."""
        return schedules.ect_stage(step, self.cfg.loss.ect_stage_steps), 0.0

    def loss(self, net, target, images, labels, num_scales, step: int = 0):
        return self.loss_fn(net, images, stage=num_scales, class_labels=labels, target=target)

    def logs(self, step: int) -> dict:
        a = schedules.ect_stage(step, self.cfg.loss.ect_stage_steps)
        return {"stage": a, "gap_scale": float(self.cfg.loss.ect_q) ** -a}

    def prepare(self, net: torch.nn.Module) -> None:
        """The student starts as the teacher: its weights are loaded (strictly: a file of
        another shape is an error naming the keys) before the EMAs copy the student; a resume
        then loads its checkpoint over them."""
        cfg = self.cfg
        check_teacher_file(cfg.loss.teacher)
        load_strict(net.model, cfg.loss.teacher, cfg.net.preset,
                    what="loss.teacher (ECT's student starts from it)")

    @classmethod
    def default_samplers(cls, cfg: Config) -> list[Sampler]:
        """One step, and two steps with the second at sigma 0.821 (ECT's CIFAR-10 setting)."""
        return [Sampler("onestep"),
                Sampler("sigmas", sigmas=(float(cfg.net.sigma_max), TWO_STEP_SIGMA))]
