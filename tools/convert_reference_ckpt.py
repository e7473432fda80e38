"""Convert an openai/consistency_models checkpoint (edm_*, cd_*, ct_* .pt) for cmscale's UNet.

The reference saves a plain state dict whose names and shapes already match
`cmscale.networks.unet.UNet`; this script loads it without unpickling code (`weights_only=True`),
optionally permutes the attention qkv layout, proves that it loads with `strict=True` into the
preset's network, and writes safetensors (by extension `.safetensors`) or a plain torch state dict.

    python tools/convert_reference_ckpt.py cd_bedroom256_lpips.pt cd_bedroom256_lpips.safetensors \
        --preset lsun256
    python tools/convert_reference_ckpt.py edm_imagenet64_ema.pt edm_imagenet64.safetensors \
        --preset imagenet64 --set dropout=0.1

The public checkpoints were trained with the flash-attention path: `--src-layout flash` (default).
Weights trained with guided-diffusion's heads-first attention take `--src-layout legacy`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.networks.unet import ATTENTION_LAYOUTS, PRESETS, create_unet, convert_qkv_layout  # noqa: E402


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> dict[str, torch.Tensor]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="reference checkpoint (.pt, a plain state dict)")
    p.add_argument("dst", type=Path, help="output: *.safetensors, otherwise a torch state dict")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="UNet keyword overrides, e.g. dropout=0.1 learn_sigma=True")
    p.add_argument("--src-layout", default="flash", choices=ATTENTION_LAYOUTS)
    p.add_argument("--layout", default="flash", choices=ATTENTION_LAYOUTS, help="layout to write")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    args = p.parse_args(argv)

    overrides = _parse_set(args.set)
    state_dict = torch.load(args.src, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise SystemExit(f"{args.src}: expected a plain state dict of tensors")

    config = {**PRESETS[args.preset], **overrides}
    heads = dict(num_heads=config.get("num_heads", 1), num_head_channels=config.get("num_head_channels", -1))
    state_dict = convert_qkv_layout(state_dict, args.src_layout, args.layout, **heads)
    if args.dtype != "keep":
        dtype = getattr(torch, args.dtype)
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}

    # Strict load on the meta device: checks every name and shape without allocating the network.
    with torch.device("meta"):
        net = create_unet(args.preset, **overrides, attention_layout=args.layout)
    net.load_state_dict(state_dict, strict=True, assign=True)
    n_params = sum(v.numel() for v in state_dict.values())

    args.dst.parent.mkdir(parents=True, exist_ok=True)
    if args.dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "cmscale.unet", "preset": args.preset, "attention_layout": args.layout,
                "overrides": json.dumps(overrides), "source": args.src.name}
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(args.dst), metadata=meta)
    else:
        torch.save(state_dict, args.dst)
    print(f"{args.src} -> {args.dst}: {len(state_dict)} tensors, {n_params / 1e6:.1f}M parameters, "
          f"preset {args.preset} {overrides or ''}, qkv layout {args.src_layout} -> {args.layout}; "
          f"strict load OK")
    return state_dict


if __name__ == "__main__":
    main()
