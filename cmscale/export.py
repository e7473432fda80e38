"""``cmscale export RUN [--ema NAME] [--format weights|diffusers] [--out PATH]``: one network.

    cmscale export runs/cat --out cat.safetensors                 # one weights file
    cmscale export runs/cat --format diffusers --out cat-diffusers   # a diffusers folder

Loads the newest complete checkpoint of a run (any world size saved it; this runs as one
process) with :func:`cmscale.runs.load_run`.

``--format weights`` (default) writes the chosen network's raw state dict with the reference's
key names (``.safetensors`` by default, or a torch file for ``.pt``) plus ``<out>.json`` with
the run's config and provenance. The file loads into ``cmscale.networks.create_unet(preset)``
with ``strict=True`` and works as a CD teacher (``loss.teacher=FILE``) or for ``cmscale sample``.

``--format diffusers`` writes a folder (:mod:`cmscale.diffusers_format`) that
``diffusers.ConsistencyModelPipeline.from_pretrained(OUT)`` loads offline: the UNet as a
``UNet2DModel`` and a ``CMStochasticIterativeScheduler`` with the run's sigma_min, sigma_max,
sigma_data, rho and ``sample.steps`` as its grid. ``pipe(num_inference_steps=1)`` is
``cmscale sample``'s one step, ``pipe(num_inference_steps=2)`` its ``--ts 0,S//2,S-1 --steps S``.
An EDM run's folder carries an ``EDMEulerScheduler`` config instead; ``loss.teacher`` and
``--checkpoint`` read both kinds back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import diffusers_format
from .runs import load_run
from .weights import save_state_dict

FORMATS = ("weights", "diffusers")
# modes whose networks diffusers' schedulers run as trained (ECT is EDM-parametrised, sCT/sCD
# TrigFlow: neither matches ConsistencyModelPipeline's preconditioning)
DIFFUSERS_MODES = ("edm", "cd", "ct", "ict")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmscale export", description=__doc__.split("\n")[0],
                                epilog="example: cmscale export runs/cat --format diffusers "
                                       "--out cat-diffusers",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--ema", default="", help="average to export (default: the first EMA); "
                   "'online' or 'target' also work")
    p.add_argument("--checkpoint", default=None, help="a checkpoint dir (default: newest)")
    p.add_argument("--format", default="weights", choices=FORMATS,
                   help="weights: one .safetensors/.pt file; diffusers: a pipeline folder")
    p.add_argument("--out", default=None, help="output file (.safetensors or .pt), or folder "
                   "for --format diffusers")
    args = p.parse_args(argv)

    net, info = load_run(args.run_dir, args.ema, args.checkpoint)
    cfg = info["config"]
    meta = {"preset": cfg.net.preset, "net_overrides": cfg.net.overrides,
            "mode": cfg.loss.mode, "network": info["network"], "nimg": info["nimg"],
            "step": info["step"], "sigma_data": cfg.net.sigma_data,
            "sigma_min": cfg.net.sigma_min, "sigma_max": cfg.net.sigma_max,
            "time_input": cfg.net.time_input}
    stem = os.path.join(args.run_dir, f"export-{info['network']}-{info['nimg']:012d}")
    if args.format == "diffusers":
        if cfg.loss.mode not in DIFFUSERS_MODES:
            print(f"cmscale export: cannot write a diffusers folder for a {cfg.loss.mode!r} "
                  f"run: diffusers' consistency scheduler assumes the CD/CT parametrisation "
                  f"(c_skip, c_out shifted by sigma_min) and its EDM scheduler an EDM denoiser; "
                  f"export --format weights instead", file=sys.stderr)
            return 2
        out = args.out or stem + "-diffusers"
        kw = diffusers_format.unet_kwargs(cfg.net.preset, cfg.net.overrides)
        sched = diffusers_format.scheduler_config(
            cfg.loss.mode, cfg.net.sigma_min, cfg.net.sigma_max, cfg.net.sigma_data,
            cfg.net.rho, cfg.sample.steps)
        try:
            diffusers_format.write_folder(out, kw, net.model.state_dict(), sched, meta)
        except ValueError as e:
            print(f"cmscale export: cannot write a diffusers folder: {e}", file=sys.stderr)
            return 2
        print(out)
        return 0
    out = args.out or stem + ".safetensors"
    save_state_dict(net.model.state_dict(), out, metadata=meta)
    with open(out + ".json", "w") as f:
        json.dump({"export": meta, "config": cfg.to_dict()}, f, indent=2, default=list)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
