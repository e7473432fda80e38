"""Recipes carry the reference's hyperparameters; config errors name the key."""

import glob
import os

import pytest

from cmscale.config import ConfigError, dump_config, load_config
from cmscale.networks.unet import PRESETS
from tests.support import REPO

ROOT = str(REPO)


def cfg(name, *overrides):
    return load_config(os.path.join(ROOT, "configs", name + ".yaml"), list(overrides))


def test_every_recipe_loads_and_round_trips(tmp_path):
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert {"lsun_cat_ct", "lsun_bedroom_cd", "imagenet64_cd", "imagenet64_ct", "cifar10_ict",
            "cifar10_ect", "quickstart", "imagenet64_sct", "imagenet64_scd"} <= set(names)
    for name in names:
        c = cfg(name)
        assert c.net.preset in PRESETS
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(c))
        assert load_config(str(path)).to_dict() == c.to_dict()


def test_reference_hyperparameters():
    c = cfg("lsun_cat_ct")
    assert (c.loss.mode, c.loss.metric, c.loss.start_scales, c.loss.end_scales,
            c.loss.start_ema) == ("ct", "lpips", 2, 150, 0.95)
    for name in ("lsun_cat_ct", "lsun_bedroom_cd", "imagenet64_cd", "imagenet64_ct"):
        assert cfg(name).loss.lpips_variant == "reference", name  # piq's average pooling
    for name in ("lsun_cat_ct", "imagenet64_ct", "cifar10_ict"):  # CT as the papers: from scratch
        assert cfg(name).loss.init_from_teacher is False, name
    for name in ("lsun_bedroom_cd", "imagenet64_cd"):
        assert cfg(name).loss.init_from_teacher is True, name
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("radam", 5e-5, 0.0)
    assert (c.train.global_batch, c.train.total_steps, c.train.precision) == (256, 1_000_000, "fp16")
    assert c.ema.rates == [0.9999, 0.99994, 0.9999432189950708]
    assert (c.sample.ts, c.sample.steps) == ([0, 62, 150], 151)
    c = cfg("lsun_bedroom_cd")
    assert (c.loss.num_scales, c.loss.target_ema, c.loss.solver, c.optim.lr,
            c.train.total_steps, c.loss.teacher_dropout) == (40, 0.95, "heun", 1e-5, 600_000, 0.1)
    c = cfg("imagenet64_cd")
    assert (c.optim.lr, c.train.global_batch, c.data.class_cond, c.net.preset) == (
        8e-6, 2048, True, "imagenet64")
    assert c.ema.rates == [0.999, 0.9999, 0.9999432189950708]
    c = cfg("imagenet64_ct")
    assert (c.loss.end_scales, c.optim.lr, c.train.total_steps) == (200, 1e-4, 800_000)
    assert (c.sample.ts, c.sample.steps) == ([0, 106, 200], 201)
    c = cfg("cifar10_ict")
    assert (c.loss.mode, c.loss.metric, c.loss.ict_s0, c.loss.ict_s1) == ("ict", "pseudo_huber", 10, 1280)
    assert c.net.overrides["dropout"] == 0.3
    c = cfg("cifar10_ect")  # locuslab/ect run_ecm.sh: 200k steps of batch 128, 8 stages
    assert (c.loss.mode, c.loss.metric, c.loss.huber_c, c.loss.ect_weighting) == (
        "ect", "pseudo_huber", 0.0, "inverse_gap")
    assert (c.loss.p_mean, c.loss.p_std, c.loss.ect_q, c.loss.ect_k, c.loss.ect_b) == (
        -1.1, 2.0, 2.0, 8.0, 1.0)
    assert (c.loss.ect_stage_steps, c.train.total_steps, c.train.global_batch) == (
        25_000, 200_000, 128)
    assert (c.optim.name, c.optim.lr, c.net.overrides["dropout"], c.ema.rates) == (
        "radam", 1e-4, 0.2, [0.9999])
    assert c.loss.teacher and c.net.preset == "tiny32"
    for name, mode in (("imagenet64_sct", "sct"), ("imagenet64_scd", "scd")):
        c = cfg(name)  # the sCM paper's ImageNet 64 stabilisers and two-step time
        assert (c.loss.mode, c.loss.scm_p_mean, c.loss.scm_p_std, c.loss.tangent_warmup,
                c.loss.tangent_norm, c.loss.adaptive_weight) == (mode, -0.8, 1.6, 10000, 0.1, True)
        assert (c.sample.trig_times, c.train.precision, c.data.class_cond) == ([1.1], "bf16", True)
        assert tuple(c.optim.betas) == (0.9, 0.99) and c.optim.weight_decay == 0.0
    c = cfg("imagenet64_scd")
    assert (c.loss.teacher_dropout, c.loss.init_from_teacher) == (0.1, False) and c.loss.teacher
    # the students take the gentle time input (ln sigma); sCD's teacher keeps the ADM one
    assert cfg("imagenet64_sct").net.overrides["noise_label_scale"] == 0.004
    assert c.net.overrides["noise_label_scale"] == 0.004
    assert c.loss.teacher_overrides == {"noise_label_scale": 1.0} and c.optim.lr == 1e-4


@pytest.mark.parametrize("override,message", [
    ("train.total_steps=abc", "train.total_steps: expected int"),
    ("loss.metric=l3", "loss.metric='l3'"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("ema.rates=[1.5]", "ema.rates"),
    ("sample.ts=[0,5000]", "sample.ts"),
    ("trian.seed=1", "unknown config key 'trian'"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("data.bad_input=ignore", "data.bad_input"),
    ("novalue", "not key=value"),
    ("loss.mode=ect", "loss.teacher: ECT tunes a pretrained EDM denoiser"),
    ("loss.ect_q=1", "loss.ect_q=1.0: must be > 1"),
    ("loss.ect_weighting=uniform", "loss.ect_weighting='uniform'"),
    ("data.channels=2", "data.channels=2: must be 1 or 3"),
    ("data.channels=0", "data.channels=0: must be 1 or 3"),
    ("net.overrides.in_channels=3", "net.overrides.in_channels=3: the data has data.channels=1"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        cfg("quickstart", override)


def test_grey_data_gives_the_network_one_channel_and_round_trips(tmp_path):
    c = load_config(None, ["data.channels=1"])
    assert c.net.overrides["in_channels"] == 1  # what builds the network, teacher and exports
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(c))
    assert load_config(str(path)).to_dict() == c.to_dict()
    assert load_config(None, []).net.overrides.get("in_channels") is None  # RGB: as before
    for key in ("in_channels", "out_channels"):  # disagreeing explicit values
        with pytest.raises(ConfigError, match=f"net.overrides.{key}=3: the data has "
                                              f"data.channels=1; set data.channels instead"):
            load_config(None, ["data.channels=1", f"net.overrides.{key}=3"])
        with pytest.raises(ConfigError, match=f"net.overrides.{key}=1: the data has "
                                              f"data.channels=3"):
            load_config(None, [f"net.overrides.{key}=1"])


def test_the_quickstarts_are_grey_and_cd_distils_on_18_levels():
    teacher, cd = cfg("quickstart_teacher"), cfg("quickstart_cd")
    for c in (teacher, cd, cfg("quickstart")):
        assert (c.data.channels, c.net.overrides["in_channels"]) == (1, 1)
    assert (cd.loss.num_scales, cd.sample.ts, cd.sample.steps) == (18, [0, 9, 17], 18)


def test_teacher_overrides_build_the_teacher_apart_from_the_student(tmp_path):
    """sCD/CD with a student that does not start from the teacher may differ from it, e.g. a
    gentle time embedding for a teacher with the ADM one: loss.teacher_overrides builds the
    teacher, net.overrides the student; a student that starts from the teacher may not."""
    import torch

    from cmscale.methods.cd import build_teacher
    from cmscale.networks import create_unet
    from cmscale.weights import save_state_dict

    path = str(tmp_path / "teacher.safetensors")
    save_state_dict(create_unet("tiny16", noise_label_scale=1.0).state_dict(), path)
    c = load_config(None, ["loss.mode=scd", f"loss.teacher={path}",
                           "loss.teacher_overrides.noise_label_scale=1.0"])
    assert c.loss.teacher_overrides == {"noise_label_scale": 1.0}
    assert build_teacher(c, torch.device("cpu")).model.noise_label_scale == 1.0
    assert PRESETS["tiny16"]["noise_label_scale"] == 0.004 and "noise_label_scale" not in c.net.overrides
    with pytest.raises(ConfigError, match="loss.teacher_overrides"):
        load_config(None, ["loss.mode=scd", f"loss.teacher={path}", "loss.init_from_teacher=true",
                           "loss.teacher_overrides.noise_label_scale=1.0"])
    same = load_config(None, ["loss.mode=scd", f"loss.teacher={path}", "loss.init_from_teacher=true",
                              "net.overrides.noise_label_scale=1.0",
                              "loss.teacher_overrides.noise_label_scale=1.0"])
    assert same.loss.teacher_overrides == same.net.overrides == {"noise_label_scale": 1.0}


def test_overrides_reach_nested_fields():
    c = cfg("quickstart", "net.overrides.dropout=0.2", "ema.rates=0.9,0.99", "train.precision=bf16",
            "sample.ema=ema_0_9", "eval.ema=ema_0_99")
    assert c.net.overrides["dropout"] == 0.2
    assert c.ema.rates == [0.9, 0.99]
    assert c.train.precision == "bf16"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_every_loss_mode_is_a_method():
    from cmscale.config import CHOICES
    from cmscale.methods import METHODS

    assert set(CHOICES["loss.mode"]) == set(METHODS)


def test_run_configs_with_the_retired_fault_injection_key_still_load(tmp_path):
    """Older versions wrote ``train.inject_nan_at: []`` into every run's config.yaml."""
    import yaml

    written = yaml.safe_load(dump_config(load_config(None, [])))
    written["train"]["inject_nan_at"] = []
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(written))
    assert load_config(str(path)) == load_config(None, [])
    with pytest.raises(ConfigError, match="inject_nan_at"):
        load_config(None, ["train.inject_nan_at=[1]"])


def test_ect_student_is_the_teachers_network():
    c = cfg("quickstart", "loss.mode=ect", "loss.teacher=edm.safetensors")
    assert (c.loss.ect_q, c.loss.ect_k, c.loss.ect_b, c.loss.ect_stage_steps) == (2.0, 8.0, 1.0,
                                                                                  25_000)
    with pytest.raises(ConfigError, match="loss.huber_c=0.0: is pseudo-Huber's constant"):
        cfg("quickstart", "loss.metric=l2", "loss.huber_c=0")  # would be silently unused
    with pytest.raises(ConfigError, match="loss.teacher_preset='tiny32': the ECT student"):
        cfg("quickstart", "loss.mode=ect", "loss.teacher=edm.safetensors",
            "loss.teacher_preset=tiny32")


def test_ect_default_samplers_are_one_and_two_steps():
    from cmscale.methods import METHODS

    c = cfg("quickstart", "loss.mode=ect", "loss.teacher=edm.safetensors")
    got = [str(s) for s in METHODS["ect"].default_samplers(c)]
    assert got == ["onestep", "sigmas=80.0,0.821"]
    with pytest.raises(ConfigError, match="does not fit a 'ect' network"):
        cfg("quickstart", "loss.mode=ect", "loss.teacher=edm.safetensors",
            "eval.every_images=64", "eval.samplers=[edm]")
