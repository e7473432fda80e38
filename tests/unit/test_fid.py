"""Distributed FID (cmscale.metrics): agreement with clean-fid, world-size independence, the
offline digits evaluator, statistics files and their settings, the Inception loading path."""
from __future__ import annotations

import operator
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from cmscale.metrics import features as F
from cmscale.metrics import fid as M
from tests.support import REPO

ROOT = str(REPO)


def _rand_net(dim: int = 16, seed: int = 0, k: int = 23) -> nn.Module:
    """A small random-weight feature network (k x k patches; 23 for the 299 x 299 input), cheap on CPU."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, dim, k, stride=k), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return net.eval()


def _save_pngs(folder, images_nchw):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images_nchw):
        Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).save(os.path.join(folder, f"{i:05d}.png"))


@pytest.fixture(scope="module")
def digits16():
    return F.digits_images(16)


@pytest.fixture(scope="module")
def digits_extractor():
    return F.DigitsExtractor()  # trained once (seconds) into $CMSCALE_CACHE or ~/.cache/cmscale


# ----------------------------------------------------------------------------
# clean-fid agreement


@pytest.mark.parametrize("shape", [(8, 8), (32, 32), (17, 40), (310, 300)])
def test_clean_resize_is_cleanfids(shape):
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    theirs = np.stack([build_resizer("clean")(im) for im in imgs]).transpose(0, 3, 1, 2)
    ours = F.CleanResize(299)(torch.from_numpy(imgs).permute(0, 3, 1, 2)).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


def test_fid_matches_cleanfid_compute_fid(tmp_path, digits16):
    from cleanfid import fid as cfid

    x, _ = digits16
    rng = np.random.default_rng(1)
    noisy = np.clip(x[100:200].astype(int) + rng.integers(-40, 41, x[100:200].shape), 0, 255).astype(np.uint8)
    _save_pngs(tmp_path / "a", x[:100])
    _save_pngs(tmp_path / "b", noisy)
    net = _rand_net()

    def fn(t):  # what clean-fid calls: float B x 3 x 299 x 299 in [0, 255]
        with torch.no_grad():
            return net(t)

    theirs = cfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=fn,
                              device=torch.device("cpu"), num_workers=0, batch_size=32, verbose=False)
    ex = F.CustomExtractor(fn, name="rand16", dim=16)
    sa = M.compute_stats_from_folder(str(tmp_path / "a"), ex, batch_size=16, num_workers=0)
    sb = M.compute_stats_from_folder(str(tmp_path / "b"), ex, batch_size=40, num_workers=1)
    ours = M.fid_from_stats(sa, sb).fid
    assert theirs > 1e-3
    assert ours == pytest.approx(theirs, rel=1e-3)
    # the moments themselves agree to float64 rounding (clean-fid: np.mean / np.cov of its features)
    feats = cfid.get_folder_features(str(tmp_path / "a"), fn, num_workers=0, batch_size=32,
                                     device=torch.device("cpu"), mode="clean", verbose=False)
    np.testing.assert_allclose(sa.mean(), feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sa.cov(), np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-10)
    assert sa.settings["image_resolution"] == 16 and sa.count == 100


def test_frechet_and_kid_match_cleanfid():
    from cleanfid.fid import frechet_distance as cf_fd
    from cleanfid.fid import kernel_distance as cf_kid

    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(cf_fd(mu1, s1, mu2, s2), rel=1e-12)
    # Fewer samples than dimensions (singular covariances, as with small FID runs).
    f1, f2 = np.maximum(a[:40] @ rng.normal(size=(12, 64)), 0), np.maximum(b[:40] @ rng.normal(size=(12, 64)), 0)
    m1, c1, m2, c2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    assert M.frechet_distance(m1, c1, m2, c2) == pytest.approx(cf_fd(m1, c1, m2, c2), rel=1e-8)
    assert M.frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-6 * np.trace(c1))
    with pytest.raises(ValueError, match="non-finite"):
        M.frechet_distance(mu1, s1 * np.nan, mu2, s2)
    # subsets of the full size are permutations: the unbiased MMD is then exactly clean-fid's
    assert M.kernel_distance(a, b, num_subsets=3) == pytest.approx(cf_kid(a, b, num_subsets=3), rel=1e-10)
    c = np.random.default_rng(3).normal(size=(300, 12))  # same distribution as a: KID near 0
    assert abs(M.kernel_distance(a, c, num_subsets=5)) < 0.05 * M.kernel_distance(a, b, num_subsets=5)
    p, r = M.precision_recall(a, a)
    assert p == r == 1.0
    p, r = M.precision_recall(a, a + 100.0)
    assert p == r == 0.0


# ----------------------------------------------------------------------------
# world-size independence: a real 2-process gloo run against 1 process

N_GEN = 101  # odd: ranks get different counts


def _generate(indices: torch.Tensor) -> torch.Tensor:
    """Images seeded per index (16 x 16 float in [-1, 1]): the same image whatever the rank/batch."""
    out = []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(1000 + i)
        out.append(torch.rand(3, 16, 16, generator=g) * 2 - 1)
    return torch.stack(out)


def _small_extractor():
    return F.CustomExtractor(_rand_net(8, seed=3, k=4), name="rand8", dim=8, input_size=16,
                             resize="bilinear-antialias")


def _stats_arrays(stats):
    return {"mu": stats.mean(), "sigma": stats.cov(), "count": np.asarray(stats.count), "kept": stats.kept(),
            "res": np.asarray(stats.settings.get("image_resolution", 0))}


def _dist_worker(rank: int, world: int, tmp: str, folder: str):
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        ex = _small_extractor()
        gen = M.compute_stats_from_generator(_generate, N_GEN, ex, batch_size=7, max_kept=40)
        fold = M.compute_stats_from_folder(folder, ex, batch_size=5, num_workers=0, max_kept=30)
        fid = M.fid_from_stats(gen, fold, kid=True, pr=True)
        out = {f"gen_{k}": v for k, v in _stats_arrays(gen).items()}
        out.update({f"fold_{k}": v for k, v in _stats_arrays(fold).items()})
        out["fid"] = np.asarray([fid.fid, fid.kid, fid.precision, fid.recall])
        np.savez(os.path.join(tmp, f"rank{rank}.npz"), **out)
    finally:
        tdist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path, digits16):
    import torch.multiprocessing as mp

    x, _ = digits16
    folder = str(tmp_path / "imgs")
    _save_pngs(folder, x[:37])
    mp.spawn(_dist_worker, args=(2, str(tmp_path), folder), nprocs=2, join=True)

    ex = _small_extractor()
    gen = M.compute_stats_from_generator(_generate, N_GEN, ex, batch_size=16, max_kept=40)
    fold = M.compute_stats_from_folder(folder, ex, batch_size=64, num_workers=0, max_kept=30)
    one = M.fid_from_stats(gen, fold, kid=True, pr=True)
    assert gen.count == N_GEN and len(gen.kept()) == 40 and fold.count == 37 and len(fold.kept()) == 30
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as r:
            for prefix, s in (("gen", gen), ("fold", fold)):
                ref = _stats_arrays(s)
                assert int(r[f"{prefix}_count"]) == int(ref["count"])
                assert int(r[f"{prefix}_res"]) == int(ref["res"]) == 16
                np.testing.assert_allclose(r[f"{prefix}_mu"], ref["mu"], rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(r[f"{prefix}_sigma"], ref["sigma"], rtol=1e-10, atol=1e-14)
                np.testing.assert_array_equal(r[f"{prefix}_kept"], ref["kept"])  # same images kept
            np.testing.assert_allclose(r["fid"], [one.fid, one.kid, one.precision, one.recall], rtol=1e-8)


# ----------------------------------------------------------------------------
# the offline digits evaluator


def test_digits_extractor_separates_real_from_noise(digits_extractor, digits16):
    ex = digits_extractor
    assert ex.info["test_accuracy"] > 0.95 and ex.dim == 64
    x, _ = digits16
    perm = np.random.default_rng(0).permutation(len(x))
    half_a, half_b = torch.from_numpy(x[perm[:898]]), torch.from_numpy(x[perm[898:]])
    noise = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (898, 3, 16, 16), dtype=np.uint8))
    sa = M.compute_stats_from_images([half_a[:500], half_a[500:]], ex)
    sb = M.compute_stats_from_images([half_b], ex)
    sn = M.compute_stats_from_images([noise], ex)
    real = M.fid_from_stats(sa, sb, kid=True).fid
    fake = M.fid_from_stats(sn, sb).fid
    assert real < 0.05 * fake, (real, fake)
    # float [-1, 1] input is quantised to the same uint8 images: same features
    xf = half_b[:8].float() / 127.5 - 1
    torch.testing.assert_close(ex(xf), ex(half_b[:8]), rtol=0, atol=0)
    # other resolutions are resized to 16; 32 px digits land close to the 16 px ones
    x32 = torch.from_numpy(F.digits_images(32)[0][perm[:898]])
    s32 = M.compute_stats_from_images([x32], ex)
    assert s32.settings["image_resolution"] == 32
    with pytest.raises(M.StatsMismatchError, match="image_resolution"):
        M.fid_from_stats(s32, sb)
    s32.settings["image_resolution"] = 16  # compare anyway: much closer than noise
    assert M.fid_from_stats(s32, sb).fid < 0.2 * fake


def test_extractors_read_grey_images_as_rgb_with_tied_channels(digits_extractor, digits16):
    """A one-channel (grey) model's samples, uint8 or float: the features of the same images
    stored as RGB (the embedded digits' reference statistics), for the digits CNN and for the
    299 px clean-resize path of Inception (a random network in its place)."""
    x = torch.from_numpy(digits16[0][:6])  # (6, 3, 16, 16), tied channels
    grey = x[:, :1]
    clean = F.CustomExtractor(_rand_net(), name="rand", dim=16)
    for ex in (digits_extractor, clean):
        want = ex(x)
        torch.testing.assert_close(ex(grey), want, rtol=0, atol=0)
        torch.testing.assert_close(ex(grey.float() / 127.5 - 1), want, rtol=0, atol=0)
    s1 = M.compute_stats_from_generator(lambda idx: grey[idx].float() / 127.5 - 1, 6,
                                        digits_extractor, batch_size=6)
    s3 = M.compute_stats_from_images([x], digits_extractor)
    np.testing.assert_array_equal(s1.mean(), s3.mean())
    assert s1.settings == s3.settings  # comparable with RGB reference statistics


# ----------------------------------------------------------------------------
# statistics files and settings


def test_stats_file_roundtrip_and_settings_mismatch(tmp_path):
    ex = _small_extractor()
    s = M.compute_stats_from_generator(_generate, 30, ex, batch_size=8, max_kept=10)
    path = tmp_path / "ref.npz"
    s.save(path)
    r = M.load_stats(path)
    np.testing.assert_array_equal(r.mean(), s.mean())
    np.testing.assert_array_equal(r.cov(), s.cov())
    np.testing.assert_array_equal(r.kept(), s.kept())
    assert r.count == 30 and r.settings == s.settings
    assert M.fid_from_stats(s, r).fid == pytest.approx(0.0, abs=1e-8)
    with np.load(path) as z:  # plain npz: clean-fid reads mu and sigma
        assert str(z["resize"]) == "bilinear-antialias" and int(z["feature_dim"]) == 8

    other = F.CustomExtractor(_rand_net(8, seed=3), name="rand8", dim=8, input_size=299, resize="clean")
    s2 = M.compute_stats_from_generator(_generate, 30, other, batch_size=8)
    with pytest.raises(M.StatsMismatchError, match="resize.*input_resolution"):
        M.fid_from_stats(s2, r)
    with pytest.raises(M.StatsMismatchError, match="input_resolution"):
        M.compute_fid_from_generator(_generate, 30, other, r)
    np.savez(tmp_path / "cleanfid.npz", mu=s.mean(), sigma=s.cov())  # no settings recorded
    with pytest.raises(M.StatsMismatchError, match="no evaluator settings"):
        M.load_stats(tmp_path / "cleanfid.npz")
    assumed = M.load_stats(tmp_path / "cleanfid.npz", assume_settings=ex.settings())
    assert M.fid_from_stats(s, assumed).fid == pytest.approx(0.0, abs=1e-8)


# ----------------------------------------------------------------------------
# Inception


def test_missing_inception_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CMSCALE_INCEPTION", str(tmp_path / "nowhere" / "inception-2015-12-05.pt"))
    with pytest.raises(F.InceptionWeightsNotFound) as e:
        F.InceptionExtractor()
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and F.INCEPTION_URL in msg and "CMSCALE_INCEPTION" in msg
    monkeypatch.delenv("CMSCALE_INCEPTION")
    monkeypatch.setenv("CMSCALE_CACHE", str(tmp_path / "cache"))
    if not os.path.exists("/tmp/inception-2015-12-05.pt"):
        with pytest.raises(F.InceptionWeightsNotFound, match="(?s)cache/inception-2015-12-05.pt.*/tmp/"):
            F.InceptionExtractor()


def _conv_bn_net(out: int) -> nn.Sequential:
    net = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, out, 6))
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding changes the weights
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
        net[2].weight.uniform_(0.5, 1.5)
    return net.eval()


class _FakeInception(nn.Module):
    """Stands in for the TorchScript file: a `layers` module giving (B, 2048, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.layers = _conv_bn_net(2048)

    def forward(self, x):
        return self.layers(x)


def test_inception_extractor_matches_cleanfid_wrapper(tmp_path, digits16):
    import warnings

    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    torch.jit.script(_FakeInception().eval()).save(str(tmp_path / F.INCEPTION_FILE))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not applied")  # freezing must apply here
        ours = F.InceptionExtractor(str(tmp_path))  # a directory holding the file
    assert ours.settings()["extractor"] == "inception-2015-12-05" and ours.dim == 2048
    assert isinstance(ours.layers, F.ChunkedStages)  # a Sequential: frozen stage by stage
    plain = F.InceptionExtractor(str(tmp_path / F.INCEPTION_FILE), channels_last=False, optimize=False)
    theirs = InceptionV3W(str(tmp_path), download=False, resize_inside=False)
    x = torch.from_numpy(digits16[0][:4])
    with torch.no_grad():
        expect = theirs(F.CleanResize(299)(x))
    torch.testing.assert_close(plain(x), expect, rtol=0, atol=0)  # same operations as clean-fid
    got = ours(x)  # frozen, NHWC: float32 rounding only
    assert float((got - expect).abs().max() / expect.abs().max()) < 1e-5


def test_custom_extractor_optimisation_keeps_features(digits16):
    torch.manual_seed(0)
    net = nn.Sequential(_conv_bn_net(64), nn.Flatten())
    plain = F.CustomExtractor(net, name="cb", dim=64)
    fast = F.CustomExtractor(net, name="cb", dim=64, optimize=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.fn.modules())  # folded
    x = torch.from_numpy(digits16[0][:6])
    a, b = fast(x), plain(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5  # float32 rounding only


class _Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


def test_chunked_stages_keep_features_and_respect_skips(digits16):
    """On CPU the optimised network runs in stages over chunks of the batch: a large first
    activation (16 x 297 x 297 floats, 5.6 MB per image) gets small chunks, the rest the whole
    batch; no cut inside the residual block; features equal the plain network's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4),
                        _Residual(16), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 8)).eval()
    plain = F.CustomExtractor(net, name="r", dim=8)
    fast = F.CustomExtractor(net, name="r", dim=8, optimize=True)
    assert isinstance(fast.fn, F.ChunkedStages)
    assert fast.fn.chunks[0] == F.CHUNK_BYTES // (16 * 297 * 297 * 4) and fast.fn.chunks[-1] > 100
    gm = torch.fx.symbolic_trace(net)
    stages = F._chain_of_stages(gm)
    # The residual block (conv, then add of its input) is one stage, fed by the max pool.
    [block] = [st for st in stages if any(n.target is operator.add for n in st.graph.nodes)]
    ops = [(n.op, n.name) for n in block.graph.nodes]
    assert ops == [("placeholder", "_3"), ("call_module", "_4_conv"), ("call_function", "add"), ("output", "output")]
    assert len(stages) == 9
    x = torch.from_numpy(np.concatenate([digits16[0][:7]] * 2))  # 14 images: chunks of 5, 5, 4
    a, b = fast(x), plain(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    # an image's features do not depend on its neighbours in the batch
    torch.testing.assert_close(fast(x[3:4]), a[3:4], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# tools/ref_stats.py on a folder, a reference batch and shards of the same images


def test_ref_stats_tool_sources_agree(tmp_path, digits16, digits_extractor):
    from cmscale.data import ensure_embedded_shards

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import ref_stats

    x, _ = digits16
    np.savez(tmp_path / "batch.npz", arr_0=x.transpose(0, 2, 3, 1))
    _save_pngs(tmp_path / "folder", x)
    shards = ensure_embedded_shards("sklearn:digits", cache_dir=str(tmp_path / "cache"), resolution=16)
    outs = {}
    for name, src in (("npz", tmp_path / "batch.npz"), ("folder", tmp_path / "folder"), ("shards", shards)):
        out = tmp_path / f"{name}.npz"
        assert ref_stats.main([str(src), str(out), "--extractor", "digits", "--workers", "0",
                               "--batch-size", "256"]) == 0
        outs[name] = M.load_stats(out)
    for name in ("folder", "shards"):
        assert outs[name].count == outs["npz"].count == len(x)
        assert outs[name].settings == outs["npz"].settings
        # shards: the same images in another (shuffled) order, so other batches: same moments
        tol = 1e-9
        np.testing.assert_allclose(outs[name].mean(), outs["npz"].mean(), rtol=tol, atol=tol)
        np.testing.assert_allclose(outs[name].cov(), outs["npz"].cov(), rtol=tol, atol=tol)
    assert ref_stats.main([str(tmp_path / "batch.npz"), str(tmp_path / "x.npz"), "--extractor", "inception",
                           "--inception", str(tmp_path / "missing.pt")]) == 1
