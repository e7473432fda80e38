"""diffusers pipelines in and out, end to end.

A UNet2DModel written by diffusers itself (random weights, EDM scheduler) is the CD teacher of
a 2-step tiny32 run that starts from the teacher's weights (``loss.init_from_teacher``); the
run is exported with ``cmscale export --format diffusers``, loaded with
``ConsistencyModelPipeline.from_pretrained`` (offline) and sampled by both sides with the same
per-image noise. Tolerances: the UNet outputs agree to 2e-5 (float32 summation order), the
samples in [-1, 1] to 1e-4, and the 8-bit images of ``cmscale sample`` to one level (a value
within 1e-4 of a rounding boundary may round either way).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import ConsistencyModelPipeline, EDMEulerScheduler, UNet2DModel

from cmscale import export, runs, sample
from cmscale.sampler import Sampler
from cmscale.sampling import PerImageNoise
from tests import support
from tests.support.launch import train_subprocess

ROOT = str(support.REPO)
NUM = 4

# The tiny32 preset in diffusers' words, written without cmscale's converter.
TINY32 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 32),
              layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
              downsample_type="resnet", upsample_type="resnet", attention_head_dim=16,
              resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses: the same GEMM partitioning
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A diffusers folder made by diffusers: UNet2DModel (random weights) + EDM scheduler."""
    torch.manual_seed(3)
    unet = UNet2DModel(**TINY32)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("teacher") / "edm-diffusers"
    unet.save_pretrained(folder / "unet")
    EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5).save_pretrained(
        folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def cd_run(teacher, tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    run = base / "run"
    train_subprocess(run, ["data.shards=embedded:sklearn:digits", "data.resolution=32",
                           "net.preset=tiny32", "loss.mode=cd", f"loss.teacher={teacher}",
                           "loss.init_from_teacher=true", "train.total_steps=2",
                           "train.global_batch=4", "log.tensorboard=false", "optim.lr=1e-3"],
                     base / "cache")
    return run


@pytest.fixture(scope="module")
def exported(cd_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "cd-diffusers"
    assert export.main([str(cd_run), "--ema", "online", "--format", "diffusers",
                        "--out", str(out)]) == 0
    return out


def test_cmscale_reads_a_diffusers_teacher_as_the_same_function(teacher):
    net, info = runs.load_network(str(teacher))
    assert info["mode"] == "edm" and info["source"] == "diffusers"
    unet = UNet2DModel.from_pretrained(teacher / "unet").eval()
    x, t = torch.randn(2, 3, 32, 32), 250 * torch.log(torch.tensor([20.0, 0.05]))
    with torch.no_grad():
        torch.testing.assert_close(net.model(x, t), unet(x, t).sample, rtol=0, atol=2e-5)


def test_the_cd_student_started_from_the_diffusers_teacher(cd_run, teacher):
    # init_from_teacher read the folder: after 2 small steps the student is still close to it
    student, _ = runs.load_network(str(cd_run), "online")
    t_net, _ = runs.load_network(str(teacher))
    s, t = student.model.state_dict(), t_net.model.state_dict()
    assert s.keys() == t.keys()
    assert max((s[k] - t[k]).abs().max().item() for k in s) < 0.05


def test_export_loads_in_diffusers_and_samples_like_cmscale(cd_run, exported, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = ConsistencyModelPipeline.from_pretrained(str(exported))
    pipe.set_progress_bar_config(disable=True)
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["sigma_min"], sched["sigma_max"], sched["sigma_data"], sched["rho"],
            sched["num_train_timesteps"]) == (0.002, 80.0, 0.5, 7.0, 40)

    net, _ = runs.load_network(str(cd_run), "online")
    x, t = torch.randn(2, 3, 32, 32), 250 * torch.log(torch.tensor([80.0, 0.3]))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t).sample, net.model(x, t), rtol=0, atol=2e-5)

    for steps, spec, flags in [(1, "onestep", []),
                               (2, "ts=0,20,39/40", ["--ts", "0,20,39", "--steps", "40"])]:
        ours = Sampler.parse(spec).run(net, PerImageNoise(0, range(NUM), (3, 32, 32)))
        assert ours.std() > 0.05  # a real image, not a constant
        gens = PerImageNoise(0, range(NUM), (3, 32, 32)).generators  # same per-image streams
        theirs = pipe(batch_size=NUM, num_inference_steps=steps, generator=gens,
                      output_type="pt").images * 2 - 1
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
        out = tmp_path / f"s{steps}"
        assert sample.main(["--checkpoint", str(cd_run), "--ema", "online", "--num", str(NUM),
                            "--out", str(out), *flags]) == 0
        cli = np.load(out / "samples.npz")["arr_0"].astype(int)
        pipe_u8 = np.round((theirs.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(int)
        assert np.abs(cli - pipe_u8).max() <= 1


def test_cmscale_samples_the_exported_folder_like_the_run(cd_run, exported, tmp_path):
    outs = []
    for name, ck in [("run", cd_run), ("folder", exported)]:
        out = tmp_path / name
        assert sample.main(["--checkpoint", str(ck), "--ema", "online", "--num", str(NUM),
                            "--out", str(out), "--ts", "0,20,39", "--steps", "40"]) == 0
        outs.append(np.load(out / "samples.npz")["arr_0"])
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.slow  # about a minute: the digits extractor and 10 samplers
def test_compare_draws_teacher_and_student_with_their_fd(teacher, cd_run, tmp_path):
    from cmscale import compare

    result = compare.compare(str(teacher), str(cd_run), str(tmp_path / "cmp"), num=16,
                             batch_size=16)
    nfe = [(r["model"], r["nfe"]) for r in result["rows"]]
    assert nfe[-2:] == [("consistency model", 1), ("consistency model", 2)]
    assert sorted(n for m, n in nfe if m == "EDM teacher") == [1, 2, 3, 4, 5, 9, 19, 35]
    assert all(np.isfinite(r["fd"]) and r["fd"] > 0 for r in result["rows"])
    from PIL import Image

    assert Image.open(tmp_path / "cmp" / "compare.png").width >= 5 * 100


def test_exported_folder_is_a_cd_teacher_and_a_wrong_preset_is_named(exported, tmp_path):
    from cmscale.config import load_config
    from cmscale.methods.cd import build_teacher

    cfg = load_config(None, [f"loss.teacher={exported}", "loss.mode=cd", "net.preset=tiny32"])
    teacher = build_teacher(cfg, "cpu")
    net, _ = runs.load_network(str(exported))
    for k, v in net.model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v)
    cfg = load_config(None, [f"loss.teacher={exported}", "loss.mode=cd", "net.preset=tiny16"])
    with pytest.raises(ValueError, match="loss.teacher"):
        build_teacher(cfg, "cpu")
