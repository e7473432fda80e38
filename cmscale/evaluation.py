"""FID of a network under named sampler settings: used by periodic evaluation in training and by
``tools/fid_report.py``.

Sampler settings (``eval.samplers`` in a config, ``--sampler`` of the report):

- ``onestep``: ``clamp(f(sigma_max z, sigma_max))``;
- ``ts=0,20,39/40``: the reference's multistep ``ts`` indices into a Karras grid of 40 points;
- ``sigmas=80,0.8``: explicit noise levels;
- ``edm`` / ``edm=18``: the Heun sampler (EDM denoisers only).

Image i of a setting uses noise stream (seed, i) and, for class-conditional nets, a label from
its own stream (the same as ``cmscale sample``), so a FID does not depend on the world size or
the batch size; every network call has one shape (padded), as in ``cmscale sample``.

:class:`PeriodicEval` is what the trainer runs every ``eval.every_images`` images: it samples the
chosen EMA with each setting, computes FID over all ranks against reference statistics (a file
from ``tools/ref_stats.py``, or, for the embedded datasets, statistics it makes and caches
itself) and returns ``{"fid/<setting>": value}``.
"""
from __future__ import annotations

import time

import torch

from . import dist
from .metrics import features as F
from .metrics import fid as M


def parse_sampler(text: str) -> dict:
    """'onestep' | 'ts=0,20,39/40' | 'sigmas=80,0.8' | 'edm[=N]' -> canonical spec dict."""
    t = str(text).replace(" ", "")
    if t in ("onestep", "1step", "one"):
        return {"name": "onestep", "kind": "onestep"}
    if t.startswith("ts="):
        body = t[3:]
        if "/" not in body:
            raise ValueError(f"sampler {text!r}: write ts=I0,I1,.../STEPS (e.g. ts=0,20,39/40)")
        ts, steps = body.rsplit("/", 1)
        ts_l = [int(x) for x in ts.split(",") if x]
        if len(ts_l) < 2 or any(a >= b for a, b in zip(ts_l, ts_l[1:])) or ts_l[-1] >= int(steps):
            raise ValueError(f"sampler {text!r}: ts must increase and stay below STEPS")
        return {"name": f"ts={','.join(map(str, ts_l))}/{int(steps)}", "kind": "ts",
                "ts": ",".join(map(str, ts_l)), "steps": int(steps)}
    if t.startswith("sigmas="):
        levels = [float(x) for x in t[7:].split(",") if x]
        if not levels or any(v <= 0 for v in levels):
            raise ValueError(f"sampler {text!r}: positive noise levels")
        return {"name": f"sigmas={','.join(repr(v) for v in levels)}", "kind": "sigmas",
                "sigmas": ",".join(repr(v) for v in levels)}
    if t == "edm" or t.startswith("edm="):
        steps = int(t[4:]) if "=" in t else 18
        if steps < 1:
            raise ValueError(f"sampler {text!r}: at least 1 step")
        return {"name": f"edm={steps}", "kind": "edm", "steps": steps}
    raise ValueError(f"unknown sampler {text!r} (onestep, ts=I,J,.../STEPS, sigmas=A,B,..., edm[=N])")


def default_samplers(cfg) -> list[str]:
    """One step and the configured multistep (``sample.ts``/``sample.steps``); EDM: Heun 18."""
    if cfg.loss.mode == "edm":
        return ["edm=18"]
    return ["onestep", f"ts={','.join(str(int(t)) for t in cfg.sample.ts)}/{int(cfg.sample.steps)}"]


def make_generate(net, cfg, sampler: dict, seed: int, batch_size: int, device):
    """(generate(indices) -> images in [-1, 1], NFE): generate is a pure function of the indices."""
    from .sample import FixedShapeNet, Plan, image_labels
    from .sampling import PerImageNoise

    info = {"sigma_min": cfg.net.sigma_min, "sigma_max": cfg.net.sigma_max, "rho": cfg.net.rho,
            "mode": cfg.loss.mode}
    kind = sampler["kind"]
    if (kind == "edm") != (cfg.loss.mode == "edm"):
        raise ValueError(f"sampler {sampler['name']!r} does not fit a {cfg.loss.mode!r} network "
                         "(EDM denoisers take edm[=N]; consistency models the others)")
    plan = Plan(info, ts=sampler.get("ts") if kind == "ts" else None,
                steps=sampler.get("steps") if kind in ("ts", "edm") else None,
                sigmas=sampler.get("sigmas") if kind == "sigmas" else None)
    raw = net.model
    shape = (raw.in_channels, raw.image_size, raw.image_size)
    shaped = FixedShapeNet(net, batch_size)

    @torch.no_grad()
    def generate(indices):
        idx = [int(i) for i in indices]
        noise = PerImageNoise(seed, idx, shape, device=device)
        labels = image_labels(seed, idx, raw.num_classes, device=device)
        return plan(shaped, noise, labels).float().cpu()

    nfe = (2 * plan.steps - 1) if plan.edm else len(plan.levels)
    return generate, nfe


def reference_stats(cfg, extractor) -> M.FeatureStats:
    """``eval.ref`` (checked against the extractor), or the embedded dataset's own statistics."""
    ec = cfg.eval
    if ec.ref:
        ref = M.load_stats(ec.ref)
    elif cfg.data.shards.startswith("embedded:"):
        from .metrics.refstats import embedded_stats

        ref = embedded_stats(cfg.data.shards[len("embedded:"):], cfg.data.resolution, extractor,
                             batch_size=ec.batch_size)
    else:
        raise ValueError("eval.ref: periodic FID needs reference statistics "
                         "(python tools/ref_stats.py SRC OUT.npz; then eval.ref=OUT.npz)")
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
        self.samplers = [parse_sampler(s) for s in (ec.samplers or default_samplers(cfg))]
        self.primary = self.samplers[0]["name"]

    def __call__(self, net) -> dict:
        """``{"fid/<setting>": FID, "eval_seconds": s}`` (the same on every rank; collective)."""
        ec = self.cfg.eval
        t0 = time.time()
        out = {}
        was_training = net.training
        net.eval()
        try:
            for s in self.samplers:
                generate, _ = make_generate(net, self.cfg, s, ec.seed,
                                            min(ec.batch_size, ec.num_images), self.device)
                stats = M.compute_stats_from_generator(generate, ec.num_images, self.extractor,
                                                       batch_size=ec.batch_size, max_kept=0)
                out[f"fid/{s['name']}"] = float(M.fid_from_stats(stats, self.ref).fid)
        finally:
            net.train(was_training)
        out["eval_seconds"] = float(dist.broadcast_object(time.time() - t0
                                                          if dist.is_main() else None))
        return out
