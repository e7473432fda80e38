"""Typed run configuration: dataclasses, loaded from YAML recipes, overridable by ``key=value``.

``load_config("configs/lsun_cat_ct.yaml", ["train.total_steps=100", "data.shards=x.tar"])``
returns a validated :class:`Config`. Unknown keys and bad values are errors that name the key,
raised before any work starts. The resolved config is written into the run directory.

Progress is counted in optimizer steps of the *global* batch (``train.global_batch``), so
lr, N(k) and mu(k) mean the same at any world size; images seen = steps x global batch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .ema import ema_name
from .sampler import Sampler


class ConfigError(ValueError):
    """A bad config key or value (the message names it)."""


@dataclass
class DataConfig:
    shards: str = "embedded:sklearn:digits"  # shard pattern/dir/pipe: URL, or embedded:<name>
    resolution: int = 16                     # image side the network sees
    # Image channels: 3 (RGB) or 1 (grey: the loader reduces each image to its luminance, as
    # PIL's convert("L"), and the UNet gets in_channels 1, written into net.overrides, so
    # samples, checkpoints and exports are grey too).
    channels: int = 3
    class_cond: bool = False                 # feed labels (data must carry them)
    num_workers: int = 1                     # DataLoader workers per rank
    random_flip: bool = True                 # horizontal flips (seeded per sample)
    bad_input: str = "skip"                  # convert | skip | raise (corrupt/odd images)
    allow_shard_change: bool = False         # resume although the shard list differs from the checkpoint's
    # Data streams the global batch is split into (0 = one per rank). Fix it (e.g. 8) and the
    # data order, noise and so the run are independent of the number of ranks dividing it.
    streams: int = 0


@dataclass
class NetConfig:
    preset: str = "tiny16"                   # cmscale.networks.unet.PRESETS name
    overrides: dict = field(default_factory=dict)  # UNet kwargs over the preset (e.g. dropout)
    kernels: str = "auto"                    # auto | triton | torch: fused attention/GroupNorm
                                             # and average updates (auto: Triton on CUDA)
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # sct/scd: the UNet's time input, log_sigma (EDM's 250 ln(sigma_d tan t): EDM teachers and
    # reference weights fit) or t (the paper's c_noise(t) = t, as 1000 t / (pi/2))
    time_input: str = "log_sigma"


@dataclass
class LossConfig:
    mode: str = "ct"                         # edm | cd | ct | ict | ect | sct | scd
    metric: str = "l2"                       # l2 | l1 | lpips | pseudo_huber
    huber_c: float = -1.0                    # pseudo_huber's c; < 0: iCT's 0.00054 sqrt(dim)
                                             # (ECT's CIFAR-10 uses 0: the plain L2 norm)
    lpips_weights: str = ""                  # local VGG16 file (else the torch hub cache)
    lpips_variant: str = "reference"         # reference (piq's: average pooling) | lpips (max)
    # CT curriculum (reference "progressive" N, "adaptive" target EMA)
    start_scales: int = 2                    # s0
    end_scales: int = 150                    # s1
    start_ema: float = 0.95                  # mu0
    # CD: fixed N and target EMA; teacher checkpoint (ours or a reference .pt)
    num_scales: int = 40
    target_ema: float = 0.95
    teacher: str = ""                        # teacher weights file or diffusers folder (cd,
                                             # scd; ect: the EDM denoiser the student starts from)
    teacher_preset: str = ""                 # UNet preset of the teacher (default: net.preset)
    teacher_dropout: float = 0.0             # reference EDM teachers use 0.1
    teacher_overrides: dict = field(default_factory=dict)  # UNet kwargs of the teacher over
                                             # net.overrides (e.g. its noise_label_scale)
    solver: str = "heun"                     # heun | euler (cd)
    init_from_teacher: bool = False          # cd/ct/ict/sct/scd: start the student (target, EMAs)
                                             # from loss.teacher's weights, as the reference
                                             # does whenever it is given a teacher
    # iCT
    ict_s0: int = 10
    ict_s1: int = 1280
    p_mean: float = -1.1                     # iCT and ECT: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 2.0
    # ECT: pairs (t, r) with r from the mapping function; the gap t - r shrinks in stages
    ect_stage_steps: int = 25000             # d: optimizer steps per stage (CIFAR-10: 25k
                                             # steps of batch 128)
    ect_q: float = 2.0                       # the gap is divided by q at each new stage
    ect_k: float = 8.0                       # n(t) = 1 + k sigmoid(-b t) (k = 0: constant)
    ect_b: float = 1.0
    ect_weighting: str = "inverse_gap"       # inverse_gap: 1/(t - r) | karras: 1/t^2 + 1/sd^2
    # sCT / sCD (TrigFlow, continuous time); defaults: the paper's ImageNet 64 values
    scm_p_mean: float = -0.8                 # training times tan t = exp(tau) / sigma_data,
    scm_p_std: float = 1.6                   # tau ~ N(scm_p_mean, scm_p_std^2)
    tangent_warmup: int = 10000              # H: tangent warm-up r = min(1, step / H); 0 = off
    tangent_norm: float = 0.1                # c: tangent normalised as g / (||g|| + c)
    tangent_norm_over: str = "all"           # ||g||: all = over every entry | rms: RMS per entry
    prior_weight: bool = False               # also weight the loss by 1 / (sigma_d tan t)
    adaptive_weight: bool = True             # learned log-weight w(t): exp(-w) loss + w


@dataclass
class OptimConfig:
    name: str = "radam"                      # radam | adam | adamw
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0                    # linear lr warm-up
    grad_clip: float = 0.0                   # 0 = off


@dataclass
class TrainConfig:
    total_steps: int = 1000                  # K, optimizer steps of the global batch
    global_batch: int = 32                   # images per optimizer step, all ranks together
    micro_batch: int = 0                     # images per rank per forward (0 = global/world)
    precision: str = "fp32"                  # fp32 | bf16 | fp16 (fp16: dynamic loss scaling) |
                                             # auto (bf16 where the device has it natively)
    initial_loss_scale: float = 2.0**20      # fp16 only, as the reference
    max_nonfinite_steps: int = 20            # consecutive skipped steps before stopping
    backend: str = "ddp"                     # ddp | deepspeed
    compile: bool = False                    # torch.compile the network's forward (training,
                                             # samples, FID); pays off on GPUs
    compile_backend: str = "inductor"        # torch.compile backend: inductor (code generation)
                                             # | aot_eager | eager (capture only: debugging)
    zero_stage: int = 0                      # deepspeed ZeRO stage 1/2/3
    seed: int = 0
    dist_timeout_s: float = 600.0            # a collective waiting longer for a rank (lost node) fails the job
                                             # (must exceed the slowest checkpoint write or evaluation)


@dataclass
class EMAConfig:
    rates: list = field(default_factory=lambda: [0.9999])  # evaluation EMAs (not the target)


@dataclass
class CheckpointConfig:
    every_images: int = 0                    # 0 = only at the end and on preemption
    keep_last: int = 3


@dataclass
class LogConfig:
    every_steps: int = 50                    # one-line summary + JSONL + TensorBoard scalars
    sample_every_images: int = 0             # sample grid to TensorBoard/PNG (0 = at the end)
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class SampleConfig:
    ema: str = ""                            # which average to sample ("" = first EMA)
    ts: list = field(default_factory=lambda: [0, 20, 39])  # two-step setting, reference form
    steps: int = 40
    trig_times: list = field(default_factory=lambda: [1.1])  # sct/scd: TrigFlow times after
                                             # pi/2 of the multistep sampler (paper: 1.1)
    num_grid: int = 64
    seed: int = 0


@dataclass
class EvalConfig:
    every_images: int = 0                    # FID every this many images and at the end (0 = off)
    ema: str = ""                            # which average ("" = sample.ema, else the first EMA)
    samplers: list = field(default_factory=list)  # [] = onestep + ts=sample.ts/sample.steps
    num_images: int = 1000                   # generated images per FID (the paper: 50000)
    extractor: str = "inception"             # inception | digits (offline, embedded digits)
    inception: str = ""                      # local inception-2015-12-05.pt (else the cache)
    ref: str = ""                            # reference statistics (cmscale ref-stats); "" for
                                             # embedded data: made from the dataset and cached
    batch_size: int = 64
    seed: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` to the field's type, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(typ) or typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(float(value))
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [
                    yaml.safe_load(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return origin(value)
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


# Keys that older versions wrote, unset, into a run directory's config.yaml: ignored when
# read with that empty value, so that those runs still export, sample and evaluate.
RETIRED = frozenset({"train.inject_nan_at"})


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = prefix + name
        if key in RETIRED and value in ([], None):
            continue
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; known: {sorted(names)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _set_dotted(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` override. ``section.field.K=V`` on a dict field
    (``net.overrides``, ``loss.teacher_overrides``: UNet kwargs) sets one entry, its value
    read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    entries = getattr(getattr(cfg, parts[0], None), parts[1], None) if len(parts) == 3 else None
    if isinstance(entries, dict):
        setattr(getattr(cfg, parts[0]), parts[1], {**entries, parts[2]: yaml.safe_load(raw)})
        return
    nested: dict = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = raw
    _apply(cfg, nested)


CHOICES = {
    "loss.mode": ("edm", "cd", "ct", "ict", "ect", "sct", "scd"),
    "loss.metric": ("l2", "l1", "lpips", "pseudo_huber"),
    "loss.solver": ("heun", "euler"),
    "loss.ect_weighting": ("inverse_gap", "karras"),
    "loss.lpips_variant": ("reference", "lpips"),
    "loss.tangent_norm_over": ("all", "rms"),
    "net.time_input": ("log_sigma", "t"),
    "optim.name": ("radam", "adam", "adamw"),
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "net.kernels": ("auto", "triton", "torch"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "train.backend": ("ddp", "deepspeed"),
    "data.bad_input": ("convert", "skip", "raise"),
    "eval.extractor": ("inception", "digits"),
}


def _net_channels(cfg: Config) -> None:
    """The UNet's image channels follow data.channels: a grey run writes in_channels 1 into
    net.overrides (what builds the network, its teacher and its exports); an explicit
    in_channels or out_channels that disagrees is an error."""
    ov = cfg.net.overrides
    for key in ("in_channels", "out_channels"):
        if ov.get(key) is not None and ov[key] != cfg.data.channels:
            raise ConfigError(f"net.overrides.{key}={ov[key]!r}: the data has "
                              f"data.channels={cfg.data.channels}; set data.channels instead")
    if cfg.data.channels != 3 and "in_channels" not in ov:
        cfg.net.overrides = {**ov, "in_channels": cfg.data.channels}


def validate(cfg: Config) -> Config:
    """Check values that types alone do not; raise ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {list(allowed)}")
    checks = [
        ("train.total_steps", cfg.train.total_steps > 0, "must be > 0"),
        ("train.global_batch", cfg.train.global_batch > 0, "must be > 0"),
        ("train.micro_batch", cfg.train.micro_batch >= 0, "must be >= 0"),
        ("train.zero_stage", cfg.train.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps > 0, "must be > 0"),
        ("train.dist_timeout_s", cfg.train.dist_timeout_s > 0, "must be > 0"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("data.resolution", cfg.data.resolution > 0, "must be > 0"),
        ("data.channels", cfg.data.channels in (1, 3), "must be 1 or 3 (grey or RGB)"),
        ("data.num_workers", cfg.data.num_workers >= 0, "must be >= 0"),
        ("data.streams", cfg.data.streams >= 0, "must be >= 0"),
        ("net.sigma_min", 0 < cfg.net.sigma_min < cfg.net.sigma_max, "need 0 < min < max"),
        ("loss.start_scales", cfg.loss.start_scales >= 1, "must be >= 1"),
        ("loss.end_scales", cfg.loss.end_scales >= cfg.loss.start_scales, "must be >= s0"),
        ("loss.start_ema", 0 < cfg.loss.start_ema < 1, "must be in (0, 1)"),
        ("loss.target_ema", 0 <= cfg.loss.target_ema < 1, "must be in [0, 1)"),
        ("loss.num_scales", cfg.loss.num_scales >= 2, "must be >= 2"),
        ("loss.huber_c", cfg.loss.huber_c < 0 or cfg.loss.metric == "pseudo_huber",
         "is pseudo-Huber's constant: set loss.metric=pseudo_huber too"),
        ("loss.ect_stage_steps", cfg.loss.ect_stage_steps >= 1, "must be >= 1"),
        ("loss.ect_q", cfg.loss.ect_q > 1, "must be > 1 (the gap shrinks by q per stage)"),
        ("loss.ect_k", cfg.loss.ect_k >= 0, "must be >= 0"),
        ("loss.ect_b", cfg.loss.ect_b >= 0, "must be >= 0"),
        ("loss.scm_p_std", cfg.loss.scm_p_std > 0, "must be > 0"),
        ("loss.tangent_warmup", cfg.loss.tangent_warmup >= 0, "must be >= 0"),
        ("loss.tangent_norm", cfg.loss.tangent_norm >= 0, "must be >= 0"),
        ("ema.rates", all(0 < float(r) < 1 for r in cfg.ema.rates), "each in (0, 1)"),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last >= 1, "must be >= 1"),
        ("checkpoint.every_images", cfg.checkpoint.every_images >= 0, "must be >= 0"),
        ("log.every_steps", cfg.log.every_steps > 0, "must be > 0"),
        ("sample.steps", cfg.sample.steps >= 2, "must be >= 2"),
        ("eval.every_images", cfg.eval.every_images >= 0, "must be >= 0"),
        ("eval.num_images", cfg.eval.num_images >= 2, "must be >= 2"),
        ("eval.batch_size", cfg.eval.batch_size > 0, "must be > 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}={getattr(getattr(cfg, section), name)!r}: {why}")
    _net_channels(cfg)
    if cfg.loss.mode in ("cd", "scd") and not cfg.loss.teacher:
        raise ConfigError(f"loss.teacher: {cfg.loss.mode} needs a teacher checkpoint "
                          f"(loss.teacher=PATH)")
    if cfg.loss.mode == "ect":
        if not cfg.loss.teacher:
            raise ConfigError("loss.teacher: ECT tunes a pretrained EDM denoiser; name its "
                              "weights file (loss.teacher=PATH, e.g. a cmscale export of an "
                              "edm run)")
        if cfg.loss.teacher_preset and cfg.loss.teacher_preset != cfg.net.preset:
            raise ConfigError(f"loss.teacher_preset={cfg.loss.teacher_preset!r}: the ECT "
                              f"student is the teacher's network, net.preset={cfg.net.preset!r}")
    if cfg.loss.init_from_teacher and (cfg.loss.mode == "edm" or not cfg.loss.teacher):
        raise ConfigError("loss.init_from_teacher: needs loss.teacher=PATH (the weights to "
                          "start from) and a consistency mode (cd, ct, ict, sct, scd)")
    differ = {k: v for k, v in cfg.loss.teacher_overrides.items()
              if cfg.net.overrides.get(k) != v}
    if differ and (cfg.loss.init_from_teacher or cfg.loss.mode == "ect"):
        raise ConfigError(f"loss.teacher_overrides={differ}: the student starts from the "
                          "teacher's weights (loss.init_from_teacher, or ECT), so it must be the "
                          "same network; set these in net.overrides instead")
    if (cfg.loss.mode in ("sct", "scd") and cfg.loss.init_from_teacher
            and cfg.net.time_input != "log_sigma"):
        raise ConfigError("net.time_input=t: an EDM teacher's weights expect log_sigma; "
                          "drop loss.init_from_teacher or keep net.time_input=log_sigma")
    times = [float(t) for t in cfg.sample.trig_times]
    if any(not 0 < t < math.pi / 2 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise ConfigError(f"sample.trig_times={cfg.sample.trig_times}: decreasing times in "
                          f"(0, pi/2)")
    if (cfg.loss.mode in ("sct", "scd") and cfg.train.backend == "deepspeed"
            and cfg.train.precision == "fp16"):
        raise ConfigError("train.precision=fp16: DeepSpeed's fp16 keeps the weights in fp16, so "
                          f"{cfg.loss.mode}'s JVP would run in fp16, whose range its tangent "
                          "leaves; use bf16, or train.backend=ddp (fp16 autocast: the JVP runs "
                          "in fp32)")
    if cfg.train.backend == "deepspeed" and cfg.train.zero_stage == 0:
        raise ConfigError("train.zero_stage: the deepspeed backend needs a ZeRO stage 1, 2 or 3")
    ts = [int(t) for t in cfg.sample.ts]
    if len(ts) < 2 or any(a >= b for a, b in zip(ts, ts[1:])) or ts[-1] >= cfg.sample.steps:
        raise ConfigError(f"sample.ts={cfg.sample.ts}: increasing indices below sample.steps")
    names = [ema_name(float(r)) for r in cfg.ema.rates] + ["online", "target"]
    for key, value in (("sample.ema", cfg.sample.ema), ("eval.ema", cfg.eval.ema)):
        if value and value not in names:
            raise ConfigError(f"{key}={value!r}: not an average of this run; choose one of "
                              f"{names} (ema.rates={list(cfg.ema.rates)})")
    if cfg.eval.every_images:
        for text in cfg.eval.samplers:
            try:
                Sampler.parse(text).check(cfg.loss.mode)
            except ValueError as e:
                raise ConfigError(f"eval.samplers: {e} (loss.mode={cfg.loss.mode!r})") from None
        if not cfg.eval.ref and not cfg.data.shards.startswith("embedded:"):
            raise ConfigError("eval.ref: periodic FID needs reference statistics for your data "
                              "(cmscale ref-stats SRC --out OUT.npz, then eval.ref=OUT.npz)")
    return cfg


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML recipe (or the defaults) and apply ``key=value`` overrides, then validate."""
    cfg = Config()
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _apply(cfg, data)
    for item in overrides:
        _set_dotted(cfg, item)
    return validate(cfg)


def dump_config(cfg: Config) -> str:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)
