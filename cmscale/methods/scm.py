"""Continuous-time consistency models on TrigFlow (Lu & Song 2025): sCT and sCD.

The network is a :class:`~cmscale.networks.TrigFlowPrecond` (consistency function
``f(x_t, t) = cos t x_t - sin t sigma_d F`` and learned log-weight w_phi(t), both trained by
the optimizer and kept in the checkpoint and the EMAs like any weight). The loss is
:class:`cmscale.losses.SCMLoss`; its target is the stop-gradient online network (no target
EMA), its tangent one JVP of it. sCT takes dx_t/dt from the sample pair; sCD from an EDM
teacher (``loss.teacher``, ours or a public edm_*.pt) turned into a TrigFlow network by
negating its output layer (:func:`~cmscale.networks.negate_output_layer`); with
``loss.init_from_teacher`` the student starts as that network. Sampling: TrigFlow steps at
``pi/2`` and ``sample.trig_times`` (:class:`cmscale.sampler.Sampler` kind ``trig``).
"""

from __future__ import annotations

import math

import torch

from .. import losses
from ..config import Config
from ..netfile import load_strict
from ..networks import TrigFlowPrecond, negate_output_layer
from ..sampler import Sampler
from .base import Method
from .cd import build_teacher


def build_trigflow_teacher(cfg: Config, device) -> TrigFlowPrecond:
    """The sCD teacher: the EDM denoiser of ``loss.teacher`` as a TrigFlow network."""
    edm = build_teacher(cfg, device)
    teacher = TrigFlowPrecond(negate_output_layer(edm.model), sigma_data=cfg.net.sigma_data,
                              sigma_min=cfg.net.sigma_min, sigma_max=cfg.net.sigma_max)
    return teacher.to(device).eval().requires_grad_(False)


class SCT(Method):
    """sCT: dx_t/dt = cos t z - sin t x0 from the training pair itself."""

    precond = TrigFlowPrecond
    forward_mode_target = True
    uses_teacher = False

    @classmethod
    def precond_kwargs(cls, cfg: Config) -> dict:
        return {"time_input": cfg.net.time_input}

    def __init__(self, cfg: Config, device):
        super().__init__(cfg, None)  # built in prepare(), after the teacher (sCD) is loaded
        self.device = device
        self._embedding_rate = None

    def make_loss(self, teacher) -> losses.SCMLoss:
        lc = self.cfg.loss
        return losses.SCMLoss(teacher, sigma_data=self.cfg.net.sigma_data, p_mean=lc.scm_p_mean,
                              p_std=lc.scm_p_std, tangent_warmup=lc.tangent_warmup,
                              tangent_norm=lc.tangent_norm, adaptive_weight=lc.adaptive_weight,
                              tangent_norm_over=lc.tangent_norm_over,
                              prior_weight=lc.prior_weight)

    def prepare(self, net: torch.nn.Module) -> None:
        """With ``loss.init_from_teacher``: start from the EDM teacher as a TrigFlow network
        (a resume then loads its checkpoint over it); sCD also loads the teacher."""
        cfg = self.cfg
        self._embedding_rate = self.time_embedding_rate(net)
        if cfg.loss.init_from_teacher:
            load_strict(net.model, cfg.loss.teacher, cfg.net.preset,
                        what="loss.init_from_teacher: loss.teacher")
            negate_output_layer(net.model)
        teacher = build_trigflow_teacher(cfg, self.device) if self.uses_teacher else None
        self.loss_fn = self.make_loss(teacher)

    # Fastest phase change of the UNet's sinusoidal time embedding (its top frequency is 1), in
    # radians per unit of ln(sigma) (time_input log_sigma) or of t (time_input t), above which
    # warnings() speaks: the ADM presets' 250 ln(sigma) measured FD 3667 for sCT on 8 px digits,
    # where the same run with ln(sigma) (noise_label_scale 0.004) measured 47.
    STEEP_TIME_EMBEDDING = 10.0

    def time_embedding_rate(self, net: torch.nn.Module) -> float | None:
        """How fast the network's time embedding turns (see ``STEEP_TIME_EMBEDDING``); None for
        networks without ``noise_label_scale`` (the toy MLP)."""
        scale = getattr(getattr(net, "model", net), "noise_label_scale", None)
        if scale is None:
            return None
        return TrigFlowPrecond.C_NOISE_RATE[self.cfg.net.time_input] * float(scale)

    def warnings(self) -> list[str]:
        out = super().warnings()
        rate = self._embedding_rate
        if rate is not None and rate > self.STEEP_TIME_EMBEDDING:
            out.append(
                f"warning: {self.cfg.loss.mode} with a steep time embedding (the UNet's "
                f"sinusoids turn by up to {rate:.0f} rad per unit of "
                f"{'ln(sigma)' if self.cfg.net.time_input == 'log_sigma' else 't'}): its "
                "derivative dominates the tangent dF/dt, and sCT collapsed so in our "
                "measurements (8 px digits: FD 3667 against 47 with "
                "net.overrides.noise_label_scale=0.004, the time input ln(sigma)). Train the "
                "student with net.overrides.noise_label_scale=0.004; for sCD from a teacher "
                "with the ADM embedding, without loss.init_from_teacher and with "
                "loss.teacher_overrides.noise_label_scale=1.0 (see docs/scm.md)")
        return out

    def loss(self, net, target, images, labels, num_scales, step: int = 0):
        return self.loss_fn(net, images, class_labels=labels, target=target, step=step)

    def logs(self, step: int) -> dict:
        return {"r": self.loss_fn.warmup(step) if self.loss_fn else 0.0}

    @classmethod
    def default_samplers(cls, cfg: Config) -> list[Sampler]:
        """One TrigFlow step at pi/2, and the steps at pi/2 and ``sample.trig_times``."""
        return [Sampler("trig", times=(math.pi / 2,)),
                Sampler("trig", times=(math.pi / 2, *map(float, cfg.sample.trig_times)))]


class SCD(SCT):
    """sCD: dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t), the teacher's PF-ODE velocity."""

    uses_teacher = True
