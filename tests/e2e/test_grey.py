"""Grey data (``data.channels=1``): one-channel networks train, checkpoint, resume, sample and
edit, and what they write is exactly grey.

The runs are tiny (8 px digits, batch 8, 2-3 steps) and trained in this process; the commands
after them (export, sample, edit) are the CLIs' ``main`` functions.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale import dist, editing, export, runs, sample
from cmscale.config import load_config
from cmscale.training_loop import Trainer

GREY = ["data.channels=1", "data.resolution=8", "net.overrides.image_size=8",
        "net.overrides.attention_resolutions=[4]", "data.num_workers=0", "train.global_batch=8",
        "ema.rates=[0.9]", "log.progress_bar=false", "log.tensorboard=false",
        "sample.num_grid=4", "optim.lr=1e-2", "train.total_steps=2", "log.every_steps=1"]


def train(run_dir, *overrides) -> int:
    try:
        return Trainer(load_config(None, GREY + list(overrides)), str(run_dir)).run()
    finally:
        dist.shutdown()


def rgb(path) -> np.ndarray:
    img = Image.open(path)
    assert img.mode == "RGB", path
    return np.asarray(img)


def assert_grey(a: np.ndarray, what):
    """R == G == B everywhere, and not one flat value (something was drawn)."""
    assert a.shape[-1] == 3, what
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), what
    assert a.std() > 1, what


@pytest.fixture(scope="module")
def grey_runs(tmp_path_factory):
    """edm (resumed from 2 to 3 steps), its export, cd from it, ict and sct: one channel each."""
    base = tmp_path_factory.mktemp("grey")
    assert train(base / "edm", "loss.mode=edm") == 0
    assert train(base / "edm", "loss.mode=edm", "train.total_steps=3") == 0  # resumes
    teacher = str(base / "edm.safetensors")
    assert export.main([str(base / "edm"), "--out", teacher]) == 0
    assert train(base / "cd", "loss.mode=cd", f"loss.teacher={teacher}",
                 "loss.init_from_teacher=true", "loss.num_scales=18") == 0
    assert train(base / "ict", "loss.mode=ict", "loss.metric=pseudo_huber") == 0
    assert train(base / "sct", "loss.mode=sct", "loss.tangent_warmup=2") == 0
    return base


def test_one_channel_runs_train_resume_and_load_with_one_channel(grey_runs):
    steps = {"edm": 3, "cd": 2, "ict": 2, "sct": 2}
    for mode, step in steps.items():
        net, info = runs.load_network(str(grey_runs / mode))
        assert info["step"] == step, mode  # edm: resumed from its step-2 checkpoint
        assert (net.model.in_channels, net.model.out_channels) == (1, 1), mode
        x = torch.randn(2, 1, 8, 8)
        assert net(x, torch.full((2,), 2.0)).shape == (2, 1, 8, 8), mode
        grids = sorted((grey_runs / mode / "samples").glob("grid-*.png"))
        assert grids, mode
        for g in grids:
            assert_grey(rgb(g), g)
    with open(grey_runs / "edm" / "metrics.jsonl") as f:  # resumed, not restarted
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    net, info = runs.load_network(str(grey_runs / "edm.safetensors"))  # the export knows too
    assert net.model.in_channels == 1 and info["mode"] == "edm"


def test_resuming_a_grey_run_as_rgb_is_refused(grey_runs, tmp_path):
    shutil.copytree(grey_runs / "ict", tmp_path / "ict")  # the trainer rewrites config.yaml
    with pytest.raises(ValueError, match="data.channels differ"):
        train(tmp_path / "ict", "loss.mode=ict", "loss.metric=pseudo_huber", "data.channels=3",
              "train.total_steps=3")


def test_sampled_pngs_and_npz_of_a_grey_model_are_exactly_grey(grey_runs, tmp_path):
    for mode in ("cd", "edm"):
        out = tmp_path / mode
        assert sample.main(["--checkpoint", str(grey_runs / mode), "--num", "5", "--out",
                            str(out), "--batch-size", "2"]) == 0
        a = np.load(out / "samples.npz")["arr_0"]
        assert a.shape == (5, 8, 8, 3)
        assert_grey(a, mode)
        for i in range(5):
            png = rgb(out / "images" / f"{i:06d}.png")
            assert np.array_equal(png, a[i])
        assert_grey(rgb(out / "grid.png"), "grid")


def test_editing_a_grey_model_reads_grey_and_refuses_colorization(grey_runs, tmp_path, capsys):
    image = np.full((8, 8, 3), 40, np.uint8)
    image[2:6, 3:5] = [200, 220, 180]  # colour: read as its luminance
    Image.fromarray(image).save(tmp_path / "image.png")
    mask = np.full((8, 8), 255, np.uint8)
    mask[:, 4:] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    ck = str(grey_runs / "cd")
    assert editing.main(["inpaint", "--checkpoint", ck, "--image", str(tmp_path / "image.png"),
                         "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "inp")]) == 0
    out = rgb(tmp_path / "inp" / "output_000.png")
    assert_grey(out, "inpaint")
    luma = np.asarray(Image.fromarray(image).convert("L"))
    assert np.array_equal(out[:, :4, 0], luma[:, :4])  # the kept half is the input's grey
    code = editing.main(["colorize", "--checkpoint", ck, "--image", str(tmp_path / "image.png"),
                         "--out", str(tmp_path / "col")])
    assert code == 2 and "colorize needs a colour network (3 channels)" in capsys.readouterr().err
