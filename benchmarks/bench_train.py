"""Training step cost: throughput, overhead over bare network compute, EMA memory per rank.

    python benchmarks/bench_train.py [--steps 10] [--models quickstart,lsun_small] [--sct]

For each model it prints:
- images/s of the trainer's full step (``Trainer.train_step``: online forward+backward,
  target forward, loss, target EMA, evaluation EMAs, optimizer, non-finite checks);
- the same step's bare network compute timed alone (online forward+backward and target
  forward on the same inputs, nothing else), and the ratio full / bare (goal <= 1.10);
- bytes per rank held by the target network and the evaluation EMAs at 1, 2 and 8 ranks
  between steps (both are sharded 1/W; during a step the target is gathered whole once,
  see cmscale/ema.py ShardedTarget).

With ``--sct``, instead: the sCT step (online forward+backward, one JVP of the stop-gradient
network, learned weighting) against the CT step (online forward+backward, target forward)
on the same network and batch, timed alternately: the ratio sCT / CT is the JVP's cost.

Single process, CPU (or the current GPU); timings are medians over ``--steps`` after warm-up,
figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cmscale.config import load_config
from cmscale.ema import ShardedAverage, ShardedTarget
from cmscale.training_loop import Trainer

MODELS = {
    # the quickstart's network and batch
    "quickstart": ["net.preset=tiny16", "data.resolution=16", "train.global_batch=64",
                   "ema.rates=[0.995]"],
    # LSUN 256's UNet shape (mult 1,1,2,2,4,4, attention at 32,16,8) at 64 px and 64 channels
    "lsun_small": ["net.preset=lsun256", "data.resolution=64", "train.global_batch=8",
                   "net.overrides.image_size=64", "net.overrides.model_channels=64",
                   "net.overrides.attention_resolutions=[32,16,8]",
                   "ema.rates=[0.9999,0.99994,0.9999432189950708]"],
}


def timed_pair(fa, fb, steps: int) -> tuple[float, float]:
    """Medians of fa and fb timed alternately (a shared machine drifts; pairs see the same)."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(steps):
        for fn, times in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def bench(name: str, overrides: list[str], steps: int):
    cfg = load_config(None, ["loss.mode=ct", "loss.metric=l2", "log.tensorboard=false",
                             "log.progress_bar=false", *overrides])
    trainer = Trainer(cfg, run_dir="/tmp/cmscale-bench-unused")
    res, b = cfg.data.resolution, cfg.train.global_batch
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, res, res, generator=g) * 2 - 1
    batches = [(images, None)]

    net, target = trainer.net, trainer.target
    sigma = torch.full((b,), 2.0)
    sigma_next = torch.full((b,), 1.5)
    z = torch.randn(images.shape, generator=g)

    def bare():
        out = net(images + 2.0 * z, sigma)
        with torch.no_grad():
            tgt = target(images + 1.5 * z, sigma_next)
        ((out - tgt) ** 2).mean().backward()
        net.zero_grad(set_to_none=True)

    full, bare_t = timed_pair(lambda: trainer.train_step(batches), bare, steps)
    params = sum(p.numel() for p in net.parameters())
    print(f"{name}: {params:,} parameters, batch {b} at {res}px")
    print(f"  full step  {full * 1e3:9.1f} ms   {b / full:8.1f} images/s")
    print(f"  bare net   {bare_t * 1e3:9.1f} ms   {b / bare_t:8.1f} images/s")
    print(f"  overhead   full / bare = {full / bare_t:.3f}")
    for world in (1, 2, 8):
        emas = [ShardedAverage(net, r, rank=0, world_size=world) for r in cfg.ema.rates]
        ema_bytes = sum(e.local.numel() * e.local.element_size() for e in emas)
        shard = ShardedTarget(net, rank=0, world_size=world).local if target is not None else None
        target_bytes = 0 if shard is None else shard.numel() * shard.element_size()
        print(f"  memory per rank, {world} rank(s): target {target_bytes / 2**20:7.2f} MiB + "
              f"{len(emas)} EMAs {ema_bytes / 2**20:7.2f} MiB = "
              f"{(target_bytes + ema_bytes) / 2**20:7.2f} MiB")


def bench_sct(name: str, overrides: list[str], steps: int):
    """sCT step time / CT step time of the trainer on the same network, batch and data."""
    common = ["log.tensorboard=false", "log.progress_bar=false", *overrides]
    ct = Trainer(load_config(None, ["loss.mode=ct", "loss.metric=l2", *common]),
                 run_dir="/tmp/cmscale-bench-unused")
    sct = Trainer(load_config(None, ["loss.mode=sct", *common]),
                  run_dir="/tmp/cmscale-bench-unused")
    res, b = ct.cfg.data.resolution, ct.cfg.train.global_batch
    images = torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = [(images, None)]
    t_sct, t_ct = timed_pair(lambda: sct.train_step(batches), lambda: ct.train_step(batches),
                             steps)
    params = sum(p.numel() for p in ct.net.parameters())
    print(f"{name}: {params:,} parameters, batch {b} at {res}px")
    print(f"  CT step   {t_ct * 1e3:9.1f} ms")
    print(f"  sCT step  {t_sct * 1e3:9.1f} ms   sCT / CT = {t_sct / t_ct:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sct", action="store_true", help="sCT / CT step time instead")
    args = p.parse_args()
    for name in args.models.split(","):
        (bench_sct if args.sct else bench)(name, MODELS[name], args.steps)


if __name__ == "__main__":
    main()
