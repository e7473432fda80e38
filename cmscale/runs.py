"""One way to turn a run (or a file) into a ready network: ``load_network(spec, which)``.

``spec`` is a run directory (its newest complete checkpoint), a checkpoint directory
``RUN/checkpoints/nimg-*``, an export of ``cmscale export`` (``.safetensors``/``.pt`` with its
``.json`` beside it), a public reference ``.pt`` (its UNet named by ``preset``) or a diffusers
folder (``unet/`` + ``scheduler/``, :mod:`cmscale.diffusers_format`: the UNet from its config,
the noise levels from its scheduler; a ``CMStochasticIterativeScheduler`` makes it a
consistency model, any other scheduler an EDM denoiser). ``which``
picks the network of a run: an EMA name (``ema_0_9999``) or rate (``0.9999``), ``online`` or
``target``; the default is the run's first EMA. Every network is built by
:func:`cmscale.methods.build_net` (the UNet inside its preconditioning) and files load with
:func:`cmscale.netfile.load_strict`.

A run's averages are sharded: under a process group each rank restores its shard and the
network is all-gathered (collective); as one process the whole average is read.
"""

from __future__ import annotations

import json
import os

import torch

from . import checkpoint, diffusers_format, dist, schedules
from .config import Config, load_config
from .ema import ShardedAverage, ema_name, frozen_copy
from .methods import METHODS, build_net
from .netfile import load_strict

# What ``info`` says about the loaded network (cmscale sample records these keys).
RECORD_KEYS = ("source", "path", "checkpoint", "network", "nimg", "preset", "mode",
               "sigma_min", "sigma_max", "rho")


def network_name(which: str, rates) -> str:
    """The network of a run named by ``which``: an EMA name or rate, 'online' or 'target';
    '' is the first EMA (or 'online' without EMAs)."""
    names = {ema_name(float(r)): float(r) for r in rates}
    if not which:
        return next(iter(names), "online")
    try:
        which = ema_name(float(which))
    except ValueError:
        pass
    if which not in names and which not in ("online", "target"):
        raise ValueError(f"unknown network {which!r}: choose 'online', 'target' or one of "
                         f"{list(names)}")
    return which


def _ready(net: torch.nn.Module, device) -> torch.nn.Module:
    net = net.eval().requires_grad_(False)
    return net if device is None else net.to(device)


def load_run(run_dir: str, which: str = "", ckpt: str | None = None, device=None):
    """(network, info) of a run: ``ckpt`` (default: the newest complete checkpoint).

    ``info`` holds :data:`RECORD_KEYS` plus ``config`` (the run's :class:`Config`),
    ``sigma_data`` and ``step``. Collective under a process group."""
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    which = network_name(which, cfg.ema.rates)
    rates = {ema_name(float(r)): float(r) for r in cfg.ema.rates}
    net = build_net(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {"model": checkpoint.ModelOptimizer(net)}
    avg = None
    if which == "target":
        if not METHODS[cfg.loss.mode].needs_target:
            raise ValueError(f"mode {cfg.loss.mode!r} has no separate target network")
        avg = ShardedAverage(net, 0.0, rank, world)
        state["target"] = checkpoint.FlatShard(avg.local, avg.numel)
    elif which != "online":
        avg = ShardedAverage(net, rates[which], rank, world)
        state["ema"] = {which: checkpoint.FlatShard(avg.local, avg.numel)}
    if ckpt:
        meta = checkpoint.load(ckpt, state)
    else:
        meta = checkpoint.load_latest(run_dir, state)
        if meta is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_dir}/checkpoints")
    if avg is not None:
        net = avg.gather(frozen_copy(net))
    info = dict(source="checkpoint" if ckpt else "run", path=os.path.abspath(run_dir),
                checkpoint=ckpt, network=which, nimg=meta.get("nimg"), preset=cfg.net.preset,
                mode=cfg.loss.mode, sigma_min=cfg.net.sigma_min, sigma_max=cfg.net.sigma_max,
                rho=cfg.net.rho, sigma_data=cfg.net.sigma_data, step=meta.get("step"),
                config=cfg)
    return _ready(net, device), info


def _run_of(path: str) -> tuple[str, str | None]:
    """(run dir, checkpoint dir or None) of a run or checkpoint directory."""
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return path, None
    parent = os.path.dirname(os.path.dirname(path))
    if (os.path.basename(os.path.dirname(path)) == "checkpoints"
            and os.path.isfile(os.path.join(parent, "config.yaml"))):
        return parent, path
    raise FileNotFoundError(f"{path}: neither a run directory (config.yaml) nor a checkpoint "
                            f"directory RUN/checkpoints/nimg-*")


def load_network(spec: str, which: str = "", preset: str | None = None,
                 mode: str | None = None, overrides: dict | None = None, device=None):
    """(network, info) for a run dir, a checkpoint dir, an export or a reference ``.pt``.

    The network is preconditioned (``EDMPrecond`` for ``edm``, else ``ConsistencyPrecond``),
    in eval mode without gradients, on ``device`` (default: the CPU). ``mode`` ('cm' or
    'edm') says what a reference file is; ``overrides`` are UNet kwargs over the preset."""
    spec = os.path.normpath(spec)
    if diffusers_format.is_folder(spec):
        return _load_folder(spec, mode, device)
    if os.path.isdir(spec):
        run_dir, ckpt = _run_of(spec)
        return load_run(run_dir, which, ckpt, device)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"checkpoint not found: {spec}")
    side = spec + ".json"
    if os.path.isfile(side):  # one of our exports
        with open(side) as f:
            exp = json.load(f)["export"]
        if preset and preset != exp["preset"]:
            raise ValueError(f"{spec} is an export of preset {exp['preset']!r}, not {preset!r}")
        info = dict(source="export", path=os.path.abspath(spec), network=exp.get("network"),
                    nimg=exp.get("nimg"), preset=exp["preset"], mode=mode or exp.get("mode", "ct"),
                    sigma_min=exp.get("sigma_min", schedules.SIGMA_MIN),
                    sigma_max=exp.get("sigma_max", schedules.SIGMA_MAX),
                    rho=exp.get("rho", schedules.RHO), sigma_data=exp.get("sigma_data", 0.5),
                    step=exp.get("step"), config=None,
                    time_input=exp.get("time_input", "log_sigma"))
        net_kw = dict(exp.get("net_overrides") or {}, **(overrides or {}))
    else:  # a public reference checkpoint: a plain state dict, its preset named by the user
        if not preset:
            raise ValueError(f"{spec} has no {os.path.basename(side)} beside it: name its UNet "
                             f"with --preset (e.g. lsun256, imagenet64)")
        info = dict(source="reference", path=os.path.abspath(spec), network=None, nimg=None,
                    preset=preset, mode=mode or "cm", sigma_min=schedules.SIGMA_MIN,
                    sigma_max=schedules.SIGMA_MAX, rho=schedules.RHO, sigma_data=0.5,
                    step=None, config=None)
        net_kw = dict(overrides or {})
    net = build_net(_net_config(info, net_kw))
    load_strict(net.model, spec, info["preset"], what="checkpoint")
    return _ready(net, device), info


def _load_folder(path: str, mode: str | None, device):
    """(network, info) of a diffusers folder."""
    kw, _, sched = diffusers_format.read_folder(path)
    if not mode:
        mode = "cm" if sched.get("_class_name") == diffusers_format.CM_SCHEDULER else "edm"
    info = dict(source="diffusers", path=os.path.abspath(path), network=None, nimg=None,
                preset="", mode=mode, sigma_min=sched.get("sigma_min", schedules.SIGMA_MIN),
                sigma_max=sched.get("sigma_max", schedules.SIGMA_MAX),
                rho=sched.get("rho", schedules.RHO), sigma_data=sched.get("sigma_data", 0.5),
                step=None, config=None)
    net = build_net(_net_config(info, kw))
    load_strict(net.model, path, "(diffusers folder)", what="checkpoint")
    return _ready(net, device), info


def _net_config(info: dict, overrides: dict) -> Config:
    """A config that builds the network ``info`` describes: a file's mode names its method
    (an EDM denoiser, or a consistency model of any method, built as CT's)."""
    cfg = Config()
    nc = cfg.net
    nc.preset, nc.overrides = info["preset"], overrides
    nc.sigma_data, nc.sigma_min, nc.sigma_max = (info["sigma_data"], info["sigma_min"],
                                                 info["sigma_max"])
    cfg.loss.mode = info["mode"] if info["mode"] in METHODS else "ct"
    nc.time_input = info.get("time_input", "log_sigma")  # TrigFlow networks (sct, scd)
    return cfg
