"""The diffusers folder format, both ways: our ADM UNet <-> ``diffusers.UNet2DModel``.

A folder holds ``model_index.json``, ``unet/config.json`` with
``unet/diffusion_pytorch_model.safetensors`` and ``scheduler/scheduler_config.json``: the
layout ``DiffusionPipeline.save_pretrained`` writes and openai's published diffusers
consistency-model checkpoints use. A consistency model gets a ``CMStochasticIterativeScheduler``
(sigma_min, sigma_max, sigma_data, rho, and the Karras grid size of its multistep sampler as
``num_train_timesteps``) and loads with ``ConsistencyModelPipeline.from_pretrained(DIR)``.

Both networks compute the same function; only names and layouts differ. ``UNet2DModel`` is the
ADM UNet when its time input is the sinusoid [cos, sin] of ``250 ln(sigma)`` over the first
block's width (``flip_sin_to_cos``, ``freq_shift=0``), each level's blocks all do or all do not
attend, and the attention blocks share one head width. The consistency scheduler feeds it
exactly that time input and applies the same c_in, c_skip, c_out and the same clamped
multistep rule (Song et al. 2023, Algorithm 1) as :mod:`cmscale.sampling`.

What UNet2DModel cannot express is refused with a ValueError naming our option:
``noise_label_scale`` other than 1, ``learn_sigma``, ``channel_mult`` not starting at 1, or
``num_heads`` giving heads of different widths. An EDM denoiser is written with an
``EDMEulerScheduler`` config carrying its noise levels; diffusers' EDM schedulers feed the UNet
another time input (``0.25 ln sigma``), so such a folder serves cmscale (``loss.teacher``,
``cmscale sample``) and ``UNet2DModel.from_pretrained(DIR, subfolder="unet")``, not a
diffusers sampler as is.

Only json and safetensors are needed here; diffusers itself (the ``diffusers`` extra) is needed
to run the pipeline, not to write or read the folder.
"""

from __future__ import annotations

import inspect
import json
import os

import torch

from .atomic import write_json
from .networks.unet import PRESETS, UNet, convert_qkv_layout
from .weights import load_state_dict, save_state_dict

UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
CM_SCHEDULER = "CMStochasticIterativeScheduler"
EDM_SCHEDULER = "EDMEulerScheduler"
DIFFUSERS_VERSION = "0.42.1"  # the version the folders are tested with (setup.py's extra)

# UNet2DModel settings that are the ADM UNet's and nothing else.
FIXED = dict(center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True,
             freq_shift=0, mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1,
             downsample_padding=1, act_fn="silu", norm_eps=1e-5, add_attention=True,
             class_embed_type=None, time_embedding_dim=None)

# UNet2DModel's defaults (diffusers 0.42) for the settings read here: a config file may state
# only what differs.
DIFFUSERS_DEFAULTS = dict(
    FIXED, sample_size=None, in_channels=3, out_channels=3,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, downsample_type="conv",
    upsample_type="conv", dropout=0.0, attention_head_dim=8, norm_num_groups=32,
    attn_norm_num_groups=None, resnet_time_scale_shift="default", num_class_embeds=None)

# Sub-module names inside a residual block and an attention block, ours -> diffusers'.
RES_KEYS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
ATTN_KEYS = {"norm": "group_norm", "proj_out": "to_out.0"}


def is_folder(path: str) -> bool:
    """True if ``path`` is a diffusers folder (``unet/config.json`` inside)."""
    return os.path.isfile(os.path.join(path, UNET_DIR, "config.json"))


def unet_kwargs(preset: str | None, overrides: dict | None = None) -> dict:
    """Every keyword argument of :class:`UNet` for ``create_unet(preset, **overrides)``."""
    sig = inspect.signature(UNet.__init__).parameters
    kw = {k: p.default for k, p in sig.items() if p.default is not inspect.Parameter.empty}
    kw.update(PRESETS[preset] if preset else {})
    kw.update(overrides or {})
    return kw


def _levels(kw: dict) -> list[bool]:
    """Per level: does it attend (ADM's attention_resolutions as feature-map sides)."""
    size = kw["image_size"]
    resolutions = set(kw["attention_resolutions"])
    return [size // 2**i in resolutions for i in range(len(kw["channel_mult"]))]


def _head_dim(kw: dict) -> int:
    """The one attention head width of an ADM UNet, or a ValueError naming num_heads."""
    widths = [kw["model_channels"] * m for m, a in zip(kw["channel_mult"], _levels(kw)) if a]
    widths.append(kw["model_channels"] * kw["channel_mult"][-1])  # the middle block
    if kw["num_head_channels"] != -1:
        return int(kw["num_head_channels"])
    dims = {w // kw["num_heads"] for w in widths}
    if len(dims) != 1:
        raise ValueError(f"num_heads={kw['num_heads']} gives attention heads of widths "
                         f"{sorted(dims)}; diffusers' UNet2DModel has one attention_head_dim: "
                         f"use num_head_channels instead")
    return dims.pop()


def to_diffusers_config(kw: dict) -> dict:
    """UNet2DModel's config for an ADM UNet built with ``kw`` (see :func:`unet_kwargs`)."""
    if float(kw["noise_label_scale"]) != 1.0:
        raise ValueError(f"noise_label_scale={kw['noise_label_scale']}: diffusers' UNet2DModel "
                         f"embeds the scheduler's 250 ln(sigma) unscaled; only 1 can be exported")
    if kw.get("double_norm"):
        raise ValueError("double_norm=True: diffusers' ResnetBlock2D applies the scale and shift "
                         "as they come; it has no adaptive double normalisation")
    if kw["learn_sigma"]:
        raise ValueError("learn_sigma=True: diffusers' consistency pipeline reads every output "
                         "channel as the image")
    if kw["channel_mult"][0] != 1:
        raise ValueError(f"channel_mult={tuple(kw['channel_mult'])}: diffusers' UNet2DModel "
                         f"embeds time over the first block's width, ADM over model_channels; "
                         f"the first multiplier must be 1")
    head_dim = _head_dim(kw)
    attends, up = _levels(kw), "resnet" if kw["resblock_updown"] else "conv"
    plain_down = "ResnetDownsampleBlock2D" if kw["resblock_updown"] else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if kw["resblock_updown"] else "UpBlock2D"
    return dict(
        FIXED, _class_name="UNet2DModel", _diffusers_version=DIFFUSERS_VERSION,
        sample_size=kw["image_size"], in_channels=kw["in_channels"],
        out_channels=kw["out_channels"] or kw["in_channels"],
        block_out_channels=[kw["model_channels"] * m for m in kw["channel_mult"]],
        layers_per_block=kw["num_res_blocks"],
        down_block_types=["AttnDownBlock2D" if a else plain_down for a in attends],
        up_block_types=["AttnUpBlock2D" if a else plain_up for a in reversed(attends)],
        downsample_type=up, upsample_type=up, dropout=float(kw["dropout"]),
        attention_head_dim=head_dim, norm_num_groups=kw["norm_groups"],
        attn_norm_num_groups=kw["norm_groups"],
        resnet_time_scale_shift="scale_shift" if kw["use_scale_shift_norm"] else "default",
        num_class_embeds=kw["num_classes"], num_train_timesteps=None)


def from_diffusers_config(cfg: dict) -> dict:
    """Our UNet keyword arguments for a UNet2DModel config; ValueError naming the first
    setting of ``cfg`` that the ADM UNet does not have."""
    c = dict(DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")})
    for key, value in FIXED.items():
        if c.get(key) != value:
            raise ValueError(f"UNet2DModel {key}={c.get(key)!r}: the ADM UNet needs {value!r}")
    widths = list(c["block_out_channels"])
    down = [t[7:] if t.startswith("UNetRes") else t for t in c["down_block_types"]]
    up = [t[7:] if t.startswith("UNetRes") else t for t in c["up_block_types"]]
    attends = [t == "AttnDownBlock2D" for t in down]
    if [t == "AttnUpBlock2D" for t in up] != attends[::-1]:
        raise ValueError(f"down_block_types {down} and up_block_types {up} attend at different "
                         f"levels")
    kinds = set()
    for t in down + up:
        if t in ("AttnDownBlock2D", "AttnUpBlock2D"):
            kinds.add(c["downsample_type"] if "Down" in t else c["upsample_type"])
        elif t in ("DownBlock2D", "UpBlock2D"):
            kinds.add("conv")
        elif t in ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"):
            kinds.add("resnet")
        else:
            raise ValueError(f"UNet2DModel block type {t!r} has no ADM counterpart")
    if len(kinds) != 1 or not kinds <= {"conv", "resnet"}:
        raise ValueError(f"resampling {sorted(map(str, kinds))}: the ADM UNet resamples all "
                         f"levels one way (conv or resnet)")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    scale_shift = c["resnet_time_scale_shift"]
    if scale_shift not in ("default", "scale_shift"):
        raise ValueError(f"resnet_time_scale_shift={scale_shift!r} has no ADM counterpart")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]) or (
            c["attn_norm_num_groups"] is None and scale_shift == "scale_shift"):
        raise ValueError(f"attn_norm_num_groups={c['attn_norm_num_groups']!r}: the ADM UNet "
                         f"normalises attention like its residual blocks ({c['norm_num_groups']})")
    size = c["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    head = c["attention_head_dim"]
    return dict(
        image_size=int(size), in_channels=c["in_channels"], model_channels=widths[0],
        out_channels=c["out_channels"], num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(attends) if a),
        dropout=float(c["dropout"]), channel_mult=tuple(w // widths[0] for w in widths),
        num_classes=c["num_class_embeds"], num_heads=1,
        num_head_channels=-1 if head is None else int(head),
        use_scale_shift_norm=scale_shift == "scale_shift", resblock_updown=kinds == {"resnet"},
        norm_groups=c["norm_num_groups"])


def _prefixes(kw: dict) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every parametrised block of the UNet."""
    attends, last = _levels(kw), len(kw["channel_mult"]) - 1
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"),
             ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("label_emb", "class_embedding", "plain"),
             ("input_blocks.0.0", "conv_in", "plain"),
             ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain"),
             ("middle_block.0", "mid_block.resnets.0", "res"),
             ("middle_block.1", "mid_block.attentions.0", "attn"),
             ("middle_block.2", "mid_block.resnets.1", "res")]
    updown = "res" if kw["resblock_updown"] else "conv"
    k = 1
    for i, attn in enumerate(attends):
        for j in range(kw["num_res_blocks"]):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", "res"))
            if attn:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if i != last:
            ours = f"input_blocks.{k}.0" + ("" if updown == "res" else ".op")
            theirs = f"down_blocks.{i}.downsamplers.0" + ("" if updown == "res" else ".conv")
            pairs.append((ours, theirs, "res" if updown == "res" else "plain"))
            k += 1
    k = 0
    for i, level in enumerate(reversed(range(last + 1))):
        attn = attends[level]
        for j in range(kw["num_res_blocks"] + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
            if level and j == kw["num_res_blocks"]:
                ours = f"output_blocks.{k}.{2 if attn else 1}"
                ours += "" if updown == "res" else ".conv"
                theirs = f"up_blocks.{i}.upsamplers.0" + ("" if updown == "res" else ".conv")
                pairs.append((ours, theirs, "res" if updown == "res" else "plain"))
            k += 1
    return pairs


def _rename(key: str, pairs, forward: bool) -> tuple[str, str, str]:
    """(prefix-matched module, renamed key, kind) of ``key`` (longest prefix wins)."""
    best = None
    for ours, theirs, kind in pairs:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if key.startswith(src + ".") and (best is None or len(src) > len(best[0])):
            best = (src, dst, kind)
    if best is None:
        raise ValueError(f"weight {key!r} belongs to no block of this UNet")
    src, dst, kind = best
    rest = key[len(src) + 1:]
    table = {"res": RES_KEYS, "attn": ATTN_KEYS, "plain": {}}[kind]
    if not forward:
        table = {v: k for k, v in table.items()}
    for a, b in table.items():
        if rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return src, f"{dst}.{rest}", kind


def to_diffusers_state(kw: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (any attention layout) with UNet2DModel's names and shapes."""
    state = convert_qkv_layout(state, kw["attention_layout"], "flash",
                               num_heads=kw["num_heads"], num_head_channels=kw["num_head_channels"])
    pairs, out = _prefixes(kw), {}
    for key, value in state.items():
        src, new, kind = _rename(key, pairs, True)
        if kind == "attn" and ".qkv." in key:  # flash layout: all q, then all k, then all v
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[new.replace("qkv", name)] = part.reshape(part.shape[:2] if part.ndim > 1
                                                             else part.shape)
        elif kind == "attn" and value.ndim == 4:  # 1x1 convolutions become linear layers
            out[new] = value[:, :, 0, 0]
        else:
            out[new] = value
    return out


def from_diffusers_state(kw: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict with our names, shapes and attention layout."""
    pairs, out, qkv = _prefixes(kw), {}, {}
    for key, value in state.items():
        src, new, kind = _rename(key, pairs, False)
        if kind == "attn":
            leaf = key[len(src) + 1:]
            if leaf.split(".")[0] in ("to_q", "to_k", "to_v"):
                which, param = leaf.split(".")
                qkv.setdefault(f"{new.rsplit('.', 2)[0]}.qkv.{param}", {})[which] = value
                continue
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise ValueError(f"attention {key} lacks one of to_q, to_k, to_v")
        v = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
        out[key] = v[:, :, None, None] if v.ndim == 2 else v
    return convert_qkv_layout(out, "flash", kw.get("attention_layout", "flash"),
                              num_heads=kw["num_heads"], num_head_channels=kw["num_head_channels"])


def scheduler_config(mode: str, sigma_min: float, sigma_max: float, sigma_data: float,
                     rho: float, steps: int) -> dict:
    """The scheduler of a consistency model (``steps``: its multistep grid), or of an EDM
    denoiser (``mode == "edm"``)."""
    if mode == "edm":
        return dict(_class_name=EDM_SCHEDULER, _diffusers_version=DIFFUSERS_VERSION,
                    sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho,
                    prediction_type="epsilon", num_train_timesteps=1000)
    return dict(_class_name=CM_SCHEDULER, _diffusers_version=DIFFUSERS_VERSION,
                num_train_timesteps=int(steps), sigma_min=sigma_min, sigma_max=sigma_max,
                sigma_data=sigma_data, rho=rho, s_noise=1.0, clip_denoised=True)


def write_folder(out: str, kw: dict, state: dict[str, torch.Tensor], scheduler: dict,
                 cmscale_info: dict | None = None) -> None:
    """Write the diffusers folder ``out`` for an ADM UNet (``kw``, ``state``) and a scheduler
    config (:func:`scheduler_config`). ``cmscale_info`` goes into the weights' metadata."""
    config = to_diffusers_config(kw)
    converted = to_diffusers_state(kw, state)
    os.makedirs(os.path.join(out, UNET_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, SCHEDULER_DIR), exist_ok=True)
    meta = {"format": "pt", **{f"cmscale_{k}": v for k, v in (cmscale_info or {}).items()}}
    save_state_dict(converted, os.path.join(out, UNET_DIR, UNET_WEIGHTS), metadata=meta)
    write_json(os.path.join(out, UNET_DIR, "config.json"), config, sort_keys=True)
    write_json(os.path.join(out, SCHEDULER_DIR, "scheduler_config.json"), scheduler,
               sort_keys=True)
    pipeline = ("ConsistencyModelPipeline" if scheduler["_class_name"] == CM_SCHEDULER
                else "DiffusionPipeline")
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
             "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", scheduler["_class_name"]]}
    write_json(os.path.join(out, "model_index.json"), index, sort_keys=True)


def read_folder(path: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(our UNet kwargs, our state dict, scheduler config or {}) of a diffusers folder."""
    with open(os.path.join(path, UNET_DIR, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{path}/unet is a {cfg['_class_name']}, not a UNet2DModel")
    kw = from_diffusers_config(cfg)
    weights = [os.path.join(path, UNET_DIR, n)
               for n in (UNET_WEIGHTS, "diffusion_pytorch_model.bin")]
    found = [w for w in weights if os.path.isfile(w)]
    if not found:
        raise FileNotFoundError(f"{path}/unet has no {UNET_WEIGHTS}")
    state = from_diffusers_state(kw, load_state_dict(found[0]))
    sched_file = os.path.join(path, SCHEDULER_DIR, "scheduler_config.json")
    sched = {}
    if os.path.isfile(sched_file):
        with open(sched_file) as f:
            sched = json.load(f)
    return kw, state, sched
