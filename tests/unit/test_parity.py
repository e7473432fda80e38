"""Parity with the reference implementation (openai/consistency_models), item by item.

Each test compares cmscale with an independent computation of what the reference does:
piq's LPIPS for the metric, the reference's fp16 loss-scale rule, a hand-written EDM Heun
solve, colourisation's Algorithm 4 start, and CT/CD loss values written out from the
algorithms' definitions.
"""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmscale import dist, losses, parallel
from cmscale.config import load_config

# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """Random VGG16 convolutions saved as a local torchvision-style weights file (features
    only: the classifier is not used), and random positive LPIPS head weights."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    heads = [torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    return features, str(path), heads


def _lpips(vgg, variant):
    _, path, heads = vgg
    metric = losses.LPIPS(weights=path, variant=variant)
    for lin, w in zip(metric.model.lins, heads):
        lin.model[-1].weight.data.copy_(w)
    return metric


@pytest.fixture(scope="module")
def reference_lpips(vgg):
    return _lpips(vgg, "reference")


def test_lpips_reference_variant_equals_piq(vgg, reference_lpips, monkeypatch):
    """Against piq's LPIPS as the reference builds it, on the same VGG16 and head weights
    (piq's download of both is patched to return them)."""
    import piq.perceptual

    features, _, heads = vgg
    monkeypatch.setattr(piq.perceptual, "vgg16",
                        lambda *a, **k: types.SimpleNamespace(features=copy.deepcopy(features)))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: [h.clone() for h in heads])
    piq_lpips = piq.LPIPS(replace_pooling=True, reduction="none")
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    # the reference's call: bilinear resize to 224 below 256 px, then [0, 1]
    up = lambda t: F.interpolate(t, size=224, mode="bilinear")
    want = piq_lpips((up(a) + 1) / 2.0, (up(b) + 1) / 2.0)
    got = reference_lpips(a, b)
    assert want.shape == got.shape == (2,)
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)
    # the lpips package's max pooling is another metric (what cmscale used before)
    old = _lpips(vgg, "lpips")(a, b)
    assert ((old - want).abs() / want).max() > 1e-3


def test_lpips_is_computed_in_fp32_under_autocast(reference_lpips):
    metric = reference_lpips
    torch.manual_seed(2)
    a, b = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    want = metric(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = metric(a, b)
        up = lambda t: F.interpolate(t, size=224, mode="bilinear") / 2 + 0.5
        low = metric.model(up(a), up(b), normalize=True).flatten()  # autocast reaching it
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6)
    assert ((low.float() - want).abs() / want).max() > 1e-5


def test_lpips_variant_is_checked():
    with pytest.raises(ValueError, match="variant"):
        losses.LPIPS(random_backbone=True, variant="vgg")


# ----------------------------------------------------------------------------- fp16 loss scale


def test_fp16_loss_scale_follows_the_reference_rule():
    """log2(scale) starts at 20, grows by 1e-3 per applied step, falls by 1 on overflow (the
    step skipped); the applied update is the unscaled gradient's; the state is saved exactly."""
    cfg = load_config(None, ["train.precision=fp16", "optim.name=adam", "optim.lr=0.1"])
    info = dist.DistInfo("none", 0, 1, 0, torch.device("cpu"), None)
    torch.manual_seed(0)
    net, twin = nn.Linear(4, 1), nn.Linear(4, 1)
    twin.load_state_dict(net.state_dict())
    backend = parallel.DDPBackend(net, torch.optim.Adam(net.parameters(), lr=0.1), cfg, info)
    plain = torch.optim.Adam(twin.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    lg = 20.0
    for step in range(5):
        assert backend.loss_scale.scale == 2.0**lg
        if step == 2:  # an overflow: halve, skip, nothing changes
            before = [p.clone() for p in net.parameters()]
            backend.backward(net(x).sum() * float("inf"))
            assert backend.step() is False
            assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
            lg -= 1.0
            continue
        backend.backward(net(x).pow(2).mean())
        assert backend.step() is True
        twin(x).pow(2).mean().backward()
        plain.step()
        plain.zero_grad()
        lg += 1e-3
        for a, b in zip(net.parameters(), twin.parameters()):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert backend.loss_scale.log2_scale == lg  # the same float sums as the reference's
    assert math.isclose(lg, 20 + 4e-3 - 1, rel_tol=1e-12)
    saved = backend.state()["scaler"]
    fresh = parallel.DDPBackend(nn.Linear(4, 1), torch.optim.Adam(net.parameters()), cfg, info)
    fresh.restore({"scaler": saved}, None)
    assert fresh.loss_scale.log2_scale == lg  # bit for bit, growth included
    fresh.restore({"scaler": {"scale": torch.tensor(2.0**19)}}, None)  # an older checkpoint
    assert fresh.loss_scale.log2_scale == 19.0


def test_fp16_loss_scale_doubles_per_1000_steps_not_2000():
    s = parallel.LossScale(2.0**20)
    for _ in range(1000):
        s.update(True)
    assert s.scale == pytest.approx(2.0**21, rel=1e-9)
    cfg = load_config(None, ["train.precision=fp16", "train.backend=deepspeed",
                             "train.zero_stage=1"])
    ds = parallel.deepspeed_config(cfg, 4, 1, 1)
    assert ds["fp16"]["loss_scale_window"] == 1000 and ds["fp16"]["initial_scale_power"] == 20


# ----------------------------------------------------------------------------- EDM sampler


def test_edm_heun_two_steps_by_hand_with_clamped_estimates():
    """edm_sample(num_steps=2): Heun from sigma_max to sigma_min, then Euler to 0, with every
    denoised estimate clamped to [-1, 1] (the reference's clip_denoised), written out by hand."""
    from cmscale import solvers

    def D(x, sigma, class_labels=None):  # a denoiser whose estimates leave [-1, 1]
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        return torch.tanh(x / (s**2 + 1).sqrt()) + 0.4 * torch.sin(3 * x)

    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s0, s1 = 3.0, 0.3  # the Karras grid of 2 levels is (sigma_max, sigma_min)
    c = lambda v: v.clamp(-1, 1)
    x0 = s0 * z
    d0 = (x0 - c(D(x0, torch.full((6,), s0, dtype=torch.float64)))) / s0
    x_e = x0 + (s1 - s0) * d0
    d1 = (x_e - c(D(x_e, torch.full((6,), s1, dtype=torch.float64)))) / s1
    x1 = x0 + (s1 - s0) * (d0 + d1) / 2
    d2 = (x1 - c(D(x1, torch.full((6,), s1, dtype=torch.float64)))) / s1
    want = (x1 + (0.0 - s1) * d2).clamp(-1, 1)
    assert ((want > -1) & (want < 1)).float().mean() > 0.5  # not a saturated comparison
    got = solvers.edm_sample(D, z, num_steps=2, sigma_min=s1, sigma_max=s0)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # clamping only the output (the old behaviour) gives another result
    old = solvers.edm_sample(D, z, num_steps=2, sigma_min=s1, sigma_max=s0, clamp=False)
    assert (old.clamp(-1, 1) - want).abs().max() > 1e-2


def test_edm_sampler_default_is_the_reference_40_steps():
    from cmscale import solvers
    from cmscale.sampler import Sampler

    assert Sampler.parse("edm").steps == 40 and Sampler.parse("edm").nfe == 79
    assert Sampler.from_flags("edm").steps == 40
    calls = []

    def D(x, sigma, class_labels=None):
        calls.append(1)
        return torch.zeros_like(x)

    solvers.edm_sample(D, torch.zeros(1, 2))
    assert len(calls) == 79


# ----------------------------------------------------------------------------- editing


def test_colorize_starts_from_algorithm_4_state():
    """The start is A^-1[(A y)(1 - Omega)] with A the reference's QR colour basis: the
    luminance coordinate of y, the two chroma coordinates zero."""
    import numpy as np

    from cmscale import editing

    m = np.eye(3)
    m[:, 0] = np.asarray(editing.LUMA) / np.linalg.norm(editing.LUMA)
    Q = torch.from_numpy(np.linalg.qr(m)[0])
    Q = -Q if Q[:, 0].sum() < 0 else Q  # the reference's orthogonal matrix
    torch.manual_seed(0)
    y = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    coords = torch.einsum("bchw,cd->bdhw", y, Q)
    coords[:, 1:] = 0
    want = torch.einsum("bdhw,cd->bchw", coords, Q)
    c = editing.Colorize(y)
    assert torch.allclose(c.start(), want, atol=1e-12)
    assert not torch.allclose(c.shown(), want, atol=1e-2)  # the grey is shown, not started from
    # the first network input is that start plus t_1 z
    seen = []

    def net(x, sigma, labels=None):
        seen.append(x.clone())
        return torch.zeros_like(x)

    from cmscale.sampling import PerImageNoise

    noise = PerImageNoise(0, range(2), (3, 4, 4), dtype=torch.float64)
    editing.edit_sample(net, noise, [80.0], c.start(), c)
    z = PerImageNoise(0, range(2), (3, 4, 4), dtype=torch.float64).next()
    assert torch.allclose(seen[0], want + 80.0 * z, atol=1e-10)


# ----------------------------------------------------------------------------- loss values


class ConvNet(nn.Module):
    """A small image network with dropout, same protocol as the UNet (noise labels, classes)."""

    def __init__(self, dropout=0.0, num_classes=0):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.emb = nn.Embedding(num_classes, 3) if num_classes else None

    def forward(self, x, noise_labels, class_labels=None):
        h = self.conv(x) * torch.cos(noise_labels[:, None, None, None] / 100)
        if self.emb is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        return self.drop(h)


def _nets(dropout=0.0, num_classes=0):
    from cmscale.networks import ConsistencyPrecond

    torch.manual_seed(0)
    net = ConsistencyPrecond(ConvNet(dropout, num_classes)).train()
    target = ConsistencyPrecond(ConvNet(dropout, num_classes)).train()  # other weights
    return net, target


def test_ct_loss_value_at_a_fixed_random_state():
    from tests.support import reference

    net, target = _nets(dropout=0.3)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    torch.manual_seed(5)
    got = losses.CTLoss("l2")(net, x, num_scales=10, target=target)
    torch.manual_seed(5)
    want = reference.pair_loss(net, target, x, 10)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert want.std() > 0.1 * want.mean()  # per-sample values, not a constant
    got.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for p in target.parameters())  # the target gets no gradient


def test_cd_loss_value_and_labels_reach_the_teacher():
    """CD at a fixed random state against the hand-written Heun step; the teacher sees the
    class labels in both of its evaluations."""
    from cmscale.networks import EDMPrecond
    from tests.support import reference

    net, target = _nets(num_classes=5)
    torch.manual_seed(1)
    teacher = EDMPrecond(ConvNet(num_classes=5)).eval()
    seen = []

    def spy(x, sigma, class_labels=None):
        seen.append(class_labels)
        return teacher(x, sigma, class_labels)

    x = torch.rand(6, 3, 8, 8) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(7)
    got = losses.CDLoss(spy, solver="heun")(net, x, num_scales=18, class_labels=y,
                                            target=target)
    assert len(seen) == 2 and all(s is y for s in seen)
    torch.manual_seed(7)
    want = reference.pair_loss(net, target, x, 18, teacher=teacher, labels=y)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    torch.manual_seed(7)
    other = reference.pair_loss(net, target, x, 18, labels=y,
                                teacher=lambda a, s, c: teacher(a, s, (c + 1) % 5))
    assert not torch.allclose(other, want, rtol=1e-3)  # the labels matter to the value
    torch.manual_seed(7)
    euler = losses.CDLoss(teacher, solver="euler")(net, x, num_scales=18, class_labels=y,
                                                   target=target)
    assert not torch.allclose(euler, want, rtol=1e-3)


def test_ict_weight_reaches_the_loss():
    """iCT: the per-sample loss is 1/(sigma_n - sigma_{n+1}) times the pseudo-Huber distance
    of the online and stop-gradient online outputs, n from the lognormal index law."""
    from cmscale import schedules
    from tests.support import reference

    net, _ = _nets(dropout=0.3)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    loss = losses.ICTLoss()
    probs = schedules.lognormal_index_probs(schedules.karras_sigmas(11)).float()
    torch.manual_seed(3)
    got = loss(net, x, num_scales=11)
    torch.manual_seed(3)
    want = reference.pair_loss(
        net, net, x, 11, metric=reference.pseudo_huber,
        index=lambda B: torch.multinomial(probs, B, replacement=True),
        weight=lambda s, n: (1 / (s[:-1].double() - s[1:].double())).float()[n])
    assert torch.allclose(got, want, rtol=1e-5)
    torch.manual_seed(3)
    unweighted = reference.pair_loss(
        net, net, x, 11, metric=reference.pseudo_huber,
        index=lambda B: torch.multinomial(probs, B, replacement=True))
    assert not torch.allclose(got, unweighted, rtol=1e-2)
