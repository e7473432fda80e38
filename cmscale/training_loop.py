"""The one training loop: EDM teachers, CD, CT, iCT, sCT and sCD; DDP or DeepSpeed; any world size.

``training_loop(cfg, run_dir)`` trains or resumes and returns the exit code: 0 finished,
``EXIT_NONFINITE`` (65) after ``train.max_nonfinite_steps`` skipped steps in a row (no
checkpoint written), ``dist.EXIT_REQUEUE`` (75) after a stop signal and its checkpoint.
A step of the global batch: for every micro-batch, seed from (seed, step, offset in the global
batch), the method's per-example loss, the backend's backward; then the backend's step, and,
if applied, the target (rate mu(k)) and the evaluation EMAs from the full fp32 weights. The
loop never asks which method (:mod:`cmscale.methods`) or backend (:mod:`cmscale.parallel`) it
runs. Design notes: ``docs/data-flow.md``, ``docs/determinism.md``, ``docs/checkpoints.md``,
``docs/preemption.md``, ``docs/backends.md``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from . import checkpoint, dist, parallel
from .atomic import write_json
from .config import Config, dump_config
from .data import build_loader
from .data.embedded import ensure_embedded_shards
from .ema import ShardedAverage, ShardedTarget, ema_name, update_averages
from .evaluation import PeriodicEval
from .imageio import make_grid, save_png
from .methods import Method, build_method, build_net
from .runs import network_name
from .sampling import PerImageNoise

EXIT_NONFINITE = 65
BEST_FILE = "best.json"  # the checkpoint with the lowest periodic FID (see Trainer.evaluate)


def read_best(run_dir: str) -> dict | None:
    """The run's ``best.json`` (nimg, step, checkpoint, metric, fid, ema), or None."""
    try:
        with open(os.path.join(run_dir, BEST_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def step_seed(seed: int, step: int, offset: int) -> int:
    """A 63-bit seed for the micro-batch starting at global sample ``offset`` of ``step``.

    Keyed by the position in the global batch, not by rank: with the same micro-batch size,
    a sample gets the same noise, pair index and dropout at any world size."""
    state = np.random.SeedSequence([seed, step, offset]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- building


def build_optimizer(cfg: Config, params):
    oc = cfg.optim
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    # foreach: one fused kernel per op over all tensors instead of a Python loop per parameter
    return cls[oc.name](params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                        foreach=True)


def learning_rate(cfg: Config, step: int) -> float:
    """Constant lr (the reference's) after an optional linear warm-up."""
    w = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.optim.lr


def build_data(cfg: Config, info: dist.DistInfo, streams: int, nimg: int,
               device=None) -> list:
    """This rank's loaders: streams ``r*k .. (r+1)*k - 1`` of ``streams`` (k = streams / W).

    Each stream is a loader for "rank s of ``streams``" with ``global_batch / streams`` images
    per step; a rank concatenates its k streams. The global batch is streams 0..D-1 in order,
    whatever W is, so with ``data.streams`` fixed the data a step sees does not depend on the
    number of ranks."""
    shards = cfg.data.shards
    if shards.startswith("embedded:"):
        # Rank 0 builds the shards once into the cache; the others wait for it.
        name = shards[len("embedded:"):]
        if dist.is_main():
            shards = ensure_embedded_shards(name, resolution=cfg.data.resolution)
        dist.barrier()
        shards = ensure_embedded_shards(name, resolution=cfg.data.resolution)
    k = streams // info.world_size
    return [build_loader(
        shards, batch_size_per_rank=cfg.train.global_batch // streams, rank=s,
        world_size=streams, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
        start_images=nimg, resolution=cfg.data.resolution, class_cond=cfg.data.class_cond,
        random_flip=cfg.data.random_flip, bad_input=cfg.data.bad_input,
        channels=cfg.data.channels,
        # on an accelerator the workers deliver uint8 and the device flips and converts
        device=device)
        for s in range(info.rank * k, (info.rank + 1) * k)]


def batch_split(cfg: Config, world: int) -> tuple[int, int, int, int]:
    """(data streams, per-rank batch, micro-batch, accumulation steps) at ``world`` ranks."""
    gb = cfg.train.global_batch
    streams = cfg.data.streams or world
    if streams % world:
        raise ValueError(f"data.streams={streams} is not divisible by the world size {world}")
    if gb % streams:
        raise ValueError(f"train.global_batch={gb} is not divisible into {streams} data "
                         f"streams (data.streams, default one per rank)")
    per_rank = gb // world
    micro = cfg.train.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"train.micro_batch={micro} does not divide the per-rank batch "
                         f"{per_rank} (global {gb} over {world} ranks)")
    return streams, per_rank, micro, per_rank // micro


# ----------------------------------------------------------------------------- logging


class Logger:
    """Rank 0: tqdm bar, one-line summaries, JSONL metrics and TensorBoard scalars/images."""

    def __init__(self, cfg: Config, run_dir: str, start_step: int):
        self.main = dist.is_main()
        self.bar = self.tb = None
        self.jsonl = None
        if not self.main:
            return
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard is an install requirement; be lenient anyway
                self.tb = None
        if cfg.log.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def step(self, postfix: dict):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def scalars(self, record: dict, step: int, line: bool = True):
        if not self.main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(k, v, step)
        if line:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items())
            (self.bar.write if self.bar is not None else print)(text)

    def image(self, tag: str, grid: torch.Tensor, step: int):
        if self.main and self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_grid(net, method: Method, cfg: Config, device, n: int | None = None) -> torch.Tensor:
    """The method's preview panels (one step, and multistep) side by side, uint8 CHW.

    Each panel's sampler starts from the same per-image noise streams (seed, i)."""
    n = n or cfg.sample.num_grid
    res = cfg.data.resolution
    net_labels = None
    num_classes = getattr(getattr(net, "model", None), "num_classes", None)
    if num_classes:
        net_labels = torch.arange(n, device=device) % num_classes
    grid = dict(sigma_min=cfg.net.sigma_min, sigma_max=cfg.net.sigma_max, rho=cfg.net.rho)
    was_training = net.training
    net.eval()
    shape = (cfg.data.channels, res, res)
    panels = [s.run(net, PerImageNoise(cfg.sample.seed, range(n), shape, device=device),
                    net_labels, **grid) for s in method.preview()]
    net.train(was_training)
    return torch.cat([make_grid(p) for p in panels], dim=2)


# ----------------------------------------------------------------------------- the loop


class Trainer:
    """State and steps of one run. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.info = dist.init(timeout=datetime.timedelta(seconds=cfg.train.dist_timeout_s))
        self.device = self.info.device
        checkpoint.check_run_dir(run_dir)  # read-only, uncreatable or node-local: fail now
        tc = cfg.train
        self.streams, self.per_rank, self.micro, self.accum = batch_split(cfg,
                                                                           self.info.world_size)
        self.check_resumable()  # before anything is built (a DeepSpeed engine takes a while)

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.net = build_net(cfg).to(self.device).train()
        self.method = build_method(cfg, self.device)
        self.method.prepare(self.net)  # before the target and EMAs copy the weights
        self.opt = build_optimizer(cfg, self.net.parameters())
        # An EMA target network when the method needs one, sharded over the ranks like the
        # EMAs and gathered whole only during a step; otherwise the loss takes its target
        # from the online network itself (under no_grad: backend.stop_gradient_network).
        self.target = (ShardedTarget(self.net, self.info.rank, self.info.world_size)
                       if self.method.needs_target else None)
        # Built from the plain module before it is wrapped: DeepSpeed moves (ZeRO-1/2) or
        # partitions (ZeRO-3) the parameter storage.
        self.emas = {ema_name(r): ShardedAverage(self.net, float(r), self.info.rank,
                                                 self.info.world_size)
                     for r in cfg.ema.rates}
        # Periodic FID: extractor and reference statistics now, so that missing weights or
        # statistics are an error before training starts (collective).
        self.evaluator = None
        if cfg.eval.every_images:
            self.evaluator = PeriodicEval(cfg, self.device)
        self.saved_step = -1  # the step of the newest checkpoint this process wrote
        self.backend = parallel.build_backend(self.net, self.opt, cfg, self.info, self.micro,
                                              self.accum, lambda: build_net(cfg),
                                              self.method.forward_mode_target)
        if tc.compile and self.target is not None:
            self.target.compile(lambda fn: parallel.compile_module(fn, self.device,
                                                                  cfg.train.compile_backend))
        self.step = 0
        self.nonfinite = 0  # consecutive skipped steps
        # Reader positions of every stream's workers (replicated in the checkpoint), and the
        # layout they belong to: they are only reused by a run with the same layout.
        self.data_positions = torch.zeros(self.streams, max(1, cfg.data.num_workers),
                                          dtype=torch.int64)
        self.data_layout = [self.streams, max(1, cfg.data.num_workers),
                            cfg.train.global_batch // self.streams]
        self.saved_layout = None

    # -- checkpoint state ------------------------------------------------------------------
    def state(self, loading: bool = False) -> dict:
        """The checkpoint entries (``loading``: those a resume reads back from DCP)."""
        s = self.backend.state(loading)  # model (+ optimizer) and loss scale, as it keeps them
        s.update({
            "ema": {name: checkpoint.FlatShard(e.local, e.numel) for name, e in self.emas.items()},
            "train": {"step": self.step, "nonfinite": self.nonfinite},
            # a plain list (not a tensor): its shape changes with the layout
            "data": {"positions": self.data_positions.tolist(), "layout": self.data_layout},
        })
        if self.target is not None:
            s["target"] = checkpoint.FlatShard(self.target.local, self.target.numel)
        return s

    def save(self, reason: str):
        nimg = self.step * self.cfg.train.global_batch
        if hasattr(self, "loaders"):
            mine = torch.zeros_like(self.data_positions)
            first = self.info.rank * len(self.loaders)
            for i, loader in enumerate(self.loaders):
                mine[first + i] = torch.tensor(loader.state_dict()["positions"])
            self.data_positions.copy_(dist.all_reduce_sum(mine))
        # Entries with files of their own write them into this checkpoint's directory
        # before the commit marker.
        state = {**self.state(),
                 **self.backend.files(checkpoint.checkpoint_path(self.run_dir, nimg))}
        meta = {"nimg": nimg, "step": self.step, "reason": reason,
                "backend": self.cfg.train.backend, "target_layout": "flat",
                **self.backend.meta()}
        if hasattr(self, "loaders"):
            meta["data_shards"] = self.loaders[0].shard_set.fingerprint()
        path = checkpoint.save(self.run_dir, state, meta)
        self.saved_step = self.step
        if dist.is_main():
            best = read_best(self.run_dir)
            checkpoint.keep_last(self.run_dir, self.cfg.checkpoint.keep_last,
                                 protect=[best["nimg"]] if best else ())
        dist.print0(f"checkpoint: {path} ({reason})")

    def check_resumable(self) -> None:
        """Raise ValueError if the newest checkpoint was written by another backend, or by
        DeepSpeed at another world size or ZeRO stage (collective; reads only its marker)."""
        latest = None
        if dist.is_main():
            found = checkpoint.latest_checkpoint(self.run_dir, warn=False)
            latest = found.meta if found is not None else None
        latest = dist.broadcast_object(latest)
        self.latest_meta = latest
        if latest is not None:
            parallel.check_resume(self.cfg, latest, self.info.world_size)

    def check_shards(self, saved: dict | None) -> bool:
        """Whether the shard list is the one the checkpoint's data positions refer to.

        Collective. Every rank must see the same list (a node with a stale copy or mount
        would read other samples); a list that changed since the save (shards added,
        removed, re-packed) is refused unless ``data.allow_shard_change``, which resumes with
        the data order of the new list from the images seen. Raises ValueError."""
        mine = self.loaders[0].shard_set.fingerprint()
        seen = dist.all_gather_object(mine)
        differ = [r for r, f in enumerate(seen) if f != seen[0]]
        if differ:
            raise ValueError(
                f"ranks see different shard lists for data.shards={self.cfg.data.shards!r}: rank 0 "
                f"{seen[0]}, rank {differ[0]} {seen[differ[0]]}; every node must see the same "
                f"shards (a shared file system, or identical copies)")
        if saved is None or saved == mine:  # None: a checkpoint from before fingerprints
            return True
        what = (f"the shard list of data.shards={self.cfg.data.shards!r} changed since the "
                f"checkpoint was written: it had {saved['shards']} shards, {saved['samples']} "
                f"samples ({saved['first']} .. {saved['last']}, digest {saved['digest']}); now "
                f"{mine['shards']} shards, {mine['samples']} samples ({mine['first']} .. "
                f"{mine['last']}, digest {mine['digest']})")
        if not self.cfg.data.allow_shard_change:
            raise ValueError(
                f"{what}. The saved data positions refer to the old list. Restore it, or set "
                f"data.allow_shard_change=true to continue with the new list (its data order "
                f"from the images seen; the run is then no longer reproducible from scratch)")
        dist.print0(f"warning: {what}; continuing with the new list (data.allow_shard_change)")
        return False

    def resume(self) -> dict | None:
        state = self.state(loading=True)
        old_target = None
        if (self.target is not None and self.latest_meta is not None
                and self.latest_meta.get("target_layout") != "flat"):
            # a checkpoint that holds the target as a whole module, not as flat shards
            state["target"] = old_target = self._blank_net()
        if ("scaler" in state and self.latest_meta is not None
                and "loss_scale" not in self.latest_meta):
            state["scaler"] = {"scale": torch.tensor(0.0)}  # written with torch's GradScaler
        meta = checkpoint.load_latest(self.run_dir, state)
        if meta is None:
            return None
        self.backend.restore(state, checkpoint.checkpoint_path(self.run_dir, meta["nimg"]))
        if old_target is not None:
            self.target.update(0.0, list(old_target.parameters()))  # rate 0: copy its shard
        self.saved_layout = list(state["data"]["layout"])
        if self.saved_layout == self.data_layout:
            self.data_positions = torch.tensor(state["data"]["positions"], dtype=torch.int64)
        self.step = int(state["train"]["step"])
        self.nonfinite = int(state["train"]["nonfinite"])
        self.resumed_world = int(meta.get("world_size", self.info.world_size))
        return meta

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self, batches) -> tuple[float, bool]:
        """One optimizer step on this rank's micro-batches: (mean loss over all ranks, applied).

        A skipped step (non-finite loss or gradients, on every rank alike) changes no weights."""
        N, mu = self.method.schedule(self.step)
        self.backend.set_lr(learning_rate(self.cfg, self.step))
        total = torch.zeros((), device=self.device)
        target = (self.target if self.target is not None else
                  self.backend.stop_gradient_network(self.method.forward_mode_target))
        for m, (images, labels) in enumerate(batches):
            offset = self.info.rank * self.per_rank + m * self.micro
            torch.manual_seed(step_seed(self.cfg.train.seed, self.step, offset))
            with self.backend.micro_batch(m, len(batches)):
                with self.backend.autocast():
                    loss = self.method.loss(self.backend.wrapped, target, images, labels, N,
                                            self.step).mean() / len(batches)
                self.backend.backward(loss)
            total += loss.detach()
        mean_loss = dist.all_reduce_mean(total)
        applied = self.backend.step()
        if self.target is not None:
            self.target.release()  # between steps a rank holds only its shard
        if applied:
            with self.backend.full_parameters() as full:
                update_averages(self.target, list(self.emas.values()), mu, full.parameters(),
                                self.cfg.net.kernels)
        return float(mean_loss), applied

    def run(self) -> int:
        cfg, tc = self.cfg, self.cfg.train
        if dist.is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
        dist.barrier()
        done = self.latest_meta
        if done is not None and int(done.get("step", -1)) >= tc.total_steps:
            # Decided from the checkpoint's metadata alone: nothing is loaded or built.
            dist.print0(f"run already finished ({done['step']} steps); nothing to do")
            return 0
        for warning in self.method.warnings():
            dist.print0(warning)
        meta = self.resume()
        if meta is not None:
            dist.print0(f"resumed from {meta['nimg']} images (step {self.step}, "
                        f"saved by {meta.get('world_size')} ranks)")
        nimg = self.step * tc.global_batch
        self.loaders = build_data(cfg, self.info, self.streams, nimg, self.device)
        if not self.check_shards(None if meta is None else meta.get("data_shards")):
            self.saved_layout = None  # a new shard list: positions derived from nimg
        if self.saved_layout == self.data_layout:
            # Exact positions (they stay exact even after skipped bad samples).
            first = self.info.rank * len(self.loaders)
            for i, loader in enumerate(self.loaders):
                st = loader.state_dict()
                st["positions"] = self.data_positions[first + i].tolist()
                loader.load_state_dict(st)
        dist.install_signal_handlers()
        log = Logger(cfg, self.run_dir, self.step)
        code = 0
        try:
            code = self._loop(log)
        finally:
            log.close()
        return code

    def _loop(self, log: Logger) -> int:
        cfg, tc = self.cfg, self.cfg.train
        gb = tc.global_batch
        if self.step >= tc.total_steps:
            dist.print0(f"run already finished ({self.step} steps); nothing to do")
            return 0
        its = [iter(loader) for loader in self.loaders]
        t_last, n_last, losses_since = time.time(), self.step, []
        while self.step < tc.total_steps:
            batches = []
            parts = [next(it) for it in its]
            # one stream per rank (the default): no copy of the batch
            images = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            labels = (None if parts[0][1] is None else parts[0][1] if len(parts) == 1
                      else torch.cat([p[1] for p in parts]))
            for m in range(self.accum):
                sl = slice(m * self.micro, (m + 1) * self.micro)
                batches.append((images[sl].to(self.device),
                                None if labels is None else labels[sl].to(self.device)))
            loss, finite = self.train_step(batches)
            if finite:
                self.nonfinite = 0
            else:
                self.nonfinite += 1
                dist.print0(f"step {self.step}: non-finite loss or gradient, step skipped "
                            f"({self.nonfinite} in a row)")
                if self.nonfinite >= tc.max_nonfinite_steps:
                    dist.print0(f"stopping: {self.nonfinite} consecutive non-finite steps; the "
                                "last complete checkpoint is untouched. Lower optim.lr, use "
                                "bf16/fp32, or check the data.")
                    return EXIT_NONFINITE
            self.step += 1
            nimg = self.step * gb
            losses_since.append(loss)
            logs = self.method.logs(self.step - 1)
            log.step({"loss": f"{loss:.3e}",
                      **{k: f"{v:.5f}" if isinstance(v, float) else v for k, v in logs.items()},
                      "lr": f"{learning_rate(cfg, self.step - 1):.1e}"})
            if self.step % cfg.log.every_steps == 0 or self.step == tc.total_steps:
                dt = time.time() - t_last
                finite_losses = [x for x in losses_since if math.isfinite(x)]
                rec = {"step": self.step, "nimg": nimg,
                       "loss": float(np.mean(finite_losses)) if finite_losses else float("nan"),
                       **logs, "lr": learning_rate(cfg, self.step - 1),
                       "img_per_s": (self.step - n_last) * gb / max(dt, 1e-9),
                       **parallel.device_memory(self.device)}
                scale = self.backend.current_loss_scale()
                if scale is not None:
                    rec["loss_scale"] = scale
                bad: dict = {}
                for loader in self.loaders:
                    for k, v in loader.bad_input_counts.items():
                        bad[k] = bad.get(k, 0) + v
                rec.update({f"data/{k}": v for k, v in dist.sum_counts(bad).items()})
                log.scalars(rec, self.step)
                t_last, n_last, losses_since = time.time(), self.step, []
            every = cfg.checkpoint.every_images
            if every and nimg // every != (nimg - gb) // every and self.step < tc.total_steps:
                self.save("periodic")
            se = cfg.log.sample_every_images
            if se and nimg // se != (nimg - gb) // se:
                self.write_samples(log)
            ev = cfg.eval.every_images
            if ev and nimg // ev != (nimg - gb) // ev and self.step < tc.total_steps:
                self.evaluate(log)
            if dist.should_stop() and self.step < tc.total_steps:  # else: finish normally
                self.save("preempted")
                dist.print0(f"stop signal: checkpointed at step {self.step}; "
                            f"exit {dist.EXIT_REQUEUE} (requeue)")
                return dist.EXIT_REQUEUE
        self.save("final")
        self.write_samples(log)
        if self.evaluator is not None:
            self.evaluate(log)
        if tc.compile:
            stats = torch._dynamo.utils.counters["stats"]
            dist.print0(f"train.compile ({tc.compile_backend}): {stats['unique_graphs']} graphs "
                        f"compiled, {sum(torch._dynamo.utils.counters['graph_break'].values())} "
                        f"graph breaks")
        return 0

    def evaluate(self, log: Logger) -> dict:
        """FID of ``eval.ema`` with every ``eval.samplers`` setting (all ranks), logged; the
        checkpoint of this step (written first if there is none) becomes ``best.json``'s when
        its first setting's FID is the lowest so far. Collective."""
        cfg = self.cfg
        if self.saved_step != self.step:
            self.save("eval")
        which = cfg.eval.ema or cfg.sample.ema
        net = self.eval_net(which, compiled=cfg.train.compile)
        res = self.evaluator(net)
        nimg = self.step * cfg.train.global_batch
        log.scalars({"step": self.step, "nimg": nimg, **res}, self.step)
        if dist.is_main():
            key = f"fid/{self.evaluator.primary}"
            value, best = res[key], read_best(self.run_dir)
            if math.isfinite(value) and (best is None or value < best["fid"]
                                         or best["nimg"] == nimg):
                path = checkpoint.checkpoint_path(self.run_dir, nimg)
                write_json(os.path.join(self.run_dir, BEST_FILE), {
                    "nimg": nimg, "step": self.step, "checkpoint": os.path.relpath(
                        path, self.run_dir), "metric": key, "fid": value,
                    "ema": which or (next(iter(self.emas)) if self.emas else "online"),
                    "all": {k: v for k, v in res.items() if k.startswith("fid/")}})
                dist.print0(f"best checkpoint so far: {path} ({key} {value:.4g})")
                # the previous best is now an ordinary checkpoint
                checkpoint.keep_last(self.run_dir, cfg.checkpoint.keep_last, protect=[nimg])
        dist.barrier()
        return res

    def eval_net(self, name: str = "", compiled: bool = False) -> torch.nn.Module:
        """A whole network for sampling: an EMA (gathered; collective), or online/target;
        ``compiled``: wrapped by torch.compile (for calling only)."""
        net = self._eval_net(name)
        return (parallel.compile_module(net, self.device, self.cfg.train.compile_backend) if compiled
                else net)

    def _eval_net(self, name: str) -> torch.nn.Module:
        name = network_name(name, self.cfg.ema.rates)
        if name == "target" and self.target is not None:
            return self.target.gather(self._blank_net())
        if name in ("online", "target"):  # without a separate target, it is the online net
            return self.backend.online_network()
        return self.emas[name].gather(self._blank_net())

    def _blank_net(self) -> torch.nn.Module:
        """A plain network (no grads) to write whole weights into (``build_net``'s)."""
        return self.backend.blank_network()

    def write_samples(self, log: Logger):
        net = self.eval_net(self.cfg.sample.ema, compiled=self.cfg.train.compile)
        if dist.is_main():
            grid = sample_grid(net, self.method, self.cfg, self.device)
            nimg = self.step * self.cfg.train.global_batch
            path = os.path.join(self.run_dir, "samples", f"grid-{nimg:012d}.png")
            save_png(grid.permute(1, 2, 0).numpy(), path, min_side=512)
            log.image("samples/onestep_multistep", grid, self.step)
            panels = ", ".join(f"{s} (NFE {s.nfe})" for s in self.method.preview())
            dist.print0(f"samples (left to right: {panels}): {path}")
        dist.barrier()


def training_loop(cfg: Config, run_dir: str) -> int:
    """Train (or resume) ``cfg`` in ``run_dir``; return the exit code."""
    try:
        return Trainer(cfg, run_dir).run()
    finally:
        # The outcome is decided (and saved): a late duplicate warning must not kill the
        # process while the interpreter shuts down and turn exit 75 into 128+N.
        for sig in dist.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        dist.shutdown()
