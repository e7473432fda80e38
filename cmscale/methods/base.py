"""A training method: the networks it needs, its schedule and its per-example loss.

``schedule(step)`` gives ``(N, mu)``: the number of grid points and the target EMA rate at
that step (``(None, None)`` for a method without either; ECT, which has no grid, gives its
stage in place of N). ``loss(net, target, images, labels, N, step)`` returns per-example
losses of one micro-batch (no reduction, no distributed calls): ``net`` is what the forward
goes through, ``target`` the network the loss takes its target from (the EMA target when
``needs_target``, else the online network; EDM ignores it). After an applied step the trainer
moves the EMA target: ``target <- mu * target + (1 - mu) * net``.
"""

from __future__ import annotations

from torch import nn

from .. import losses
from ..config import Config
from ..netfile import load_strict
from ..networks import ConsistencyPrecond
from ..sampler import Sampler


class Method:
    precond: type[nn.Module] = ConsistencyPrecond  # what wraps the UNet: c_skip, c_out, c_in
    needs_target = False  # an EMA target network (cmscale.ema.ShardedTarget) moved by mu(k)
    forward_mode_target = False  # the loss runs forward-mode AD (a JVP) through its target

    @classmethod
    def precond_kwargs(cls, cfg: Config) -> dict:
        """Options of ``precond`` from the config, beyond sigma_data/min/max."""
        return {}

    def __init__(self, cfg: Config, loss_fn):
        self.cfg, self.loss_fn = cfg, loss_fn

    def schedule(self, step: int) -> tuple[int | None, float | None]:
        return None, None

    def loss(self, net, target, images, labels, num_scales, step: int = 0):
        return self.loss_fn(net, images, num_scales=num_scales, class_labels=labels,
                            target=target)

    def logs(self, step: int) -> dict:
        """What the training log records for ``step`` besides loss and lr."""
        N, mu = self.schedule(step)
        return {"N": N, "mu": mu}

    def prepare(self, net: nn.Module) -> None:
        """Set up with the freshly built student, before its target and EMAs copy it and
        before the first loss (the trainer calls it once). By default: with
        ``loss.init_from_teacher``, copy the weights of ``loss.teacher`` into the student (the
        reference's ``cm_train.py`` does so whenever a teacher is given, for CT too)."""
        init_from_teacher(self.cfg, net)

    def warnings(self) -> list[str]:
        """What the trainer prints before training: settings that measured badly (after
        :meth:`prepare`)."""
        w = self.target_horizon_warning()
        return [w] if w else []

    def target_horizon_warning(self) -> str | None:
        """A warning when the target still averages over a large part of the run at its end
        (its EMA horizon 1 / (1 - mu) above a tenth of train.total_steps), else None."""
        K = self.cfg.train.total_steps
        _, mu = self.schedule(K - 1)
        if not mu or mu <= 0:
            return None
        horizon = 1.0 / (1.0 - mu)
        if horizon <= K / 10:
            return None
        return (f"warning: the target EMA ends at mu={mu:.5f}, an average over about "
                f"{horizon:.0f} steps, more than a tenth of train.total_steps={K}: the target "
                f"lags the network for much of a run this short (for CT, lower loss.start_ema "
                f"or loss.end_scales, or train longer)")

    def preview(self) -> list[Sampler]:
        """The samplers of the preview grid's panels: one step, and ``sample.ts``/``steps``."""
        return self.default_samplers(self.cfg)

    @classmethod
    def default_samplers(cls, cfg: Config) -> list[Sampler]:
        """Periodic FID's samplers unless ``eval.samplers`` names them: one step and the
        configured multistep (``sample.ts``/``sample.steps``)."""
        return [Sampler("onestep"),
                Sampler("ts", ts=tuple(int(t) for t in cfg.sample.ts), steps=int(cfg.sample.steps))]


def build_metric(cfg: Config, device):
    """The distance ``loss.metric`` (pseudo-Huber with ``loss.huber_c`` when it is >= 0)."""
    lc = cfg.loss
    if lc.metric == "lpips":
        return losses.LPIPS(weights=lc.lpips_weights or None, device=device,
                            variant=lc.lpips_variant)
    if lc.metric == "pseudo_huber" and lc.huber_c >= 0:
        return losses.make_metric(lc.metric, c=lc.huber_c)
    return losses.make_metric(lc.metric)


def init_from_teacher(cfg: Config, net: nn.Module) -> None:
    """With ``loss.init_from_teacher``: the student's UNet gets ``loss.teacher``'s weights (a
    resume then loads its checkpoint over them)."""
    if cfg.loss.init_from_teacher:
        load_strict(net.model, cfg.loss.teacher, cfg.net.preset,
                    what="loss.init_from_teacher: loss.teacher")


def consistency_kwargs(cfg: Config, device) -> dict:
    """The metric and the Karras grid shared by the CD, CT and iCT losses."""
    nc = cfg.net
    return dict(metric=build_metric(cfg, device), sigma_min=nc.sigma_min,
                sigma_max=nc.sigma_max, rho=nc.rho)
