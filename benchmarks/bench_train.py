"""Training step cost: throughput, overhead over bare network compute, EMA memory per rank.

    python benchmarks/bench_train.py [--steps 10] [--models quickstart,lsun_small]
    python benchmarks/bench_train.py --models lsun32 --lpips --batch 4 --steps 2

For each model it prints:
- images/s of the trainer's full step (``Trainer.train_step``: online forward+backward,
  target forward, loss, target EMA, evaluation EMAs, optimizer, non-finite checks);
- the same step's bare network compute timed alone (online forward+backward and target
  forward on the same inputs, nothing else), and the ratio full / bare (goal <= 1.10);
- bytes per rank held by the target network and the evaluation EMAs at 1, 2 and 8 ranks
  between steps (both are sharded 1/W; during a step the target is gathered whole once,
  see cmscale/ema.py ShardedTarget).

With ``--lpips``, instead: the full step with the l2 metric, with LPIPS as cmscale computes
it (``losses.lpips_distance``), and with LPIPS as the ``lpips`` package's call (two resizes,
NCHW weights), and with cmscale's under bf16 autocast (the option), timed alternately, and
the LPIPS-step / l2-step ratios. The VGG16 has random
weights unless ``--lpips-weights`` names a file: the cost is the same.

Single process, CPU (or the current GPU); timings are medians over ``--steps`` after warm-up,
figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cmscale import losses
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
    # an LSUN-shaped UNet at 32 px: 64 channels, mult 1,2,2, attention at 16 and 8
    "lsun32": ["net.preset=lsun256", "data.resolution=32", "train.global_batch=16",
               "net.overrides.image_size=32", "net.overrides.model_channels=64",
               "net.overrides.channel_mult=[1,2,2]", "net.overrides.attention_resolutions=[16,8]",
               "ema.rates=[0.9999]"],
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


def timed(fns: dict, steps: int) -> dict:
    """Median seconds of each function, called in turn ``steps`` times after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


class PackageLPIPS:
    """LPIPS the way the ``lpips`` package is called directly: each image resized on its own,
    NCHW weights, autograd through both feature stacks' inputs as they require it."""

    def __init__(self, metric: losses.LPIPS):
        self.model = metric.model

    def __call__(self, a, b):
        if a.shape[-1] < 256:
            a = F.interpolate(a, size=224, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=224, mode="bilinear", align_corners=False)
        return self.model((a + 1) / 2, (b + 1) / 2, normalize=True).reshape(a.shape[0])


def bench_lpips(name: str, overrides: list[str], steps: int, weights: str):
    cfg = load_config(None, ["loss.mode=ct", "loss.metric=l2", "log.tensorboard=false",
                             "log.progress_bar=false", *overrides])
    trainer = Trainer(cfg, run_dir="/tmp/cmscale-bench-unused")
    res, b = cfg.data.resolution, cfg.train.global_batch
    images = torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = [(images, None)]
    ours = losses.LPIPS(weights=weights or None, random_backbone=not weights)
    before = losses.LPIPS(weights=weights or None, random_backbone=not weights)
    before.model.to(memory_format=torch.contiguous_format)
    metrics = {"l2": trainer.method.loss_fn.metric, "lpips": ours,
               "lpips_package": PackageLPIPS(before),
               # the option: VGG under bf16 autocast (fast only where bf16 is native)
               "lpips_bf16": lambda a, b: losses.lpips_distance(ours.model, a, b,
                                                                dtype=torch.bfloat16)}

    def step_with(metric):
        def fn():
            trainer.method.loss_fn.metric = metric
            trainer.train_step(batches)
        return fn

    t = timed({k: step_with(m) for k, m in metrics.items()}, steps)
    print(f"{name}: batch {b} at {res}px, CT step, {torch.get_num_threads()} thread(s)")
    for k, v in t.items():
        print(f"  {k:14s} {v * 1e3:9.1f} ms   {v / t['l2']:6.2f}x the l2 step")
    print(f"  lpips_package / lpips = {t['lpips_package'] / t['lpips']:.3f}")


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--models", default="quickstart,lsun_small")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the model's)")
    p.add_argument("--lpips", action="store_true", help="LPIPS-step / l2-step ratios")
    p.add_argument("--lpips-weights", default="", help="VGG16 file (default: random weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every model (e.g. train.precision=bf16)")
    args = p.parse_args()
    for name in args.models.split(","):
        overrides = MODELS[name] + ([f"train.global_batch={args.batch}"] if args.batch else [])
        overrides += args.set
        if args.lpips:
            bench_lpips(name, overrides, args.steps, args.lpips_weights)
        else:
            bench(name, overrides, args.steps)


if __name__ == "__main__":
    main()
