"""ADM UNet, checkpoint-compatible with openai/consistency_models (`cm/unet.py`).

The architecture is the "ablated diffusion model" UNet of Dhariwal & Nichol, *Diffusion Models Beat
GANs on Image Synthesis* (2021, guided-diffusion), in the configuration Song et al., *Consistency
Models* (2023), use for ImageNet 64 and LSUN 256. This is our own implementation; only the parameter
names and shapes follow the reference, so its public checkpoints (edm_*, cd_*, ct_* .pt) load with
`strict=True`.

The network is the raw F of the paper: `forward(x, noise_labels, class_labels)` with
`noise_labels = c_noise(sigma) = 250 ln(sigma)`; the preconditioning (c_skip, c_out, c_in) lives
in `cmscale.networks.precond`, not here.

Differences from the reference, on purpose:
- No fp16 weight conversion (`convert_to_fp16`): mixed precision comes from `torch.autocast` outside.
  As in the reference, GroupNorm runs in float32, and the timestep/label embedding MLP and the
  final output layer run in float32 (the reference keeps them outside its fp16 torso).
- Attention is `F.scaled_dot_product_attention` with scale 1/sqrt(head_dim), which is what both
  reference paths compute (flash-attn's default scale; the legacy path multiplies q and k by
  head_dim^-1/4 each).
- Attention and every GroupNorm + (scale-shift) + SiLU go through `cmscale.kernels` (`kernels`:
  auto | triton | torch): fused Triton kernels on a GPU, the PyTorch ops above otherwise.
- No gradient-checkpointing flag: activation checkpointing, like parallelism, is applied from
  outside (the blocks are `input_blocks[i]`, `middle_block`, `output_blocks[i]`).
- 2-D only, and always learned (conv) resampling, as in the reference's `create_model`.
- `attention_resolutions` are given as resolutions (32, 16, 8) and converted to downsample factors
  `image_size // res`, as the reference's `create_model` does; an unreachable one is an error
  (the reference ignores it silently).

Attention layouts. The fused 1x1 `qkv` convolution produces 3*C channels. The public checkpoints
were trained with the reference's flash-attention path, which reads them as (three, heads,
head_dim): all queries first, then all keys, then all values ("flash", our default). The original
guided-diffusion `QKVAttentionLegacy` (also the first release of consistency_models) splits heads
first, (heads, three, head_dim) ("legacy"); guided-diffusion-trained weights use that one.
`convert_qkv_layout` permutes a state dict between the two.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels as K

__all__ = [
    "UNet",
    "PRESETS",
    "create_unet",
    "convert_qkv_layout",
    "timestep_embedding",
    "pixel_norm",
    "time_blind_blocks",
    "ATTENTION_LAYOUTS",
]

ATTENTION_LAYOUTS = ("flash", "legacy")

# Keyword arguments of `UNet` per preset. imagenet64 and lsun256 are the reference's launch
# commands (openai/consistency_models scripts/launch.sh) for the CD/CT students: dropout 0.0.
# Its EDM teachers (edm_*_ema.pt) were trained and are sampled with dropout 0.1
# (`--dropout 0.1`, `teacher_dropout=0.1`): pass dropout=0.1 for those. All public checkpoints
# use learn_sigma=False (3 output channels). The tiny presets are for CPU tests.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet64": dict(
        image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, num_classes=1000, dropout=0.0,
    ),
    "lsun256": dict(
        image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=False,
        resblock_updown=True, num_classes=None, dropout=0.0,
    ),
    # 32 channels is the floor: GroupNorm uses 32 groups. 2 heads of 16 channels.
    "tiny32": dict(
        image_size=32, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
        attention_resolutions=(16,), num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, num_classes=None, dropout=0.0,
    ),
    "tiny32_cond": dict(
        image_size=32, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
        attention_resolutions=(16,), num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, num_classes=10, dropout=0.0,
    ),
    # The other branches: conv Downsample/Upsample, heads by count. Scale-shift normalisation:
    # at 32 channels an additive time embedding would be normalised away (see
    # time_blind_blocks). The embedding sees ln(sigma) (noise_label_scale 1/250), not
    # 250 ln(sigma): its 16 frequencies then vary smoothly over the noise levels, which keeps
    # this small network's consistency training stable.
    "tiny16": dict(
        image_size=16, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
        attention_resolutions=(8,), num_heads=2, use_scale_shift_norm=True,
        resblock_updown=False, num_classes=None, dropout=0.0, noise_label_scale=0.004,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half) (ADM's order).

    Computed in float32 with the reference's exact op order: c_noise reaches |t| ~ 1500 at
    sigma_min, where a different rounding of t*f moves sin/cos by ~1e-4. A float64 ``t``
    (a network run in float64, e.g. for derivative checks) keeps float64.
    """
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype) / half)
    args = t[:, None].to(dtype) * freqs.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) evaluated in float32 whatever the (lower) input dtype (ADM's
    GroupNorm32); float64 inputs stay float64.

    `groups` other than 32 only for small networks (the `norm_groups` of `UNet`)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = None if self.weight is None else self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm_silu(norm: GroupNorm32, x: torch.Tensor, kernels: str, scale=None,
               shift=None) -> torch.Tensor:
    """SiLU(norm(x) * (1 + scale) + shift) in one kernel (``scale``, ``shift``: (B, C) or None).

    The PyTorch path calls ``norm`` as a module: module hooks (DeepSpeed ZeRO-3 gathers the
    norm's partitioned weight in them) must see it run."""
    if K.resolve(kernels, x.device) != "triton":
        return K.reference.scale_shift_silu(norm(x), scale, shift)
    return K.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift,
                             kernels=kernels)


def pixel_norm(v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``v`` over its root mean square across channels (dim 1), computed in float32 or wider:
    every (B, C) row gets unit RMS whatever the embedding's magnitude (the sCM paper's
    "pnorm")."""
    w = v.float() if v.element_size() < 4 else v
    return (w * torch.rsqrt(w.square().mean(dim=1, keepdim=True) + eps)).to(v.dtype)


def _zero(module: nn.Module) -> nn.Module:
    # Residual branches start at zero so every block is the identity at init (ADM's zero_module).
    for p in module.parameters():
        p.detach().zero_()
    return module


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (used when resblock_updown=False). Key: `op`."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (used when resblock_updown=False). Key: `conv`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_resample(x, "up"))


class ResBlock(nn.Module):
    """ADM residual block, optionally resampling (resblock_updown) and with FiLM (scale-shift) norm.

    The Sequential indices are the reference's state-dict keys: in_layers.{0 norm, 2 conv},
    emb_layers.1, out_layers.{0 norm, 3 conv}; SiLU and Dropout sit between them.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
        norm_groups: int = 32,
        kernels: str = "auto",
        double_norm: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        if double_norm and not use_scale_shift_norm:
            raise ValueError("double_norm normalises the scale and shift of scale-shift "
                             "normalisation: it needs use_scale_shift_norm=True")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.double_norm = double_norm
        self.kernels = kernels
        self.resample = resample  # None, "up" or "down": parameter-free, applied mid-block
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, norm_groups), nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, _, conv = self.in_layers
        h = _norm_silu(norm, x, self.kernels)
        # Resample after the activation and before the conv, on both branches (ADM's order).
        h = conv(_resample(h, self.resample))
        x = _resample(x, self.resample)
        emb_out = self.emb_layers(emb).to(h.dtype)
        norm, _, dropout, conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            if self.double_norm:  # norm(h) * pnorm(scale) + pnorm(shift)
                scale, shift = pixel_norm(scale) - 1, pixel_norm(shift)
            h = _norm_silu(norm, h, self.kernels, scale, shift)
        else:
            h = _norm_silu(norm, h + emb_out[:, :, None, None], self.kernels)
        return self.skip_connection(x) + conv(dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions (ADM). Keys: norm, qkv, proj_out."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 layout: str = "flash", norm_groups: int = 32, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
        self.num_heads = _heads(channels, num_heads, num_head_channels)
        self.layout = layout
        self.norm = GroupNorm32(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads, length = self.num_heads, height * width
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, length)
        if self.layout == "flash":  # channel = (which * heads + head) * head_dim + d
            q, k, v = qkv.reshape(b, 3, heads, c // heads, length).unbind(1)
        else:  # legacy: channel = (head * 3 + which) * head_dim + d
            q, k, v = qkv.reshape(b, heads, 3, c // heads, length).unbind(2)
        # (b, heads, head_dim, L) -> (b, heads, L, head_dim) for SDPA; default scale 1/sqrt(head_dim).
        a = K.attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2),
                        kernels=self.kernels)
        # Both reference paths emit channel = head * head_dim + d.
        a = a.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(a)


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        heads = num_heads
    else:
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels not divisible by num_head_channels={num_head_channels}")
        heads = channels // num_head_channels
    if channels % heads:
        raise ValueError(f"{channels} channels not divisible into {heads} heads")
    return heads


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the embedding (ADM's TimestepEmbedSequential)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """ADM UNet F(x, c_noise, class) with the reference's parameter names.

    Args:
        image_size: side of the (square) input; only used to turn attention resolutions into
            downsample factors.
        in_channels: image channels.
        model_channels: base width; level i has `channel_mult[i] * model_channels` channels.
        out_channels: output channels, default `in_channels`; doubled when `learn_sigma`.
        num_res_blocks: ResBlocks per level on the way down (one more per level on the way up).
        attention_resolutions: feature-map sides (e.g. 32, 16, 8) that get an attention block.
        dropout: dropout inside every ResBlock.
        channel_mult: width multiplier per level; len(channel_mult) - 1 downsamplings.
        num_classes: class-conditional via a label embedding added to the time embedding.
        num_heads: attention heads, used when num_head_channels == -1.
        num_head_channels: fixed channels per head (overrides num_heads).
        use_scale_shift_norm: FiLM conditioning `norm(h) * (1 + scale) + shift` in ResBlocks.
        resblock_updown: resample with ResBlocks instead of strided conv / upsample + conv.
        learn_sigma: the reference's flag: 2x output channels (ADM's learned variance). False for
            all public consistency_models checkpoints.
        attention_layout: "flash" (public checkpoints) or "legacy" (guided-diffusion); see module doc.
        noise_label_scale: multiplies `noise_labels` before the sinusoidal embedding (1: the
            reference). The reference's 250 ln(sigma) makes most of a narrow embedding's
            frequencies oscillate between neighbouring noise levels.
        norm_groups: GroupNorm groups (32: the reference). Fewer groups let a narrow network
            with an additive time embedding see it.
        kernels: "auto" | "triton" | "torch": attention and GroupNorm+SiLU implementation
            (`cmscale.kernels`); the weights and the function are the same.
        allow_time_blind: build even if some ResBlock cannot see the noise level (see
            `time_blind_blocks`); otherwise that is a ValueError.
        double_norm: adaptive double normalisation (Lu & Song 2025, for sCM): every ResBlock's
            FiLM is `norm(h) * pnorm(scale) + pnorm(shift)`, the scale and shift each divided
            by their RMS over channels (`pixel_norm`), so the time embedding's magnitude cannot
            blow up the block (needs use_scale_shift_norm). Same parameters as without it.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int | None = None,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        learn_sigma: bool = False,
        attention_layout: str = "flash",
        allow_time_blind: bool = False,
        noise_label_scale: float = 1.0,
        norm_groups: int = 32,
        kernels: str = "auto",
        double_norm: bool = False,
    ):
        super().__init__()
        if kernels not in K.KERNELS:
            raise ValueError(f"kernels={kernels!r}: choose one of {list(K.KERNELS)}")
        self.kernels = kernels
        out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.attention_layout = attention_layout
        self.noise_label_scale = float(noise_label_scale)

        attention_ds = {image_size // res for res in attention_resolutions}
        reachable = {2**level for level in range(len(channel_mult))}
        if any(image_size % res for res in attention_resolutions) or not attention_ds <= reachable:
            raise ValueError(
                f"attention_resolutions {tuple(attention_resolutions)} are not all feature-map sizes of a "
                f"{image_size}px UNet with {len(channel_mult)} levels "
                f"({sorted(image_size // d for d in reachable)})"
            )

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None

        def res(cin, cout=None, resample=None):
            return ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm, resample, norm_groups,
                            kernels, double_norm)

        def attn(ch):
            return AttentionBlock(ch, num_heads, num_head_channels, attention_layout, norm_groups,
                                  kernels)

        # Encoder. `skips` records the width of every feature map the decoder will concatenate.
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skips.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch), attn(ch), res(ch))

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch, norm_groups), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

        blind = time_blind_blocks(self)
        if blind and not allow_time_blind:
            raise ValueError(
                f"{len(blind)} of this UNet's ResBlocks cannot see the noise level ({blind[0]}, ...): "
                f"without scale-shift normalisation the time embedding is added as one constant per "
                f"channel, and a GroupNorm with one channel per group subtracts it again. Use "
                f"use_scale_shift_norm=True, or at least two channels per GroupNorm group in every "
                f"block (model_channels * channel_mult >= 2 * norm_groups), or pass allow_time_blind=True to build it anyway"
            )

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output F.

        Args:
            x: (B, in_channels, H, W), already scaled by c_in.
            noise_labels: (B,) float c_noise (250 ln sigma for the CM/EDM preconditioning);
                a single value is broadcast over the batch.
            class_labels: (B,) int64 class indices, or (B, num_classes) float one-hot / soft labels
                (EDM's convention), required iff the model is class-conditional.
        Returns:
            (B, out_channels, H, W).
        """
        if (class_labels is None) != (self.label_emb is None):
            raise ValueError("class_labels must be given iff the model is class-conditional")
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(x.shape[0])

        # Embedding MLP in float32 even under autocast, like the reference's fp32 time_embed.
        with torch.autocast(x.device.type, enabled=False):
            w = self.time_embed[0].weight
            if self.noise_label_scale != 1.0:
                noise_labels = noise_labels * self.noise_label_scale
            emb = self.time_embed(timestep_embedding(noise_labels, self.model_channels).to(w.dtype))
            if self.label_emb is not None:
                if class_labels.is_floating_point():
                    emb = emb + class_labels.to(w.dtype) @ self.label_emb.weight
                else:
                    emb = emb + self.label_emb(class_labels)

        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop().to(h.dtype)], dim=1), emb)

        # Last conv in float32 too: the reference casts back to x's dtype before `out`.
        with torch.autocast(x.device.type, enabled=False):
            norm, _, conv = self.out
            return conv(_norm_silu(norm, h.to(conv.weight.dtype), self.kernels))


def time_blind_blocks(net: nn.Module) -> list[str]:
    """Names of the ResBlocks whose output does not depend on the time embedding.

    Without scale-shift normalisation a ResBlock adds `emb_layers(emb)` as one constant per
    channel right before `out_layers[0]`, a GroupNorm. When every group holds a single channel
    the normalisation subtracts each channel's mean, constant included: the block, and a UNet
    made only of such blocks, ignores the noise level.
    """
    blind = []
    for name, module in net.named_modules():
        if isinstance(module, ResBlock) and not module.use_scale_shift_norm:
            norm = module.out_layers[0]
            if norm.num_channels == norm.num_groups:
                blind.append(name)
    return blind


def create_unet(preset: str | Mapping[str, Any] | None = None, **overrides: Any) -> UNet:
    """Build a UNet from a preset name in PRESETS and/or keyword arguments.

    `create_unet("imagenet64")`, `create_unet("lsun256", dropout=0.1)`, `create_unet({...})`;
    an empty name means keyword arguments only (a diffusers folder's UNet).
    """
    if isinstance(preset, str) and preset:
        if preset not in PRESETS:
            raise KeyError(f"unknown UNet preset {preset!r}; known: {sorted(PRESETS)}")
        kwargs = dict(PRESETS[preset])
    else:
        kwargs = dict(preset or {})
    kwargs.update(overrides)
    return UNet(**kwargs)


def convert_qkv_layout(
    state_dict: Mapping[str, torch.Tensor],
    src: str,
    dst: str,
    *,
    num_heads: int = 1,
    num_head_channels: int = -1,
) -> dict[str, torch.Tensor]:
    """Permute every attention `*.qkv.weight` / `*.qkv.bias` between the "flash" (three, heads,
    head_dim) and "legacy" (heads, three, head_dim) channel orders; other entries are passed through.

    `num_heads` / `num_head_channels` must be those the network is built with (per block, heads =
    C // num_head_channels, or num_heads when num_head_channels == -1). The permutation is its own
    inverse, so flash -> legacy -> flash is the identity.
    """
    for layout in (src, dst):
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
    out = dict(state_dict)
    if src == dst:
        return out
    for key, value in state_dict.items():
        if not (key.endswith(".qkv.weight") or key.endswith(".qkv.bias")):
            continue
        channels = value.shape[0] // 3
        heads = _heads(channels, num_heads, num_head_channels)
        rest = value.shape[1:]
        # (3, H, D) <-> (H, 3, D) along the output-channel axis: swapping the two leading factors.
        lead = (3, heads) if src == "flash" else (heads, 3)
        permuted = value.reshape(*lead, channels // heads, *rest).transpose(0, 1)
        out[key] = permuted.reshape(value.shape).contiguous()
    return out
