"""Our ADM UNet as diffusers' UNet2DModel and back (cmscale.diffusers_format).

Each UNet below gets random non-zero weights, is converted, and must compute the same function
as the UNet2DModel built from the converted config; the way back must give the same tensors.
What UNet2DModel cannot express is refused with an error naming our option.
"""

import json

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, UNet2DModel

from cmscale import convert
from cmscale import diffusers_format as dfmt
from cmscale.networks.unet import UNet

CASES = {
    "tiny32 (resnet resampling, scale-shift)": ("tiny32", {}),
    "class-conditional": ("tiny32_cond", {}),
    "conv resampling, heads by count, legacy qkv": (
        "tiny16", dict(noise_label_scale=1.0, attention_layout="legacy")),
    "additive time embedding, 8 groups, widening": (
        "tiny32", dict(use_scale_shift_norm=False, norm_groups=8, channel_mult=(1, 2),
                       resblock_updown=False, num_res_blocks=2)),
    "grey (one channel, data.channels=1)": ("tiny32", dict(in_channels=1)),
}


def randomised(kw):
    torch.manual_seed(0)
    net = UNet(**kw).eval()
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layers included
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize("preset,overrides", CASES.values(), ids=list(CASES))
def test_unet2dmodel_computes_our_unet_and_converts_back(preset, overrides):
    kw = dfmt.unet_kwargs(preset, overrides)
    net = randomised(kw)
    config = dfmt.to_diffusers_config(kw)
    theirs = UNet2DModel.from_config(config).eval()
    converted = dfmt.to_diffusers_state(kw, net.state_dict())
    theirs.load_state_dict(converted, strict=True)

    x = torch.randn(2, kw["in_channels"], kw["image_size"], kw["image_size"])
    t = 250 * torch.log(torch.tensor([40.0, 0.01]))  # c_noise at a high and a low level
    labels = torch.tensor([1, 7]) if kw["num_classes"] else None
    with torch.no_grad():
        ours = net(x, t, labels)
        out = theirs(x, t, class_labels=labels).sample
    assert ours.abs().max() > 0.5
    torch.testing.assert_close(out, ours, rtol=0, atol=2e-5)

    back_kw = dfmt.from_diffusers_config(json.loads(json.dumps(config)))
    back = dfmt.from_diffusers_state(dict(back_kw, attention_layout=kw["attention_layout"]),
                                     converted)
    assert back.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(back[k], v), k
    rebuilt = UNet(**back_kw)
    rebuilt.load_state_dict(dfmt.from_diffusers_state(back_kw, converted))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, labels), ours, rtol=0, atol=0)


@pytest.mark.parametrize("preset,overrides,option", [
    ("tiny16", {}, "noise_label_scale"),
    ("tiny32", dict(learn_sigma=True), "learn_sigma"),
    ("tiny32", dict(double_norm=True), "double_norm"),
    ("tiny32", dict(channel_mult=(2, 2)), "channel_mult"),
    ("tiny32", dict(num_head_channels=-1, num_heads=2, channel_mult=(1, 2),
                    attention_resolutions=(32, 16)), "num_heads"),
])
def test_refuses_what_unet2dmodel_cannot_express_naming_the_option(preset, overrides, option):
    with pytest.raises(ValueError, match=option):
        dfmt.to_diffusers_config(dfmt.unet_kwargs(preset, overrides))


@pytest.mark.parametrize("key,value", [("time_embedding_type", "fourier"),
                                       ("flip_sin_to_cos", False),
                                       ("down_block_types", ["CrossAttnDownBlock2D",
                                                             "AttnDownBlock2D"])])
def test_reading_a_unet2dmodel_the_adm_unet_is_not_names_the_setting(key, value):
    config = dfmt.to_diffusers_config(dfmt.unet_kwargs("tiny32"))
    config[key] = value
    with pytest.raises(ValueError, match=key if key != "down_block_types" else "CrossAttn"):
        dfmt.from_diffusers_config(config)


def test_scheduler_config_is_diffusers_consistency_scheduler_with_our_levels():
    cfg = dfmt.scheduler_config("ct", 0.01, 60.0, 0.25, 5.0, 18)
    sched = CMStochasticIterativeScheduler.from_config(cfg)
    sched.set_timesteps(2)
    assert sched.config.sigma_data == 0.25 and sched.config.num_train_timesteps == 18
    # Karras grid of 18 levels, sigma_max first, then index 18 // 2, then sigma_min appended.
    rho = 5.0
    def at(i):
        return (60.0 ** (1 / rho) + i / 17 * (0.01 ** (1 / rho) - 60.0 ** (1 / rho))) ** rho
    torch.testing.assert_close(sched.sigmas, torch.tensor([at(0), at(9), 0.01]))


def test_convert_writes_a_reference_pt_as_a_folder_and_reads_it_back(tmp_path):
    kw = dfmt.unet_kwargs("tiny32_cond")
    state = randomised(kw).state_dict()
    torch.save(state, tmp_path / "ref.pt")
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    assert convert.main([str(tmp_path / "ref.pt"), "--preset", "tiny32_cond", "--format",
                         "diffusers", "--out", str(folder)]) == 0
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == \
        "ConsistencyModelPipeline"
    assert convert.main([str(folder), "--out", str(back)]) == 0
    from safetensors.torch import load_file

    got = load_file(str(back))
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
