"""Data-parallel backends: DDP (with fp16's dynamic loss scale), or a DeepSpeed ZeRO engine.

``build_backend`` returns a ``DDPBackend`` or ``DeepSpeedBackend`` with one interface (see
``_Backend``): the micro-batch context (no_sync / accumulation boundary), backward, the
optimizer step (applied, or skipped on a non-finite gradient norm on every rank alike), the
full fp32 parameters for the target and EMA updates, and the backend's checkpoint entries.
``net`` stays the plain preconditioned module (averages, checkpoints, export);
``backend.wrapped`` is what the forward pass goes through. What each ZeRO stage shards,
precision, checkpoints per backend and world-size changes: ``docs/backends.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import shutil
import warnings
from typing import Any

import torch
from torch import nn

from . import dist, kernels
from .checkpoint import ModelOptimizer
from .ema import frozen_copy, update_average

__all__ = [
    "DDPBackend",
    "LossScale",
    "DeepSpeedBackend",
    "DeepSpeedFiles",
    "ModuleWeights",
    "build_backend",
    "check_resume",
    "compile_module",
    "compile_unavailable",
    "deepspeed_config",
    "full_parameters",
    "load_deepspeed",
    "native_bf16",
    "resolve_precision",
    "wrap_ddp",
    "wrap_deepspeed",
]

DS_TAG = "deepspeed"  # subdirectory of nimg-N/ that holds DeepSpeed's own files


# ----------------------------------------------------------------------------- DDP


def wrap_ddp(net: nn.Module, info: dist.DistInfo) -> nn.Module:
    """``net`` in DistributedDataParallel when there are several ranks, else ``net`` itself."""
    if info.world_size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    # No buffer broadcast before every forward: every rank builds identical buffers from the
    # same seed. torch >= 2.13 names the flag forward_sync_buffers (broadcast_buffers warns).
    import inspect

    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers")
    return DDP(net, device_ids=ids, **{flag: False})


# ----------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg, micro: int, accum: int, world: int, forward_mode: bool = False,
                     precision: str | None = None) -> dict:
    """DeepSpeed's config dict for ``cfg`` at ``micro`` images per rank per forward, ``accum``
    micro-batches per step and ``world`` ranks (``training_loop.batch_split`` gives them).
    ``precision``: the resolved ``train.precision`` (``resolve_precision``; default: as set).

    ``forward_mode``: the loss runs forward-mode AD (sCT/sCD's JVP). ZeRO-3 then keeps
    torch's ``F.linear``: its memory-efficient replacement (installed process-wide) is a
    custom autograd function without a forward-mode derivative."""
    tc = cfg.train
    precision = precision or tc.precision
    if precision == "auto":
        raise ValueError("deepspeed_config needs a resolved precision (resolve_precision)")
    ds: dict[str, Any] = {
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(tc.zero_stage),
                              **({"memory_efficient_linear": False} if forward_mode else {})},
        # our torch.optim instance: no DeepSpeed optimizer, so no fused_adam JIT build
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # the loop logs progress itself
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                "lower_precision_safe_modules": []}
    elif precision == "fp16":
        power = math.log2(tc.initial_loss_scale)
        if not power.is_integer():
            raise ValueError(f"train.initial_loss_scale={tc.initial_loss_scale}: DeepSpeed's "
                             f"dynamic loss scale starts at a power of two")
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": int(power),
                      # x2 after 1000 good steps: the reference's rate, in whole doublings
                      "hysteresis": 1, "loss_scale_window": 1000, "min_loss_scale": 1,
                      "auto_cast": True}
    return ds


def _ensure_process_group(info: dist.DistInfo) -> None:
    """DeepSpeed needs a process group even for one rank; a single process has none."""
    if dist.is_initialized():
        return
    import socket

    import torch.distributed as tdist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port)):
        os.environ.setdefault(key, str(value))
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                             world_size=1)


def wrap_deepspeed(net: nn.Module, opt: torch.optim.Optimizer, cfg, info: dist.DistInfo,
                   micro: int, accum: int, forward_mode: bool = False):
    """A DeepSpeed engine around ``net`` (the same module object) and ``opt`` (ours)."""
    precision = resolve_precision(cfg.train.precision, info.device)
    if precision == "fp16" and info.device.type != "cuda":
        raise ValueError(
            "train.precision=fp16 with train.backend=deepspeed needs a GPU: DeepSpeed's CPU "
            "accelerator has no fp16. Use train.precision=bf16 or fp32, or train.backend=ddp "
            "(its loss scale works on CPU).")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if info.device.type == "cuda" else "cpu")
    _ensure_process_group(info)
    import deepspeed

    # The loop prints what a run needs; keep DeepSpeed's warnings, not its config dump.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    ds_config = deepspeed_config(cfg, micro, accum, info.world_size, forward_mode, precision)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config)
    return engine


def _is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


class _Full:
    """Duck-types the two methods ``ema.update_average`` calls on a network."""

    def __init__(self, params: list, buffers: list):
        self._params, self._buffers = params, buffers

    def parameters(self):
        return iter(self._params)

    def buffers(self):
        return iter(self._buffers)


@contextlib.contextmanager
def full_parameters(engine):
    """Yield the network with full fp32 parameters, for reading only (collective).

    ZeRO-1/2 in fp32/bf16: the module. ZeRO-3: the module with all
    parameters gathered until the ``with`` ends (changes are discarded). fp16: an object whose
    ``parameters()`` are the assembled fp32 master weights and ``buffers()`` the module's."""
    net = engine.module
    if engine.fp16_enabled():
        from deepspeed.utils import safe_get_full_fp32_param

        yield _Full([safe_get_full_fp32_param(p) for p in net.parameters()], list(net.buffers()))
    elif _is_zero3(engine):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
            yield net
    else:
        yield net


# ----------------------------------------------------------------------------- checkpoints


class ModuleWeights:
    """Checkpoint entry ``model`` of a DeepSpeed run: the module's full fp32 weights.

    Same keys as ``checkpoint.ModelOptimizer(net)`` without optimizer, so ``export`` and
    ``cmscale.runs.load_run`` read it. Copies are taken because ZeRO-3 releases gathered storage.
    Saving only: on resume DeepSpeed's own files restore the module."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        net = self.engine.module
        with full_parameters(self.engine) as full:
            sd = net.state_dict()
            for (name, _), p in zip(net.named_parameters(), full.parameters()):
                sd[name] = p
            sd = {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                  for k, v in sd.items()}
        return {"model": sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("a DeepSpeed run restores its module with load_deepspeed()")


def _fsync_own_files(folder: str, rank: int) -> None:
    # Each rank flushes what it wrote (on a network file system only the writer's fsync
    # counts): zero_pp_rank_R_* by rank R, the rest (mp_rank_00_model_states.pt) by rank 0.
    mine = f"zero_pp_rank_{rank}_"
    for name in os.listdir(folder):
        if name.startswith(mine) or (rank == 0 and not name.startswith("zero_pp_rank_")):
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if rank == 0:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DeepSpeedFiles:
    """Checkpoint entry that writes DeepSpeed's own checkpoint into ``path/deepspeed/``.

    ``checkpoint.save`` calls ``state_dict()`` of every entry after it has prepared the (empty)
    ``nimg-N`` directory and before it writes the DCP files and the commit marker, so these
    files are inside the directory the marker commits. The DCP entry itself is just the tag.
    Saving only (collective); resume with ``load_deepspeed``."""

    def __init__(self, engine, path):
        self.engine, self.path = engine, str(path)

    def state_dict(self) -> dict[str, Any]:
        self.engine.save_checkpoint(self.path, tag=DS_TAG, save_latest=False)
        dist.barrier()  # every rank's file exists before anyone flushes or moves on
        _fsync_own_files(os.path.join(self.path, DS_TAG), dist.get_rank())
        return {"tag": DS_TAG, "zero_stage": self.engine.zero_optimization_stage()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise RuntimeError("resume a DeepSpeed run with load_deepspeed()")


def load_deepspeed(engine, path) -> None:
    """Restore module, optimizer partitions, loss scale and counters from ``path/deepspeed``."""
    folder = os.path.join(str(path), DS_TAG)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} has no DeepSpeed files ({DS_TAG}/); was it written "
                                f"by the ddp backend?")
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=True,
                                       load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load its checkpoint from {folder}")


def check_resume(cfg, meta: dict, world: int) -> None:
    """Raise ValueError if the checkpoint with marker ``meta`` cannot be resumed by this run."""
    saved_backend = meta.get("backend", "ddp")
    saved_stage = int(meta.get("zero_stage", 0))
    backend, stage = cfg.train.backend, int(cfg.train.zero_stage)
    where = f"checkpoint nimg-{int(meta['nimg']):012d}"
    if saved_backend != backend:
        raise ValueError(f"{where} was written by train.backend={saved_backend}; this run "
                         f"uses {backend}. Resume with train.backend={saved_backend} (the "
                         f"optimizer states are stored differently).")
    if backend != "deepspeed":
        return
    saved_world = int(meta.get("world_size", world))
    if saved_stage != stage:
        raise ValueError(f"{where} was written with ZeRO stage {saved_stage}; this run uses "
                         f"train.zero_stage={stage}. Resume with the saved stage.")
    if saved_world != world:
        raise ValueError(
            f"{where} was written by {saved_world} ranks with DeepSpeed ZeRO-{stage}; this run "
            f"has {world}. DeepSpeed's per-rank optimizer files load only at the world size "
            f"that wrote them (other sizes need DeepSpeed's universal checkpoint conversion, "
            f"deepspeed.checkpoint.ds_to_universal, which cmscale does not wire up). Resume "
            f"with {saved_world} ranks.")


# ----------------------------------------------------------------------------- backends


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it (Ampere and
    later), or a CPU whose oneDNN has bf16 kernels (AVX-512 BF16 / AMX). Elsewhere bf16
    convolutions fall back to aten's slow reference loops, many times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


_WARNED: set[str] = set()  # reasons already warned about in this process


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` with ``auto`` resolved for ``device``: bf16 where it is native
    (``native_bf16``), fp32 otherwise. An explicit bf16 on a CPU without native bf16 is kept,
    with one warning per process saying why it will be slow."""
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        if "bf16-cpu" not in _WARNED:
            _WARNED.add("bf16-cpu")
            warnings.warn(
                f"train.precision=bf16 on a CPU without native bf16 (capability "
                f"{torch.backends.cpu.get_cpu_capability()}; oneDNN has no bf16 kernels here): "
                f"bf16 convolutions fall back to aten's slow loops and a step can take 10-30x "
                f"as long as in fp32. Use train.precision=auto or fp32.", stacklevel=2)
    return precision


def compile_unavailable(device: torch.device, backend: str = "inductor") -> str | None:
    """Why ``torch.compile(backend=backend)`` cannot run on ``device`` here, or None when it
    can (only inductor generates code: the others need dynamo alone)."""
    device = torch.device(device)
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    if backend != "inductor":
        return None
    if device.type == "cpu" and not any(shutil.which(c) for c in
                                        (os.environ.get("CXX", ""), "g++", "clang++") if c):
        return "inductor's CPU backend needs a C++ compiler (g++ or clang++; none on PATH)"
    if device.type == "cuda" and not kernels.triton_available():  # inductor's GPU code generator
        return "inductor's GPU backend needs triton, which is not installed"
    return None


def compile_module(module, device: torch.device, backend: str = "inductor"):
    """``torch.compile(module)`` (a module or function), or ``module`` itself with one warning
    per process where compilation is unavailable (``compile_unavailable``).

    Shapes are specialised at first and made dynamic on the first change (torch.compile's
    default), so a new batch size costs one recompile, not one per size. The compiled wrapper
    is only for calling: checkpoints, averages and exports keep using the plain module."""
    return torch.compile(module, backend=backend) if _can_compile(device, backend) else module


def _can_compile(device: torch.device, backend: str = "inductor") -> bool:
    reason = compile_unavailable(device, backend)
    if reason is not None and "compile" not in _WARNED:
        _WARNED.add("compile")
        warnings.warn(f"train.compile: {reason}; running eagerly", stacklevel=3)
    return reason is None


def autocast(precision: str, device: torch.device):
    """The forward pass's autocast for ``train.precision`` (none for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def device_memory(device: torch.device) -> dict[str, float]:
    """This process's memory in GiB for the log: on CUDA allocated now and the peak since the
    start (``memory/allocated_gib``, ``memory/peak_gib``); elsewhere the peak resident set."""
    if device.type == "cuda":
        return {"memory/allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "memory/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"memory/peak_rss_gib": peak * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20}


def _poisoned(loss: torch.Tensor) -> torch.Tensor:
    # A step is skipped on a non-finite gradient norm: make a non-finite loss reach that
    # check (x1 otherwise: exact, no host sync).
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


class _Backend:
    """What the loop asks of a backend; ``wrapped`` is what the forward goes through.

    A step: ``set_lr``; per micro-batch ``with micro_batch(m, num):`` around both the forward
    (under ``autocast()``) and ``backward(loss)`` (DDP decides at the forward whether the
    backward all-reduces); then ``step()``, True when the update was applied (False:
    non-finite gradients, nothing changed); gradients are cleared either way; then the target
    and EMAs read ``full_parameters()``. ``stop_gradient_network(forward_mode)`` is the online
    weights as a plain module for a method whose target is the online network (iCT, sCT;
    ``forward_mode``: the loss runs a JVP through it). ``blank_network()`` and
    ``online_network()`` give whole plain networks for sampling. Checkpoints: ``state(loading)`` gives this backend's
    DCP entries, ``files(path)`` the entries that write files of their own, ``meta()`` what
    the commit marker records, ``restore(state, path)`` finishes a resume.
    """

    def __init__(self, opt: torch.optim.Optimizer, cfg, info: dist.DistInfo):
        self.opt, self.device = opt, info.device
        self.precision = resolve_precision(cfg.train.precision, info.device)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:  # DeepSpeed's ZeRO optimizers step these same groups
            g["lr"] = lr

    def autocast(self):
        return autocast(self.precision, self.device)

    def files(self, path) -> dict:
        return {}

    def meta(self) -> dict:
        return {}

    def current_loss_scale(self) -> float | None:
        """The dynamic fp16 loss scale (None without one)."""
        return None


class LossScale:
    """fp16's dynamic loss scale, the reference's rule: ``scale = 2 ** log2_scale``, and
    log2_scale grows by ``growth`` (1e-3: x2 per 1000 steps) after every applied step and
    falls by 1 (the scale halves) when the gradients overflow, which skips the step.

    torch's GradScaler instead doubles after 2000 overflow-free steps in a row. The state is
    the float ``log2_scale`` itself, saved exactly, so a resumed run scales as the uninterrupted
    one would."""

    def __init__(self, initial_scale: float, growth: float = 1e-3):
        self.log2_scale, self.growth = math.log2(initial_scale), growth

    @property
    def scale(self) -> float:
        return 2.0**self.log2_scale

    def update(self, applied: bool) -> None:
        self.log2_scale += self.growth if applied else -1.0

    def state(self) -> dict:
        return {"log2_scale": torch.tensor(self.log2_scale, dtype=torch.float64)}

    def load(self, state: dict) -> None:
        if "log2_scale" in state:
            self.log2_scale = float(state["log2_scale"])
        else:  # a checkpoint from before (GradScaler): only its scale was saved
            self.log2_scale = math.log2(float(state["scale"]))


class DDPBackend(_Backend):
    """DDP (the plain module in one process); with fp16 a :class:`LossScale` that multiplies
    the loss, divides the gradients back, and is halved, with the step skipped, on
    non-finite gradients."""

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer, cfg, info: dist.DistInfo):
        super().__init__(opt, cfg, info)
        self.net, self.grad_clip = net, cfg.optim.grad_clip
        self.loss_scale = (LossScale(cfg.train.initial_loss_scale)
                           if self.precision == "fp16" else None)
        self.ddp = wrap_ddp(net, info)
        # compiled around DDP (DDP's graph splitting at bucket boundaries), never stored
        self.wrapped = (compile_module(self.ddp, info.device, cfg.train.compile_backend)
                        if cfg.train.compile
                        else self.ddp)

    def micro_batch(self, m: int, num: int):
        # gradients are all-reduced in the backward of the last micro-batch only
        if m < num - 1 and self.ddp is not self.net:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = _poisoned(loss)
        (loss * self.loss_scale.scale if self.loss_scale is not None else loss).backward()

    def step(self) -> bool:
        params = [p for p in self.net.parameters() if p.grad is not None]
        if self.loss_scale is not None:
            torch._foreach_mul_([p.grad for p in params], 1.0 / self.loss_scale.scale)
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # Gradients are identical on all ranks after DDP's all-reduce, so every rank reaches
        # the same verdict without another collective.
        applied = bool(torch.isfinite(norm))
        if applied:
            self.opt.step()
        if self.loss_scale is not None:
            self.loss_scale.update(applied)
        self.opt.zero_grad(set_to_none=True)
        return applied

    def full_parameters(self):
        return contextlib.nullcontext(self.net)

    def current_loss_scale(self) -> float | None:
        return None if self.loss_scale is None else float(self.loss_scale.scale)

    def stop_gradient_network(self, forward_mode: bool = False) -> nn.Module:
        """The online weights as a plain module, for a target pass under no_grad."""
        return self.net

    def blank_network(self) -> nn.Module:
        """A plain network (no grads) to write whole weights into."""
        return frozen_copy(self.net)

    def online_network(self) -> nn.Module:
        """The online network, whole, for sampling."""
        return self.net

    def state(self, loading: bool = False) -> dict:
        s: dict[str, Any] = {"model": ModelOptimizer(self.net, self.opt)}
        if self.loss_scale is not None:
            s["scaler"] = self.loss_scale.state()
        return s

    def meta(self) -> dict:
        return {"loss_scale": "log2"} if self.loss_scale is not None else {}

    def restore(self, state: dict, path) -> None:
        if self.loss_scale is not None:
            self.loss_scale.load(state["scaler"])


class DeepSpeedBackend(_Backend):
    """A DeepSpeed ZeRO engine: it scales fp16 losses, reduces, clips and skips non-finite
    steps itself; the target and EMAs read the full fp32 weights of ``full_parameters``.

    ``build_net``: a fresh plain network, for whole copies of the weights (not a copy of the
    engine's module: its storage and hooks belong to the engine)."""

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer, cfg, info: dist.DistInfo,
                 micro: int, accum: int, build_net, forward_mode: bool = False):
        super().__init__(opt, cfg, info)
        self.engine = wrap_deepspeed(net, opt, cfg, info, micro, accum, forward_mode)
        self.wrapped, self.build_net = self.engine, build_net
        if cfg.train.compile and _can_compile(info.device, cfg.train.compile_backend):
            # DeepSpeed compiles its module in place (nn.Module.compile): same parameter names
            self.engine.compile(backend=cfg.train.compile_backend)
        self.zero_stage = cfg.train.zero_stage
        self._whole = None  # ZeRO-3: the whole copy for forward-mode targets

    def micro_batch(self, m: int, num: int):
        # DeepSpeed's no_sync: reduce (and step) only after the last micro-batch
        self.engine.set_gradient_accumulation_boundary(m == num - 1)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(_poisoned(loss), scale_wrt_gas=False)  # already / accumulation

    def step(self) -> bool:
        self.engine.step()  # clipping, non-finite check, zeroing the gradients
        # DeepSpeed all-reduces the gradient norm it skips on: every rank has the same verdict.
        return self.engine.was_step_applied()

    def full_parameters(self):
        return full_parameters(self.engine)

    def current_loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        opt = self.engine.optimizer  # FP16 and ZeRO optimizers name it differently
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return None if scale is None else float(scale)
    def stop_gradient_network(self, forward_mode: bool = False) -> nn.Module:
        """The online weights as a plain module, for a target pass under no_grad (collective
        under ZeRO-3 with ``forward_mode``).

        ZeRO-3's module gathers its partitioned weights in hooks built on custom autograd
        functions, which have no forward-mode derivative: for a JVP (sCT/sCD) the weights are
        gathered once per step into a whole copy (one model's memory) instead."""
        if not (forward_mode and _is_zero3(self.engine)):
            return self.engine.module
        if self._whole is None:
            self._whole = self.blank_network()
        with full_parameters(self.engine) as full:
            update_average(self._whole, full, 0.0)  # rate 0: a copy
        return self._whole

    def blank_network(self) -> nn.Module:
        return self.build_net().to(self.device).requires_grad_(False)

    def online_network(self) -> nn.Module:
        net = self.blank_network()
        with full_parameters(self.engine) as full:
            update_average(net, full, 0.0)  # rate 0: a copy
        return net

    def state(self, loading: bool = False) -> dict:
        # DeepSpeed's optimizer state is partitioned in its own layout: its own files hold it
        # (DeepSpeedFiles) and restore the module; DCP holds the module weights for readers.
        return {} if loading else {"model": ModuleWeights(self.engine)}

    def files(self, path) -> dict:
        return {"deepspeed": DeepSpeedFiles(self.engine, path)}

    def meta(self) -> dict:
        return {"zero_stage": self.zero_stage}

    def restore(self, state: dict, path) -> None:
        load_deepspeed(self.engine, path)


def build_backend(net: nn.Module, opt: torch.optim.Optimizer, cfg, info: dist.DistInfo,
                  micro: int, accum: int, build_net, forward_mode: bool = False):
    """The backend of ``train.backend`` around the plain module ``net`` and optimizer ``opt``
    (``forward_mode``: the loss runs a JVP through the online weights, see
    ``stop_gradient_network``)."""
    if cfg.train.backend == "deepspeed":
        return DeepSpeedBackend(net, opt, cfg, info, micro, accum, build_net, forward_mode)
    return DDPBackend(net, opt, cfg, info)
