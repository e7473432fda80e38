"""ADM UNet: checkpoint compatibility with openai/consistency_models and attention layouts.

Fixtures in tests/fixtures/unet/ were produced by running the reference network (cm/unet.py) on CPU
(see manifest.json for commits): state-dict keys/shapes of the published configurations, and tiny
random-weight networks with their inputs and reference outputs for both qkv layouts.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cmscale.networks.unet import (
    PRESETS,
    AttentionBlock,
    UNet,
    convert_qkv_layout,
    create_unet,
)
from tests import support

FIXTURES = support.FIXTURES / "unet"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TINY = sorted(MANIFEST["configs"])
ATOL = 1e-5


def _load_tiny(name):
    cfg = MANIFEST["configs"][name]
    data = torch.load(FIXTURES / cfg["file"], map_location="cpu", weights_only=True)
    return cfg, data


def _tiny_net(cfg, data, layout="flash"):
    net = create_unet(cfg["preset"], **cfg["overrides"], attention_layout=layout).eval()
    net.load_state_dict(data["state_dict"], strict=True)  # float16-exact values, copied into fp32
    return net


def _heads(cfg):
    kw = {**PRESETS[cfg["preset"]], **cfg["overrides"]}
    return dict(num_heads=kw.get("num_heads", 1), num_head_channels=kw.get("num_head_channels", -1))


@pytest.mark.parametrize("preset", ["imagenet64", "lsun256"])
def test_preset_keys_and_shapes_match_reference(preset):
    ref = json.loads((FIXTURES / f"keys_{preset}.json").read_text())
    with torch.device("meta"):
        net = create_unet(preset)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(ref["keys"]) - set(ours))
    unexpected = sorted(set(ours) - set(ref["keys"]))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert ours == ref["keys"]
    assert list(ours) == list(ref["keys"])  # same registration order as well
    assert sum(math.prod(s) for s in ours.values()) == ref["num_parameters"]
    # The preset's non-architectural knobs follow the same launch command.
    args = ref["create_model_args"]
    assert PRESETS[preset]["dropout"] == args["dropout"]
    assert PRESETS[preset]["use_scale_shift_norm"] == args["use_scale_shift_norm"]
    assert (PRESETS[preset]["num_classes"] is not None) == args["class_cond"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_matches_reference_flash_layout(name):
    cfg, data = _load_tiny(name)
    net = _tiny_net(cfg, data, "flash")
    with torch.no_grad():
        out = net(data["x"], data["noise_labels"], data.get("class_labels"))
    assert out.shape == data["out_flash"].shape
    torch.testing.assert_close(out, data["out_flash"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_tiny_matches_reference_legacy_layout_and_conversion(name):
    cfg, data = _load_tiny(name)
    args = (data["x"], data["noise_labels"], data.get("class_labels"))
    with torch.no_grad():
        out = _tiny_net(cfg, data, "legacy")(*args)
        torch.testing.assert_close(out, data["out_legacy"], atol=ATOL, rtol=0)

        # Legacy weights converted to the flash layout give the same function in flash mode.
        flash_sd = convert_qkv_layout(data["state_dict"], "legacy", "flash", **_heads(cfg))
        net = create_unet(cfg["preset"], **cfg["overrides"], attention_layout="flash").eval()
        net.load_state_dict(flash_sd, strict=True)
        torch.testing.assert_close(net(*args), data["out_legacy"], atol=ATOL, rtol=0)

        # ...while reading legacy weights in the wrong layout is visibly different.
        assert (data["out_legacy"] - data["out_flash"]).abs().max() > 0.1


@pytest.mark.parametrize("name", TINY)
def test_layout_conversion_round_trips(name):
    cfg, data = _load_tiny(name)
    sd, heads = data["state_dict"], _heads(cfg)
    legacy = convert_qkv_layout(sd, "flash", "legacy", **heads)
    back = convert_qkv_layout(legacy, "legacy", "flash", **heads)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    qkv = [k for k in sd if ".qkv." in k]
    assert qkv and all(not torch.equal(legacy[k], sd[k]) for k in qkv)  # >1 head: a real permutation
    assert all(legacy[k] is sd[k] for k in sd if k not in qkv)
    assert convert_qkv_layout(sd, "flash", "flash", **heads) == sd


def _noise_change(net):
    """Largest output change of a float64 ``net`` with N(0, 0.1) weights when its noise input
    moves from 1.0 to 1.5 (8 px inputs)."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        return (net(x, torch.full((2,), 1.0, dtype=torch.float64))
                - net(x, torch.full((2,), 1.5, dtype=torch.float64))).abs().max().item()


def _plain_attention(block, x):
    """Softmax attention written out, independent of SDPA, reading qkv in the block's layout."""
    b, c, h, w = x.shape
    n = block.num_heads
    qkv = block.qkv(block.norm(x)).reshape(b, 3 * c, h * w)
    if block.layout == "flash":
        q, k, v = (t.reshape(b, n, c // n, h * w) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b, n, 3 * (c // n), h * w).chunk(3, dim=2)
    weight = torch.softmax(torch.einsum("bncs,bnct->bnst", q, k) / math.sqrt(c // n), dim=-1)
    a = torch.einsum("bnst,bnct->bncs", weight, v).reshape(b, c, h, w)
    return x + block.proj_out(a)


@pytest.mark.parametrize("layout", ["flash", "legacy"])
def test_sdpa_attention_equals_plain_softmax_attention(layout):
    torch.manual_seed(0)
    # head_dim 32: 1/sqrt(32) is not a power of two, so a misplaced scale would show.
    block = AttentionBlock(96, num_head_channels=32, layout=layout)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)  # proj_out is zero-initialised; make the branch count
        x = torch.randn(2, 96, 6, 5)
        torch.testing.assert_close(block(x), _plain_attention(block, x), atol=1e-5, rtol=1e-5)


def test_class_label_changes_output():
    cfg, data = _load_tiny("tiny32_cond")
    net = _tiny_net(cfg, data)
    x, t, y = data["x"], data["noise_labels"], data["class_labels"]
    y2 = y.clone()
    y2[0] = (y[0] + 1) % 10
    with torch.no_grad():
        out, out2 = net(x, t, y), net(x, t, y2)
        one_hot = net(x, t, F.one_hot(y, 10).float())
    assert (out[0] - out2[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[1:], out2[1:], atol=0, rtol=0)  # samples are independent
    torch.testing.assert_close(one_hot, out, atol=1e-6, rtol=0)  # EDM-style one-hot labels
    with pytest.raises(ValueError):
        net(x, t)


def test_scalar_noise_label_broadcasts_and_output_shape():
    torch.manual_seed(0)
    net = create_unet("tiny16").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = net(x, torch.tensor(1.5))
        b = net(x, torch.full((2,), 1.5))
    assert a.shape == x.shape and net.out_channels == 3
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bf16_autocast_keeps_norm_embedding_and_output_in_float32():
    cfg, data = _load_tiny("tiny32_cond")
    net = _tiny_net(cfg, data)
    args = (data["x"], data["noise_labels"], data["class_labels"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(*args)
    assert out.dtype == torch.float32
    err = (out - data["out_flash"]).abs().max().item()
    assert err < 0.15 * data["out_flash"].abs().max().item()  # bf16 torso, loose on purpose


def test_unreachable_attention_resolution_is_an_error():
    with pytest.raises(ValueError):
        UNet(image_size=32, model_channels=32, channel_mult=(1, 1), attention_resolutions=(8,))


def test_convert_tool_loads_strictly_and_converts(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_reference_ckpt", support.REPO / "tools" / "convert_reference_ckpt.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg, data = _load_tiny("tiny32_cond")
    src = tmp_path / "ref.pt"
    torch.save(data["state_dict"], src)

    assert tool.main([str(src), str(tmp_path / "out.safetensors"), "--preset", "tiny32_cond",
                      "--src-layout", "legacy", "--dtype", "float32"]) == 0
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out.safetensors"))
    expected = convert_qkv_layout(data["state_dict"], "legacy", "flash", **_heads(cfg))
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], expected[k].float()) for k in out)

    # wrong architecture: strict loading refuses it, exit code 2
    assert tool.main([str(src), str(tmp_path / "bad.pt"), "--preset", "tiny16"]) == 2


# Every preset at a small image size (the architecture per block is the preset's; only the
# number of pixels changes), so that even lsun256 runs in a second on CPU.
_SMALL_SIDE = {"lsun256": 32, "imagenet64": 32}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_sees_the_noise_level(preset):
    side = _SMALL_SIDE.get(preset, PRESETS[preset]["image_size"])
    kw = {"image_size": side}
    if preset in _SMALL_SIDE:  # attention at the same depths as at full size
        full = PRESETS[preset]["image_size"]
        kw["attention_resolutions"] = [r * side // full for r in PRESETS[preset]["attention_resolutions"]]
    torch.manual_seed(0)
    net = create_unet(preset, **kw).eval()
    with torch.no_grad():
        for p in net.parameters():  # random weights everywhere (zero-initialised branches too)
            p.normal_(0, 0.02 if p.numel() > 10**6 else 0.1)
    x = torch.randn(1, 3, side, side)
    y = torch.zeros(1, dtype=torch.long) if net.num_classes else None
    from cmscale.networks import c_noise

    with torch.no_grad():
        a = net(x, c_noise(torch.tensor([1.0])), y)
        b = net(x, c_noise(torch.tensor([1.5])), y)
        a2 = net(x, c_noise(torch.tensor([1.0])), y)
    rounding = (a - a2).abs().max().item() + 1e-6 * a.abs().max().item()
    change = (a - b).abs().max().item()
    assert change > 1e-3 * a.abs().max().item() and change > 100 * rounding, (change, rounding)


def test_time_blind_unet_is_an_error_naming_the_fix():
    # 32 channels per block, no scale-shift: each GroupNorm group is one channel, so the
    # per-channel time-embedding constant is normalised away in every ResBlock.
    blind = dict(image_size=8, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, use_scale_shift_norm=False)
    with pytest.raises(ValueError, match="use_scale_shift_norm=True.*two channels per GroupNorm group.*allow_time_blind"):
        UNet(**blind)
    # Allowed explicitly it builds, and it is indeed blind to the noise level.
    torch.manual_seed(0)
    net = UNet(**blind, allow_time_blind=True).double().eval()
    change = _noise_change(net)
    assert change < 1e-6
    from cmscale.networks.unet import time_blind_blocks

    assert len(time_blind_blocks(net)) == 8  # 2 down, 2 middle, 4 up: every ResBlock
    # Either fix is accepted: scale-shift normalisation, or two channels per group.
    UNet(**{**blind, "use_scale_shift_norm": True})
    UNet(**{**blind, "model_channels": 64})
    # The reference presets are not affected (at least 8 channels per group, or scale-shift).
    with torch.device("meta"):
        for name in ("lsun256", "imagenet64"):
            assert time_blind_blocks(create_unet(name)) == []


def test_noise_label_scale_is_a_multiplier_on_the_time_input():
    torch.manual_seed(0)
    net = create_unet("tiny16", noise_label_scale=0.25).eval()
    ref = create_unet("tiny16").eval()
    ref.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([-400.0, 300.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), ref(x, t * 0.25), atol=0, rtol=0)


def test_additive_time_embedding_matches_reference():
    # The branch lsun256 uses (no scale-shift, several channels per group), where the noise
    # level must reach the output: the reference's outputs at two time inputs.
    cfg = MANIFEST["additive"]
    data = torch.load(FIXTURES / cfg["file"], map_location="cpu", weights_only=True)
    net = create_unet(cfg["preset"], **cfg["overrides"]).eval()
    net.load_state_dict({k: v.float() for k, v in data["state_dict"].items()}, strict=True)
    with torch.no_grad():
        out = net(data["x"], data["noise_labels"])
        shifted = net(data["x"], data["noise_labels"] + 125.0)
    torch.testing.assert_close(out, data["out_flash"], atol=ATOL, rtol=0)
    torch.testing.assert_close(shifted, data["out_flash_shifted"], atol=ATOL, rtol=0)
    assert (data["out_flash"] - data["out_flash_shifted"]).abs().max() > 1e-3


def test_norm_groups_gives_a_narrow_additive_network_the_noise_level():
    # 32 channels in 16 groups: two channels per group, so the per-channel embedding survives.
    kw = dict(image_size=8, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
              attention_resolutions=(4,), num_heads=2, use_scale_shift_norm=False, norm_groups=16)
    torch.manual_seed(0)
    net = UNet(**kw).double().eval()
    assert all(m.num_groups == 16 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))
    change = _noise_change(net)
    assert change > 1e-3
