"""``cmscale export RUN_DIR [--ema NAME] [--out FILE]``: one network as a single weights file.

Loads the newest complete checkpoint of a run (any world size saved it; this runs as one
process), assembles the chosen average and writes the raw network's state dict with the
reference's key names (``.safetensors`` by default, or a torch file for ``.pt``) plus
``<out>.json`` with the run's config and provenance. The file loads into
``cmscale.networks.create_unet(preset)`` with ``strict=True`` and works as a CD teacher
(``loss.teacher=FILE``) or for ``cmscale sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import checkpoint
from .config import load_config
from .ema import ShardedAverage, ema_name, frozen_copy


def load_run_network(run_dir: str, which: str = "", ckpt: str | None = None):
    """(network, config, checkpoint meta) for ``which`` = an EMA name, 'online' or 'target'.

    ``which`` defaults to the first evaluation EMA of the run."""
    from .methods import build_net

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    net = build_net(cfg)
    emas = {ema_name(r): ShardedAverage(net, float(r)) for r in cfg.ema.rates}
    which = which or (next(iter(emas)) if emas else "online")
    state = {"model": checkpoint.ModelOptimizer(net)}
    if which in emas:
        state["ema"] = {which: checkpoint.FlatShard(emas[which].local, emas[which].numel)}
    elif which == "target":
        if cfg.loss.mode not in ("cd", "ct"):
            raise ValueError(f"mode {cfg.loss.mode!r} has no separate target network")
        target = ShardedAverage(net, 0.0)
        state["target"] = checkpoint.FlatShard(target.local, target.numel)
    elif which != "online":
        raise ValueError(f"unknown network {which!r}: choose 'online', 'target' or one of "
                         f"{list(emas)}")
    if ckpt:
        meta = checkpoint.load(ckpt, state)
    else:
        meta = checkpoint.load_latest(run_dir, state)
        if meta is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_dir}/checkpoints")
    if which in emas:
        net = emas[which].gather(frozen_copy(net))
    elif which == "target":
        net = target.gather(frozen_copy(net))
    return net.eval(), cfg, dict(meta, network=which)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmscale export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--ema", default="", help="average to export (default: the first EMA); "
                   "'online' or 'target' also work")
    p.add_argument("--checkpoint", default=None, help="a checkpoint dir (default: newest)")
    p.add_argument("--out", default=None, help="output file (.safetensors or .pt)")
    args = p.parse_args(argv)
    from .weights import save_state_dict

    net, cfg, meta = load_run_network(args.run_dir, args.ema, args.checkpoint)
    out = args.out or os.path.join(args.run_dir, f"export-{meta['network']}-{meta['nimg']:012d}"
                                   ".safetensors")
    info = {"preset": cfg.net.preset, "net_overrides": cfg.net.overrides,
            "mode": cfg.loss.mode, "network": meta["network"], "nimg": meta["nimg"],
            "step": meta.get("step"), "sigma_data": cfg.net.sigma_data,
            "sigma_min": cfg.net.sigma_min, "sigma_max": cfg.net.sigma_max}
    save_state_dict(net.model.state_dict(), out, metadata=info)
    with open(out + ".json", "w") as f:
        json.dump({"export": info, "config": cfg.to_dict()}, f, indent=2, default=list)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
