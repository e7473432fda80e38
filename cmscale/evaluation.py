"""FID of a network under named samplers: used by periodic evaluation in training and by
``cmscale fid-report``.

Samplers (``eval.samplers`` in a config, ``--sampler`` of the report) are
:class:`cmscale.sampler.Sampler` specifications (``onestep``, ``ts=0,20,39/40``,
``sigmas=80,0.8``, ``edm[=N]``, ``euler=N``). Image i of a sampler uses noise stream (seed, i)
and, for class-conditional nets, a label from its own stream (the same as ``cmscale sample``),
so a FID does not depend on the world size or the batch size; every network call has one shape
(padded), as in ``cmscale sample``.

:class:`PeriodicEval` is what the trainer runs every ``eval.every_images`` images: it samples the
chosen EMA with each sampler, computes FID over all ranks against reference statistics (a file
from ``cmscale ref-stats``, or, for the embedded datasets, statistics it makes and caches
itself) and returns ``{"fid/<sampler>": value}``.
"""
from __future__ import annotations

import time

import torch

from . import dist
from .metrics import features as F
from .metrics import fid as M
from .metrics.refstats import embedded_stats
from .sample import FixedShapeNet, image_labels
from .methods import METHODS
from .sampler import Sampler
from .sampling import PerImageNoise


def make_generate(net, info: dict, sampler: Sampler, seed: int, batch_size: int, device):
    """generate(indices) -> images in [-1, 1], a pure function of the indices.

    ``info``: the network's ``mode``, ``sigma_min``, ``sigma_max`` and ``rho``."""
    sampler.check(info["mode"])
    grid = dict(sigma_min=float(info["sigma_min"]), sigma_max=float(info["sigma_max"]),
                rho=float(info["rho"]))
    raw = net.model
    shape = (raw.in_channels, raw.image_size, raw.image_size)
    shaped = FixedShapeNet(net, batch_size)

    @torch.no_grad()
    def generate(indices):
        idx = [int(i) for i in indices]
        noise = PerImageNoise(seed, idx, shape, device=device)
        labels = image_labels(seed, idx, raw.num_classes, device=device)
        return sampler.run(shaped, noise, labels, **grid).float().cpu()

    return generate


def reference_stats(cfg, extractor) -> M.FeatureStats:
    """``eval.ref`` (checked against the extractor), or the embedded dataset's own statistics."""
    ec = cfg.eval
    if ec.ref:
        ref = M.load_stats(ec.ref)
    elif cfg.data.shards.startswith("embedded:"):
        ref = embedded_stats(cfg.data.shards[len("embedded:"):], cfg.data.resolution, extractor,
                             batch_size=ec.batch_size)
    else:
        raise ValueError("eval.ref: periodic FID needs reference statistics "
                         "(cmscale ref-stats SRC --out OUT.npz; then eval.ref=OUT.npz)")
    M.check_compatible(extractor.settings(), ref.settings)
    return ref


class PeriodicEval:
    """FID of a network under ``eval.samplers`` against the reference, over all ranks.

    Built once per run (loads the extractor and the reference statistics; collective). Raises
    a clear error at start-up when weights or statistics are missing, not hours later."""

    def __init__(self, cfg, device):
        ec = cfg.eval
        self.cfg, self.device = cfg, device
        kw = {"device": str(device)}
        if ec.extractor == "inception" and ec.inception:
            kw["path"] = ec.inception
        self.extractor = F.build_extractor(ec.extractor, **kw)
        self.ref = reference_stats(cfg, self.extractor)
        self.samplers = ([Sampler.parse(s) for s in ec.samplers] if ec.samplers
                         else METHODS[cfg.loss.mode].default_samplers(cfg))
        self.primary = str(self.samplers[0])
        self.info = dict(mode=cfg.loss.mode, sigma_min=cfg.net.sigma_min,
                         sigma_max=cfg.net.sigma_max, rho=cfg.net.rho)

    def __call__(self, net) -> dict:
        """``{"fid/<setting>": FID, "eval_seconds": s}`` (the same on every rank; collective)."""
        ec = self.cfg.eval
        t0 = time.time()
        out = {}
        was_training = net.training
        net.eval()
        try:
            for s in self.samplers:
                generate = make_generate(net, self.info, s, ec.seed,
                                         min(ec.batch_size, ec.num_images), self.device)
                stats = M.compute_stats_from_generator(generate, ec.num_images, self.extractor,
                                                       batch_size=ec.batch_size, max_kept=0)
                out[f"fid/{s}"] = float(M.fid_from_stats(stats, self.ref).fid)
        finally:
            net.train(was_training)
        out["eval_seconds"] = float(dist.broadcast_object(time.time() - t0
                                                          if dist.is_main() else None))
        return out
