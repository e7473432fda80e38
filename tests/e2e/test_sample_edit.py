"""`cmscale sample` and `cmscale edit`: loading, invariance to batch and world size, and that
every editing task keeps its known part.

Networks: a tiny16 UNet with random (non-zero) weights saved as a plain .pt, standing in for a
public reference checkpoint; the reference-made class-conditional fixture; a 2-step run for the
run-dir / checkpoint-dir / export paths; and an exact toy consistency function (Gaussian data)
where an assertion needs known values.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale import editing, imageio, runs, sample, schedules
from cmscale.networks import create_unet
from cmscale.sampling import PerImageNoise
from tests import support
from tests.support.launch import clean_env, free_port, train_subprocess

ROOT = str(support.REPO)
FIXTURES = str(support.FIXTURES / "unet")
LUMA = np.array(editing.LUMA)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The subprocesses run with OMP_NUM_THREADS=1; in-process runs that are compared with them
    # bit for bit must use the same GEMM partitioning.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def rand_pt(tmp_path_factory):
    """A plain state dict of tiny16 with random weights (the output layer is not zero)."""
    torch.manual_seed(1)
    net = create_unet("tiny16")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ref") / "tiny16_random.pt"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A 16 px digit, a colour image, a keep-left-half mask and the digit's 4x4 patch means."""
    from cmscale.data.images import center_crop_arr
    from cmscale.data.sources import EmbeddedSource

    d = tmp_path_factory.mktemp("img")
    digit = center_crop_arr(EmbeddedSource("sklearn:digits").load(0)[0], 16)
    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    colour[:4] = [250, 250, 10]  # pale and saturated: a plain replacement leaves the range
    mask = np.full((16, 16), 255, np.uint8)
    mask[4:12, 6:14] = 0
    low = np.rint(digit.astype(float).reshape(4, 4, 4, 4, 3).mean((1, 3))).astype(np.uint8)
    paths = {}
    for name, a in dict(digit=digit, colour=colour, mask=mask, low=low).items():
        paths[name] = str(d / f"{name}.png")
        Image.fromarray(a).save(paths[name])
    return paths


def png(path):
    return np.asarray(Image.open(path)).astype(np.float64)


def run_sample(out, ck, *extra):
    code = sample.main(["--checkpoint", str(ck), "--out", str(out), *map(str, extra)])
    assert code == 0
    return out


def same_files(a, b):
    """Every file under a equals (bytes) the same file under b, and the file lists agree."""
    la = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    lb = sorted(os.path.relpath(os.path.join(r, f), b) for r, _, fs in os.walk(b) for f in fs)
    assert la == lb
    for rel in la:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    return la


# ----------------------------------------------------------------------------- cmscale sample


def test_reference_pt_needs_its_preset_and_loads_strictly(rand_pt, tmp_path, capsys):
    net, info = runs.load_network(rand_pt, preset="tiny16")
    saved = torch.load(rand_pt, weights_only=True)
    assert info["source"] == "reference" and info["sigma_max"] == 80.0
    assert all(torch.equal(saved[k], v) for k, v in net.model.state_dict().items())
    assert sample.main(["--checkpoint", rand_pt, "--num", "1", "--out", str(tmp_path)]) == 2
    assert "--preset" in capsys.readouterr().err
    assert sample.main(["--checkpoint", rand_pt, "--preset", "tiny32", "--num", "1",
                        "--out", str(tmp_path)]) == 2
    assert "does not fit UNet preset 'tiny32'" in capsys.readouterr().err


def test_sample_writes_pngs_grid_and_evaluator_npz(rand_pt, tmp_path):
    out = run_sample(tmp_path / "s", rand_pt, "--preset", "tiny16", "--num", 5,
                     "--batch-size", 2, "--ts", "0,20,39", "--steps", 40)
    arrays = np.load(out / "samples.npz")
    assert arrays.files == ["arr_0"]  # unconditional: no labels
    a = arrays["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (5, 16, 16, 3)
    for i in range(5):
        assert np.array_equal(png(out / "images" / f"{i:06d}.png"), a[i])
    assert a.std() > 10  # not a constant image: the network does something
    assert (out / "grid.png").exists() and not list(out.glob(".parts*"))
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_sample_bitwise_identical_across_batch_sizes(rand_pt, tmp_path):
    common = ["--preset", "tiny16", "--num", 7, "--ts", "0,20,39", "--steps", 40]
    a = run_sample(tmp_path / "b3", rand_pt, *common, "--batch-size", 3, "--batch-invariant")
    b = run_sample(tmp_path / "b8", rand_pt, *common, "--batch-size", 8, "--batch-invariant")
    assert len(same_files(a, b)) == 7 + 3
    # Without --batch-invariant the call shape follows --batch-size, and float32 GEMMs round
    # differently for 3 and for 8 rows: the same noise, images equal up to a rare +-1 level.
    c = run_sample(tmp_path / "c8", rand_pt, *common, "--batch-size", 8)
    x, y = (np.load(p / "samples.npz")["arr_0"].astype(int) for p in (a, c))
    assert np.abs(x - y).max() <= 2 and (x != y).mean() < 0.01


@pytest.mark.dist
def test_sample_bitwise_identical_for_one_and_two_ranks(rand_pt, tmp_path):
    common = ["--checkpoint", rand_pt, "--preset", "tiny16", "--num-images", "8",
              "--batch-size", "3", "--ts", "0,20,39", "--steps", "40"]
    one = run_sample(tmp_path / "one", rand_pt, *common[2:])
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cmscale.sample", *common, "--out", str(tmp_path / "two")],
        env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # rank 1 made the odd indices, rank 0 assembled the npz and the grid
    assert len(same_files(one, tmp_path / "two")) == 8 + 3


def test_class_conditional_labels_per_index(tmp_path):
    # The reference-made fixture (its state dict came from openai/consistency_models' UNet).
    ck = os.path.join(FIXTURES, "tiny32_cond.pt")
    a = run_sample(tmp_path / "a", ck, "--preset", "tiny32_cond", "--num", 5, "--batch-size", 2)
    b = run_sample(tmp_path / "b", ck, "--preset", "tiny32_cond", "--num", 3, "--batch-size", 3,
                   "--class-cond-random")
    la, lb = np.load(a / "samples.npz")["arr_1"], np.load(b / "samples.npz")["arr_1"]
    assert la.dtype == np.int64 and la.shape == (5,) and np.array_equal(la[:3], lb)
    assert len(set(la.tolist())) > 1
    c = run_sample(tmp_path / "c", ck, "--preset", "tiny32_cond", "--num", 2, "--class", 3)
    assert np.load(c / "samples.npz")["arr_1"].tolist() == [3, 3]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    run = base / "run"
    train_subprocess(run, ["data.shards=embedded:sklearn:digits", "data.resolution=16",
                           "net.preset=tiny16", "train.total_steps=2", "train.global_batch=8",
                           "log.tensorboard=false", "optim.lr=1e-2"], base / "cache", timeout=300)
    return run


def test_run_dir_checkpoint_dir_and_export_sample_alike(run_dir, tmp_path):
    from cmscale import export

    ckpt = next((run_dir / "checkpoints").iterdir())
    exported = tmp_path / "online.safetensors"
    assert export.main([str(run_dir), "--ema", "online", "--out", str(exported)]) == 0
    args = ["--num", 4, "--sigmas", "80,0.8", "--ema", "online"]
    outs = [run_sample(tmp_path / name, ck, *args)
            for name, ck in [("run", run_dir), ("ckpt", ckpt), ("export", exported)]]
    same_files(outs[0] / "images", outs[1] / "images")
    same_files(outs[0] / "images", outs[2] / "images")
    # --ema by rate names the run's EMA
    net, info = runs.load_network(str(run_dir), "0.9999")
    assert info["network"] == "ema_0_9999" and info["nimg"] == 16


def test_exports_of_the_same_run_are_byte_identical(run_dir, tmp_path):
    # Separate processes: safetensors keeps its metadata in a per-process hash map.
    outs = []
    for i in range(2):
        out = tmp_path / f"e{i}.safetensors"
        subprocess.run([sys.executable, "-m", "cmscale.export", str(run_dir), "--out", str(out)],
                       env=clean_env(), cwd=ROOT, check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e0.safetensors"), "pt") as f:
        assert f.metadata()["preset"] == "tiny16"


# ----------------------------------------------------------------------------- helpers


def test_fixed_shape_net_pads_every_call_to_the_same_shape():
    shapes = []

    def net(x, sigma, labels):
        shapes.append((x.shape[0], sigma.shape[0], labels.shape[0]))
        return x * sigma.view(-1, 1) + labels.view(-1, 1)

    x, labels = torch.randn(7, 2), torch.arange(7)
    out = sample.FixedShapeNet(net, 3)(x, 2.0, labels)
    assert shapes == [(3, 3, 3)] * 3
    assert torch.equal(out, x * 2 + labels.view(-1, 1))


def test_npz_writer_streams_and_is_deterministic(tmp_path):
    a = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    p1, p2 = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    sample.write_npz(p1, {"arr_0": ((5, 2, 3), np.uint8, [a[:2], a[2:]]), "arr_1": np.arange(5)})
    sample.write_npz(p2, {"arr_0": a, "arr_1": np.arange(5)})
    d = np.load(p1)
    assert np.array_equal(d["arr_0"], a) and np.array_equal(d["arr_1"], np.arange(5))
    assert open(p1, "rb").read() == open(p2, "rb").read()


# ----------------------------------------------------------------------------- editing (CLI)


def run_edit(task, out, ck, *extra):
    code = editing.main([task, "--checkpoint", str(ck), "--preset", "tiny16", "--out", str(out),
                         *map(str, extra)])
    assert code == 0
    return [png(out / f"output_{i:03d}.png") for i in range(len(list(out.glob("output_*"))))]


def test_inpaint_keeps_unmasked_pixels_exactly(rand_pt, images, tmp_path):
    outs = run_edit("inpaint", tmp_path, rand_pt, "--image", images["digit"], "--mask",
                    images["mask"], "--num", 2)
    y, keep = png(images["digit"]), png(images["mask"]) >= 128
    for o in outs:
        assert np.array_equal(o[keep], y[keep])
        assert np.abs(o[~keep] - y[~keep]).mean() > 5  # the hole was filled by the model
    assert not np.array_equal(outs[0], outs[1])  # variants use their own noise streams
    assert (tmp_path / "side_by_side.png").exists() and (tmp_path / "input.png").exists()


def test_colorize_keeps_luminance(rand_pt, images, tmp_path):
    outs = run_edit("colorize", tmp_path, rand_pt, "--image", images["colour"], "--num", 2)
    y = png(images["colour"])
    for o in outs:
        # each channel is rounded to uint8 once: the luminance moves by <= 0.5 sum(LUMA)
        assert np.abs(o @ LUMA - y @ LUMA).max() <= 0.5 * LUMA.sum() + 1e-6
        assert (o.std(-1) > 1).mean() > 0.3  # the output has colour of its own
    grey = png(tmp_path / "input.png")
    assert np.abs(grey @ LUMA - y @ LUMA).max() <= 0.5 + 1e-6 and np.all(grey.std(-1) == 0)


def test_superres_keeps_patch_means_from_low_or_full_resolution(rand_pt, images, tmp_path):
    low = png(images["low"])
    for src in ("low", "digit"):
        outs = run_edit("superres", tmp_path / src, rand_pt, "--image", images[src],
                        "--factor", 4)
        for o in outs:
            means = o.reshape(4, 4, 4, 4, 3).mean((1, 3))
            full = png(images["digit"]).reshape(4, 4, 4, 4, 3).mean((1, 3))
            known = low if src == "low" else full
            assert np.abs(means - known).max() <= 0.5 + 1e-6
            assert o.reshape(4, 4, 4, 4, 3).std((1, 3)).mean() > 5  # texture inside patches


def test_stroke_and_denoise_outputs_are_the_algorithm_run_in_process(rand_pt, images, tmp_path):
    """The CLI's stroke and denoise outputs are the multistep loop written here from the
    module docstring: stroke from sketch + sigma z at --sigma, denoise from the noisy input with
    no noise added, then the default levels below sigma; written to uint8 as `sample` does."""
    s = run_edit("stroke", tmp_path / "s", rand_pt, "--image", images["digit"], "--sigma", 20)
    d = run_edit("denoise", tmp_path / "d", rand_pt, "--image", images["digit"], "--sigma", 0.5,
                 "--add-noise")
    noisy = png(tmp_path / "d" / "input.png")
    assert np.abs(noisy - png(images["digit"])).mean() > 20  # the input really was noised
    net, _ = runs.load_network(str(rand_pt), "", "tiny16")
    y = editing.load_image(images["digit"], 16)
    grid = schedules.karras_sigmas(40).tolist()
    for got, sigma, start, first_noise in (
            (s[0], 20.0, y, True),
            (d[0], 0.5, y + 0.5 * editing.corruption_noise(0, y.shape), False)):
        noise = PerImageNoise(0, range(1), (3, 16, 16))
        levels = [sigma] + [grid[t] for t in editing.EDIT_TS if grid[t] < sigma]
        x = start + sigma * noise.next() if first_noise else start
        for n, t in enumerate(levels):
            x0 = net(x, torch.full((1,), t), None).clamp(-1, 1)
            if n + 1 < len(levels):
                x = x0 + (levels[n + 1] ** 2 - 0.002**2) ** 0.5 * noise.next()
        want = imageio.to_uint8(x0).permute(0, 2, 3, 1).numpy()[0]
        assert np.array_equal(got, want.astype(np.float64)), sigma


def test_interpolation_ends_are_the_one_step_samples_of_both_seeds(rand_pt, tmp_path):
    outs = run_edit("interpolate", tmp_path / "i", rand_pt, "--seed-a", 3, "--seed-b", 4,
                    "--num", 5, "--batch-invariant")
    for seed, end in ((3, outs[0]), (4, outs[-1])):
        s = run_sample(tmp_path / f"s{seed}", rand_pt, "--preset", "tiny16", "--num", 1,
                       "--seed", seed)
        assert np.array_equal(png(s / "images" / "000000.png"), end)
    assert not np.array_equal(outs[2], outs[0]) and not np.array_equal(outs[2], outs[-1])


def test_edit_rejects_ts_that_renoise_after_the_last_replacement(rand_pt, images, tmp_path,
                                                                  capsys):
    code = editing.main(["colorize", "--checkpoint", rand_pt, "--preset", "tiny16", "--image",
                         images["digit"], "--out", str(tmp_path), "--ts", "0,20,30",
                         "--steps", "40"])
    assert code == 2 and "must end at steps - 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- editing (API)


class GaussianCM:
    """The exact consistency function of data ~ N(mu, s^2 I): the PF ODE is linear, so
    f(x, t) = mu + (x - mu) sqrt(s^2 + eps^2) / sqrt(s^2 + t^2), with f(x, eps) = x."""

    def __init__(self, mu=0.2, s=0.3, eps=0.002):
        self.mu, self.s, self.eps = mu, s, eps

    def __call__(self, x, t, labels=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        scale = (self.s**2 + self.eps**2) ** 0.5 / (self.s**2 + t**2) ** 0.5
        return self.mu + (x - self.mu) * scale


def test_denoise_starts_at_the_given_level_without_adding_noise():
    f = GaussianCM()
    y = torch.rand(1, 3, 8, 8) * 2 - 1 + 0.4 * torch.randn(1, 3, 8, 8)
    noise = PerImageNoise(0, [0], (3, 8, 8))
    out = editing.edit_sample(f, noise, [0.4], y, add_noise=False)
    assert torch.allclose(out, f(y, 0.4).clamp(-1, 1), atol=1e-6)
    # evaluating at another level (e.g. sigma_max) would shrink differently
    assert not torch.allclose(out, f(y, 80.0).clamp(-1, 1), atol=1e-3)


def test_stroke_starts_from_the_sketch_noised_to_sigma():
    f = GaussianCM()
    sketch = torch.rand(1, 3, 8, 8) * 2 - 1
    levels = editing.levels_from(20.0, editing.edit_levels())
    assert levels[0] == 20.0 and all(a > b for a, b in zip(levels, levels[1:]))
    out = editing.edit_sample(f, PerImageNoise(5, [0], (3, 8, 8)), [20.0], sketch)
    z0 = PerImageNoise(5, [0], (3, 8, 8)).next()
    assert torch.allclose(out, f(sketch + 20.0 * z0, 20.0).clamp(-1, 1), atol=1e-6)


def test_replacements_keep_known_coordinates_even_at_the_range_limits():
    torch.manual_seed(0)
    y = torch.rand(4, 3, 16, 16) * 2 - 1
    y[:, :, :4] = torch.tensor([0.96, 0.96, -0.92]).view(1, 3, 1, 1)  # pale yellow
    x0 = torch.randint(0, 2, (4, 3, 16, 16)).float() * 2 - 1  # extreme proposals
    v = torch.tensor(editing.LUMA).view(1, 3, 1, 1)
    c = editing.Colorize(y)(x0)
    assert c.abs().max() <= 1 + 1e-6
    assert torch.allclose((c * v).sum(1), (y * v).sum(1), atol=1e-5)
    low = editing.patch_means(y, 4)
    s = editing.SuperRes(low, 4)(x0)
    assert s.abs().max() <= 1 + 1e-6
    assert torch.allclose(editing.patch_means(s, 4), low, atol=1e-5)
    keep = (torch.rand(1, 1, 16, 16) > 0.5).float()
    i = editing.Inpaint(y, keep)(x0)
    assert torch.equal(i * keep, y * keep) and torch.equal(i * (1 - keep), x0 * (1 - keep))


def test_slerp_ends_are_exact_and_the_middle_keeps_the_norm():
    a, b = torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    assert torch.equal(editing.slerp(a, b, 0.0), a) and torch.equal(editing.slerp(a, b, 1.0), b)
    m = editing.slerp(a, b, 0.5)
    assert abs(m.norm() / a.norm() - 1) < 0.05 and not torch.allclose(m, (a + b) / 2)
