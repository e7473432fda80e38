"""Strict loading of a weights file (or diffusers folder) into a raw network, with one error.

``load_strict(raw, path, preset, what)`` loads ``path`` into ``raw`` with ``strict=True``:
a weights file (:func:`cmscale.weights.load_state_dict`) or a diffusers folder
(:mod:`cmscale.diffusers_format`, converted back to our names). A file that does not fit raises
ValueError naming the file, the preset and the first missing, unexpected and shape-mismatched
keys; a folder whose UNet differs from ``raw`` in a way shapes do not show (GroupNorm groups,
attention heads, scale-shift, time-input scale) raises naming the first difference.
"""

from __future__ import annotations

import torch
from torch import nn

from . import diffusers_format
from .networks.unet import AttentionBlock, ResBlock, UNet, convert_qkv_layout
from .weights import load_state_dict

SHOWN_KEYS = 3  # keys of each kind named in the error


def _structure(net: nn.Module) -> list[tuple[str, str]]:
    """What a UNet computes beyond its parameter shapes, per module."""
    out = [("noise_label_scale", str(getattr(net, "noise_label_scale", 1.0)))]
    for name, m in net.named_modules():
        if isinstance(m, nn.GroupNorm):
            out.append((name, f"{m.num_groups} groups"))
        elif isinstance(m, AttentionBlock):
            out.append((name, f"{m.num_heads} heads"))
        elif isinstance(m, ResBlock):
            out.append((name, f"scale_shift={m.use_scale_shift_norm} resample={m.resample}"))
    return out


def read_state(path: str) -> tuple[dict[str, torch.Tensor], list | None]:
    """(state dict, structure of a diffusers folder's UNet or None) of a file or folder."""
    if not diffusers_format.is_folder(path):
        return load_state_dict(path), None
    kw, state, _ = diffusers_format.read_folder(path)
    with torch.device("meta"):
        return state, _structure(UNet(**kw, allow_time_blind=True))


def load_strict(raw: nn.Module, path: str, preset: str, what: str = "weights") -> nn.Module:
    """``raw`` with the weights of ``path``; ValueError if the file does not fit ``preset``."""
    state, structure = read_state(path)
    layout = getattr(raw, "attention_layout", "flash")
    if structure is not None and layout != "flash":  # a folder's state is in the flash layout
        state = convert_qkv_layout(state, "flash", layout, num_heads=raw.num_heads,
                                   num_head_channels=raw.num_head_channels)
    own = raw.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}"
                + (", ..." if len(keys) > SHOWN_KEYS else "")
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches (file vs preset)", shapes)) if keys]
    if problems:
        raise ValueError(f"{what} {path} does not fit UNet preset {preset!r}: "
                         + "; ".join(problems))
    for ours, theirs in zip(_structure(raw), structure or []):
        if ours != theirs:
            raise ValueError(f"{what} {path}: the diffusers folder's UNet differs from preset "
                             f"{preset!r} at {ours[0]}: folder {theirs[1]}, preset {ours[1]}")
    raw.load_state_dict(state, strict=True)
    return raw
