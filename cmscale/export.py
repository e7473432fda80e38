"""``cmscale export RUN_DIR [--ema NAME] [--out FILE]``: one network as a single weights file.

Loads the newest complete checkpoint of a run (any world size saved it; this runs as one
process) with :func:`cmscale.runs.load_run` and writes the chosen network's raw state dict with
the reference's key names (``.safetensors`` by default, or a torch file for ``.pt``) plus
``<out>.json`` with the run's config and provenance. The file loads into
``cmscale.networks.create_unet(preset)`` with ``strict=True`` and works as a CD teacher
(``loss.teacher=FILE``) or for ``cmscale sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .runs import load_run
from .weights import save_state_dict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmscale export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--ema", default="", help="average to export (default: the first EMA); "
                   "'online' or 'target' also work")
    p.add_argument("--checkpoint", default=None, help="a checkpoint dir (default: newest)")
    p.add_argument("--out", default=None, help="output file (.safetensors or .pt)")
    args = p.parse_args(argv)

    net, info = load_run(args.run_dir, args.ema, args.checkpoint)
    cfg = info["config"]
    out = args.out or os.path.join(args.run_dir, f"export-{info['network']}-{info['nimg']:012d}"
                                   ".safetensors")
    meta = {"preset": cfg.net.preset, "net_overrides": cfg.net.overrides,
            "mode": cfg.loss.mode, "network": info["network"], "nimg": info["nimg"],
            "step": info["step"], "sigma_data": cfg.net.sigma_data,
            "sigma_min": cfg.net.sigma_min, "sigma_max": cfg.net.sigma_max,
            "time_input": cfg.net.time_input}
    save_state_dict(net.model.state_dict(), out, metadata=meta)
    with open(out + ".json", "w") as f:
        json.dump({"export": meta, "config": cfg.to_dict()}, f, indent=2, default=list)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
