"""``cmscale convert SRC --out DST``: a reference checkpoint or diffusers folder for cmscale.

    cmscale convert cd_bedroom256_lpips.pt --preset lsun256 --out cd_bedroom256_lpips.safetensors
    cmscale convert edm_imagenet64_ema.pt --preset imagenet64 --set dropout=0.1 \\
        --out edm_imagenet64.safetensors
    cmscale convert cd_imagenet64_l2.pt --preset imagenet64 --format diffusers --out cd64-diffusers
    cmscale convert openai-diffusers-cd_imagenet64_l2/ --out cd_imagenet64_l2.safetensors

SRC is an openai/consistency_models checkpoint (``edm_*``, ``cd_*``, ``ct_*`` .pt: a plain state
dict whose names and shapes already match :class:`cmscale.networks.unet.UNet`, loaded without
unpickling code, ``weights_only=True``; ``--preset`` names its UNet) or a diffusers folder
(``unet/`` + ``scheduler/``; its UNet comes from its config). The weights are proven to load
with ``strict=True`` and written as safetensors (by extension ``.safetensors``), a plain torch
state dict, or with ``--format diffusers`` as a diffusers folder
(:mod:`cmscale.diffusers_format`; ``--mode edm`` for EDM teachers).

The public checkpoints were trained with the flash-attention path: ``--src-layout flash``
(default). Weights trained with guided-diffusion's heads-first attention take
``--src-layout legacy``. (``DST`` may also be given as the second positional argument.)
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch

from . import diffusers_format, schedules
from .cli import out_path
from .networks.unet import ATTENTION_LAYOUTS, PRESETS, create_unet, convert_qkv_layout
from .weights import load_state_dict, save_state_dict

EXAMPLE = ("example: cmscale convert cd_imagenet64_l2.pt --preset imagenet64 "
           "--out cd_imagenet64_l2.safetensors")


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def convert(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Run the conversion; returns the state dict written (our names and layout)."""
    p = argparse.ArgumentParser(prog="cmscale convert", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="reference checkpoint (.pt) or diffusers folder")
    p.add_argument("dst_pos", nargs="?", metavar="DST", help="same as --out")
    p.add_argument("--out", default=None, help="output: *.safetensors, otherwise a torch state "
                   "dict; a folder with --format diffusers")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="UNet preset of a .pt (a diffusers folder names its own)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="UNet keyword overrides, e.g. dropout=0.1 learn_sigma=True")
    p.add_argument("--src-layout", default="flash", choices=ATTENTION_LAYOUTS)
    p.add_argument("--layout", default="flash", choices=ATTENTION_LAYOUTS, help="layout to write")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    p.add_argument("--format", default="weights", choices=["weights", "diffusers"])
    p.add_argument("--mode", default="cm", choices=["cm", "edm"],
                   help="--format diffusers: consistency model or EDM denoiser (its scheduler)")
    args = p.parse_args(argv)
    dst = Path(out_path(p, args.dst_pos, args.out))

    if diffusers_format.is_folder(str(args.src)):
        kw, state_dict, _ = diffusers_format.read_folder(str(args.src))
        preset, overrides = "", kw
        args.src_layout = "flash"  # what read_folder gives
    else:
        if not args.preset:
            p.error(f"{args.src}: name its UNet with --preset")
        preset, overrides = args.preset, _parse_set(args.set)
        state_dict = load_state_dict(str(args.src))
    if not all(torch.is_tensor(v) for v in state_dict.values()):
        raise SystemExit(f"{args.src}: expected a plain state dict of tensors")

    config = diffusers_format.unet_kwargs(preset, overrides)
    heads = dict(num_heads=config["num_heads"], num_head_channels=config["num_head_channels"])
    state_dict = convert_qkv_layout(state_dict, args.src_layout, args.layout, **heads)
    if args.dtype != "keep":
        dtype = getattr(torch, args.dtype)
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}

    # Strict load on the meta device: checks every name and shape without allocating the network.
    with torch.device("meta"):
        net = create_unet(preset, **dict(overrides, attention_layout=args.layout))
    net.load_state_dict(state_dict, strict=True, assign=True)
    n_params = sum(v.numel() for v in state_dict.values())

    dst.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "diffusers":
        sched = diffusers_format.scheduler_config(
            args.mode, schedules.SIGMA_MIN, schedules.SIGMA_MAX,
            0.5, schedules.RHO, 40)
        diffusers_format.write_folder(str(dst), dict(config, attention_layout=args.layout),
                                      state_dict, sched, {"source": args.src.name})
    elif dst.suffix == ".safetensors":
        meta = {"format": "cmscale.unet", "preset": preset, "attention_layout": args.layout,
                "overrides": json.dumps(overrides), "source": args.src.name}
        save_state_dict(state_dict, str(dst), metadata=meta)
    else:
        torch.save(state_dict, dst)
    print(f"{args.src} -> {dst}: {len(state_dict)} tensors, {n_params / 1e6:.1f}M parameters, "
          f"preset {preset or '(diffusers config)'} {overrides if preset else ''}, qkv layout "
          f"{args.src_layout} -> {args.layout}; strict load OK")
    return state_dict


def main(argv: list[str] | None = None) -> int:
    try:
        convert(argv)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
