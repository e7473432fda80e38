"""Training step cost: throughput, overhead over bare network compute, EMA memory per rank.

    python benchmarks/bench_train.py [--steps 10] [--models quickstart,lsun_small] [--sct]
    python benchmarks/bench_train.py --models lsun32 --lpips --batch 4 --steps 2
    python benchmarks/bench_train.py --models lsun32 --reference /tmp/cmref [--precisions fp32,bf16]

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

With ``--lpips``, instead: the full step with the l2 metric, with LPIPS as cmscale computes
it (``losses.lpips_distance``), and with LPIPS as the ``lpips`` package's call (two resizes,
NCHW weights), and with cmscale's under bf16 autocast (the option), timed alternately, and
the LPIPS-step / l2-step ratios. The VGG16 has random
weights unless ``--lpips-weights`` names a file: the cost is the same.

With ``--reference DIR`` (a checkout of openai/consistency_models; its ``flash_attn`` import is
served by an SDPA stand-in defined here, its LPIPS is off; its fp32 target update is replaced
by the same update_ema on the target's parameters, see ``reference_trainer``): the reference's
``CMTrainLoop.run_step`` (consistency training, l2, fp32, RAdam, one EMA) and our
``Trainer.train_step`` on the same network (the lsun32 model), batch and inputs, alternately,
with our step at each of ``--precisions`` (default fp32), and the img/s ratios.

Single process, CPU (or the current GPU); timings are medians over ``--steps`` after warm-up,
figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from cmscale import losses, parallel
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


def ct_trainer(overrides: list[str]):
    """(cfg, trainer, images): a CT (l2) Trainer of ``overrides`` and one fixed global batch."""
    cfg = load_config(None, ["loss.mode=ct", "loss.metric=l2", "log.tensorboard=false",
                             "log.progress_bar=false", *overrides])
    trainer = Trainer(cfg, run_dir="/tmp/cmscale-bench-unused")
    res, b = cfg.data.resolution, cfg.train.global_batch
    images = torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return cfg, trainer, images


def step_at(trainer, images, precision: str):
    """The trainer's full step on ``images`` with autocast at ``precision``."""
    def fn():
        trainer.backend.precision = precision
        trainer.train_step([(images, None)])
    return fn


def bench_lpips(name: str, overrides: list[str], steps: int, weights: str):
    cfg, trainer, images = ct_trainer(overrides)
    res, b = cfg.data.resolution, cfg.train.global_batch
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


def bench_precisions(name: str, overrides: list[str], steps: int, precisions: list[str]):
    """The full step at each precision (one trainer, autocast switched), timed alternately."""
    cfg, trainer, images = ct_trainer(overrides)
    res, b = cfg.data.resolution, cfg.train.global_batch

    t = timed({p: step_at(trainer, images, p) for p in precisions}, steps)
    print(f"{name}: batch {b} at {res}px, CT step, {torch.get_num_threads()} thread(s); "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{parallel.native_bf16(trainer.device)}")
    for p, v in t.items():
        print(f"  {p:6s} {v * 1e3:9.1f} ms   {b / v:8.2f} images/s   {t[precisions[0]] / v:5.2f}x "
              f"{precisions[0]}'s speed")


class SDPAFlashAttention(torch.nn.Module):
    """Stand-in for ``flash_attn.flash_attention.FlashAttention`` (CUDA only) on SDPA: qkv
    (B, L, 3, H, d) -> ((B, L, H, d), None), scale 1/sqrt(d), as flash-attn computes."""

    def __init__(self, attention_dropout=0.0, **kwargs):
        super().__init__()

    def forward(self, qkv, key_padding_mask=None, need_weights=False, causal=False):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2), None


def reference_trainer(ref_dir: str, cfg, overrides_net: dict):
    """The reference's CMTrainLoop for consistency training on the lsun32 network."""
    stub = types.ModuleType("flash_attn.flash_attention")
    stub.FlashAttention = SDPAFlashAttention
    sys.modules.setdefault("flash_attn", types.ModuleType("flash_attn"))
    sys.modules["flash_attn.flash_attention"] = stub
    sys.path.insert(0, os.path.abspath(ref_dir))
    from cm import dist_util  # noqa: F401  (the reference's modules, from ref_dir)
    from cm.karras_diffusion import KarrasDenoiser
    from cm.nn import update_ema
    from cm.script_util import create_ema_and_scales_fn, create_model
    from cm.train_util import CMTrainLoop

    parallel._ensure_process_group(types.SimpleNamespace())  # gloo, one rank
    net = dict(image_size=cfg.data.resolution, num_channels=overrides_net["model_channels"],
               num_res_blocks=2, channel_mult=",".join(map(str, overrides_net["channel_mult"])),
               attention_resolutions=",".join(map(str, overrides_net["attention_resolutions"])),
               num_head_channels=64, use_scale_shift_norm=False, resblock_updown=True,
               dropout=0.0)
    model, target = create_model(**net), create_model(**net)
    target.load_state_dict(model.state_dict())
    diffusion = KarrasDenoiser(sigma_data=0.5, sigma_max=80.0, sigma_min=0.002,
                               weight_schedule="uniform", loss_norm="l2")
    ema_scale_fn = create_ema_and_scales_fn("adaptive", 0.95, "progressive", 2, 150,
                                            cfg.train.total_steps, 50000)
    loop = CMTrainLoop(model=model, diffusion=diffusion, data=None,
                       batch_size=cfg.train.global_batch, microbatch=-1, lr=cfg.optim.lr,
                       ema_rate=",".join(str(r) for r in cfg.ema.rates), log_interval=10**9,
                       save_interval=10**9, resume_checkpoint="", use_fp16=False,
                       target_model=target, teacher_model=None, teacher_diffusion=None,
                       training_mode="consistency_training", ema_scale_fn=ema_scale_fn,
                       total_training_steps=cfg.train.total_steps)

    def update_target():
        # The reference's own target update pairs flattened (fp16-style) target master
        # params with fp32 master params, which fails without use_fp16: update the target's
        # parameters with its update_ema, at the rate its schedule gives.
        rate, _ = loop.ema_scale_fn(loop.global_step)
        with torch.no_grad():
            update_ema(list(target.parameters()), loop.mp_trainer.master_params, rate=rate)

    loop._update_target_ema = update_target
    return loop


def bench_reference(name: str, overrides: list[str], steps: int, ref_dir: str,
                    precisions: list[str]):
    cfg, trainer, images = ct_trainer(overrides)
    ref = reference_trainer(ref_dir, cfg, cfg.net.overrides)
    res, b = cfg.data.resolution, cfg.train.global_batch

    fns = {"reference": lambda: ref.run_step(images, {})}
    fns.update({f"ours_{p}": step_at(trainer, images, p) for p in precisions})
    t = timed(fns, steps)
    print(f"{name}: batch {b} at {res}px, CT step, l2, {torch.get_num_threads()} thread(s); "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{parallel.native_bf16(trainer.device)}")
    for k, v in t.items():
        print(f"  {k:12s} {v * 1e3:9.1f} ms   {b / v:8.2f} images/s   "
              f"{t['reference'] / v:5.2f}x the reference's img/s")


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
    p.add_argument("--models", default="quickstart,lsun_small")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the model's)")
    p.add_argument("--lpips", action="store_true", help="LPIPS-step / l2-step ratios")
    p.add_argument("--lpips-weights", default="", help="VGG16 file (default: random weights)")
    p.add_argument("--reference", default="", metavar="DIR",
                   help="checkout of openai/consistency_models: side-by-side CT step")
    p.add_argument("--sct", action="store_true", help="sCT / CT step time instead")
    p.add_argument("--precisions", default="",
                   help="e.g. fp32,bf16: the full step at each, alternately")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every model (e.g. train.precision=bf16)")
    args = p.parse_args()
    for name in args.models.split(","):
        overrides = MODELS[name] + ([f"train.global_batch={args.batch}"] if args.batch else [])
        overrides += args.set
        if args.reference:
            bench_reference(name, overrides, args.steps, args.reference,
                            (args.precisions or "fp32").split(","))
        elif args.sct:
            bench_sct(name, overrides, args.steps)
        elif args.lpips:
            bench_lpips(name, overrides, args.steps, args.lpips_weights)
        elif args.precisions:
            bench_precisions(name, overrides, args.steps, args.precisions.split(","))
        else:
            bench(name, overrides, args.steps)


if __name__ == "__main__":
    main()
