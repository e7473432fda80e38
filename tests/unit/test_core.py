"""Preconditioning, losses, solvers, samplers, EMA and the exact toy."""

import math

import pytest
import torch
from torch import nn

from cmscale import losses, sampling, schedules, solvers
from cmscale.ema import ema_name, update_average
from cmscale.networks import MLP, ConsistencyPrecond, EDMPrecond, cm_scalings, edm_scalings
from cmscale.toy import GaussianMixture


class ConvNet(nn.Module):
    """A small image network with dropout, same protocol as the UNet."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, noise_labels, class_labels=None):
        return self.drop(self.conv(x) * torch.cos(noise_labels[:, None, None, None] / 100))


# ----------------------------------------------------------------------------- preconditioning


def test_cm_scalings_known_values():
    """Values worked out by hand: at sigma_min the identity; at sigma = sigma_data = 0.5 the
    norm sqrt(sigma^2 + sd^2) is 1/sqrt(2); at sigma_max c_out tends to sigma_data."""
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = cm_scalings(sigma)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # f(x, sigma_min) = x
    assert c_in[0].item() == pytest.approx(1 / math.sqrt(0.002**2 + 0.25), rel=1e-14)
    assert c_skip[1].item() == pytest.approx(0.25 / (0.498**2 + 0.25), rel=1e-14)  # shifted
    assert c_out[1].item() == pytest.approx(0.498 / math.sqrt(2), rel=1e-14)
    assert c_in[1].item() == pytest.approx(math.sqrt(2), rel=1e-14)
    assert c_skip[2].item() == pytest.approx(0.25 / 79.998**2, rel=1e-3)
    assert c_out[2].item() == pytest.approx(79.998 * 0.5 / math.sqrt(6400.25), rel=1e-14)
    assert c_in[2].item() == pytest.approx(1 / 80.0015625, rel=1e-6)
    e_skip, e_out, e_in = edm_scalings(sigma)  # the denoiser: no sigma_min shift
    assert e_skip[1].item() == pytest.approx(0.5, rel=1e-14)
    assert e_out[1].item() == pytest.approx(math.sqrt(2) / 4, rel=1e-14)
    assert e_in[1].item() == pytest.approx(math.sqrt(2), rel=1e-14)
    assert e_out[0].item() == pytest.approx(0.002 * 0.5 / math.sqrt(0.002**2 + 0.25), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_is_bitwise(dtype):
    torch.manual_seed(0)
    net = ConsistencyPrecond(ConvNet()).to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    out = net(x, torch.full((4,), 0.002, dtype=dtype))
    assert torch.equal(out, x)
    out = net(x, 0.002)  # scalar sigma
    assert torch.equal(out, x)
    # and not the identity elsewhere
    assert not torch.allclose(net(x, 1.0), x)


def test_boundary_condition_mlp_and_unet_like_under_bf16_autocast():
    torch.manual_seed(0)
    net = ConsistencyPrecond(MLP(dim=2, hidden=32, depth=2))
    x = torch.randn(16, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.full((16,), 0.002))
    assert out.dtype == torch.float32 and torch.equal(out, x)


def test_precond_passes_reference_time_input():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, noise_labels, class_labels=None):
            seen["x"], seen["t"], seen["y"] = x, noise_labels, class_labels
            return torch.zeros_like(x)

    net = EDMPrecond(Spy())
    x = torch.ones(2, 3, 4, 4)
    sigma = torch.tensor([1.0, 10.0])
    y = torch.tensor([3, 4])
    out = net(x, sigma, y)
    assert torch.allclose(seen["t"], 250 * torch.log(sigma))
    assert torch.allclose(seen["x"][1], torch.ones(3, 4, 4) / math.sqrt(100.25))
    assert seen["y"] is y
    assert torch.allclose(out[1], torch.full((3, 4, 4), 0.25 / 100.25))


# ----------------------------------------------------------------------------- metrics


def test_metrics():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.ones(2, 3, 4, 4)
    b[1] *= 2
    assert torch.allclose(losses.L2()(a, b), torch.tensor([1.0, 4.0]))
    assert torch.allclose(losses.L1()(a, b), torch.tensor([1.0, 2.0]))
    d = 48
    c = 0.00054 * math.sqrt(d)
    ph = losses.PseudoHuber()(a, b)
    # vector form: sqrt(||a-b||^2 + c^2) - c, not a per-element Huber
    assert ph[0].item() == pytest.approx(math.sqrt(48 + c * c) - c, rel=1e-6)
    assert ph[1].item() == pytest.approx(math.sqrt(4 * 48 + c * c) - c, rel=1e-6)
    with pytest.raises(ValueError, match="unknown metric"):
        losses.make_metric("l3")


def test_lpips_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        losses.LPIPS()
    with pytest.raises(FileNotFoundError, match="not found"):
        losses.LPIPS(weights=str(tmp_path / "nope.pth"))


def test_lpips_loads_local_vgg_file_and_resizes(tmp_path):
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    metric = losses.LPIPS(weights=str(path))
    # the backbone got exactly the file's weights
    assert torch.equal(getattr(metric.model.net.slice1, "0").weight, vgg.features[0].weight)
    assert torch.equal(getattr(metric.model.net.slice5, "28").weight, vgg.features[28].weight)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    d = metric(a, b)
    assert d.shape == (2,) and torch.all(d > 0)
    assert torch.allclose(metric(a, a), torch.zeros(2), atol=1e-6)
    # the [0, 1] mapping with normalize=True equals lpips' own [-1, 1] convention
    import torch.nn.functional as F

    up = lambda t: F.interpolate(t, size=224, mode="bilinear", align_corners=False)
    assert torch.allclose(d, metric.model(up(a), up(b)).flatten(), atol=1e-6)


# ----------------------------------------------------------------------------- losses


def test_ct_loss_is_zero_for_the_exact_consistency_function():
    """Data = one image c: every PF-ODE trajectory is the straight line c + sigma eps, so the
    exact consistency function is f(y, sigma) = c + (sigma_min / sigma)(y - c). Both points of
    every CT pair lie on one trajectory: the loss is zero; any other function is not."""
    smin = 0.002
    c = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1

    class Exact(nn.Module):
        def forward(self, y, sigma, class_labels=None):
            return c + (smin / sigma.double()).reshape(-1, 1, 1, 1) * (y - c)

    class Identity(nn.Module):
        def forward(self, y, sigma, class_labels=None):
            return y

    x = c.expand(16, -1, -1, -1).clone()
    torch.manual_seed(0)
    loss = losses.CTLoss("l2")(Exact(), x, num_scales=10)
    assert loss.shape == (16,) and loss.max().item() < 1e-12
    torch.manual_seed(0)
    assert losses.CTLoss("l2")(Identity(), x, num_scales=10).min().item() > 1e-8


def test_ct_pairs_use_the_same_noise_and_adjacent_sigmas():
    calls = []

    class Record(nn.Module):
        def forward(self, x, sigma, class_labels=None):
            calls.append((x.clone(), torch.as_tensor(sigma).clone()))
            return x

    x = torch.randn(6, 2)
    torch.manual_seed(1)
    losses.CTLoss("l2")(Record(), x, num_scales=5)
    (x_n, s_n), (x_next, s_next) = calls
    grid = schedules.karras_sigmas(5).float()
    idx = [int((grid - s).abs().argmin()) for s in s_n]
    assert all(grid[i + 1] == t for i, t in zip(idx, s_next))
    z1 = (x_n - x) / s_n[:, None]
    z2 = (x_next - x) / s_next[:, None]
    assert torch.allclose(z1, z2, atol=1e-4)


def test_cd_teacher_step_moves_along_the_exact_ode():
    gm = GaussianMixture.ring()
    calls = []

    class Record(nn.Module):
        def forward(self, x, sigma, class_labels=None):
            calls.append((x.clone(), torch.as_tensor(sigma).clone()))
            return x

    x = gm.sample(32).float()
    torch.manual_seed(2)
    losses.CDLoss(gm, solver="heun")(Record(), x, num_scales=40)
    (x_n, s_n), (x_next, s_next) = calls
    # Heun from sigma_n to sigma_{n+1} with the exact denoiser ~ a fine solve
    fine = torch.stack([gm.pf_ode_map(x_n[i:i + 1], s_n[i], steps=64, sigma_min=s_next[i])[0]
                        for i in range(32)])
    # on this seed Heun is within 2.4e-3 of the fine solve everywhere, Euler off by 9.8e-3:
    # the tolerance tells them apart
    assert torch.allclose(x_next.double(), fine, atol=4e-3)
    euler = torch.stack([solvers.euler_step(gm, x_n[i:i + 1], s_n[i], s_next[i])[0]
                         for i in range(32)])
    assert not torch.allclose(euler.double(), fine, atol=7e-3)
    with pytest.raises(ValueError):
        losses.CDLoss(gm, solver="rk4")


def test_online_and_target_share_dropout_masks():
    masks = []

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, sigma, class_labels=None):
            m = self.drop(torch.ones_like(x))
            masks.append(m)
            return x * m

    torch.manual_seed(0)
    net = Drop().train()
    losses.CTLoss("l2")(net, torch.randn(4, 64), num_scales=10)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])
    assert (masks[0] == 0).any()
    # the RNG is not rewound for the next step: a new mask is drawn
    losses.CTLoss("l2")(net, torch.randn(4, 64), num_scales=10)
    assert not torch.equal(masks[2], masks[0])


def test_ict_loss_weighting_and_index_distribution():
    torch.manual_seed(0)
    loss = losses.ICTLoss()
    n = loss.sample_index(11, 200_000, "cpu")
    freq = torch.bincount(n, minlength=10).double() / n.numel()
    p = schedules.lognormal_index_probs(schedules.karras_sigmas(11))
    assert torch.allclose(freq, p, atol=3e-3)
    assert isinstance(loss.metric, losses.PseudoHuber)
    net = ConsistencyPrecond(MLP(dim=2, hidden=16, depth=1))
    out = loss(net, torch.randn(8, 2), num_scales=11)
    assert out.shape == (8,) and torch.isfinite(out).all()
    out.mean().backward()  # the target branch is the same net under no_grad
    assert net.model.inp.weight.grad is not None


class NotABoundary(nn.Module):
    """f(x, sigma) with dropout and f(x, 0) != x: the ECT loss must apply the boundary itself."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.9))
        self.b = nn.Parameter(torch.tensor(0.1))
        self.drop = nn.Dropout(0.3)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        return self.drop(self.w * x / (1 + s) + self.b * torch.tanh(s) + 0.05)


@pytest.mark.parametrize("c,weighting", [(0.0, "inverse_gap"), (0.03, "inverse_gap"),
                                         (0.0, "karras")])
def test_ect_loss_matches_a_hand_computation(c, weighting):
    """ECTLoss at a fixed RNG state against the paper's formula written out by hand:
    t = exp(P_mean + P_std u), r = max(0, t (1 - n(t)/q^a)), one z for both points, the target
    the same network under the same dropout masks without gradient, x itself where r = 0."""
    B, stage, q, k, b = 16, 2, 2.0, 8.0, 1.0
    torch.manual_seed(1)
    x = torch.rand(B, 3, 4, 4) * 2 - 1
    net = NotABoundary().train()
    loss_fn = losses.ECTLoss(metric=losses.PseudoHuber(c=c), p_mean=-1.1, p_std=2.0, q=q, k=k,
                             b=b, weighting=weighting)
    torch.manual_seed(7)
    got = loss_fn(net, x, stage=stage)
    got.sum().backward()
    got_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    torch.manual_seed(7)
    u = torch.randn(B)
    t = [math.exp(-1.1 + 2.0 * v) for v in u.tolist()]
    r = [max(0.0, ti * (1 - (1 + k / (1 + math.exp(b * ti))) / q**stage)) for ti in t]
    assert any(ri == 0 for ri in r) and any(ri > 0 for ri in r)  # both cases are exercised
    z = torch.randn_like(x)
    tt, rr = torch.tensor(t), torch.tensor(r)
    state = torch.get_rng_state()
    online = net(x + tt.reshape(-1, 1, 1, 1) * z, tt)
    torch.set_rng_state(state)  # the target draws the online pass's dropout masks
    with torch.no_grad():
        target = net(x + rr.reshape(-1, 1, 1, 1) * z, rr)
    want = []
    for i in range(B):
        tgt = target[i] if r[i] > 0 else x[i]
        d = torch.sqrt(((online[i] - tgt) ** 2).sum() + c * c) - c
        w = 1 / (t[i] - r[i]) if weighting == "inverse_gap" else 1 / t[i] ** 2 + 1 / 0.5**2
        want.append(w * d)
    want = torch.stack(want)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    want.sum().backward()
    for g, p in zip(got_grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=2e-5, atol=1e-6)


def test_ect_loss_of_a_perfect_consistency_function_is_zero():
    """f(x + s z, s) = x for every s: every pair agrees (r > 0) or meets the boundary (r = 0)."""

    class Oracle(nn.Module):
        def __init__(self, x):
            super().__init__()
            self.x = x
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, xt, sigma, class_labels=None):
            return self.x + 0 * self.p

    torch.manual_seed(0)
    x = torch.randn(64, 2)
    out = losses.ECTLoss(metric=losses.PseudoHuber(c=0.01))(Oracle(x), x, stage=3)
    assert out.shape == (64,) and torch.all(out.abs() < 1e-6)


def test_edm_loss_weighting():
    torch.manual_seed(0)

    class Zero(nn.Module):
        def forward(self, x, sigma, class_labels=None):
            return torch.zeros_like(x)

    x = torch.full((5, 2), 0.5)
    torch.manual_seed(3)
    got = losses.EDMLoss()(Zero(), x)
    torch.manual_seed(3)
    sigma = schedules.edm_lognormal_sigmas(5)
    assert torch.allclose(got, (1 / sigma**2 + 4) * 0.25)


# ----------------------------------------------------------------------------- solvers/sampling


def test_edm_sampler_on_exact_denoiser_lands_on_modes():
    gm = GaussianMixture.ring(std=0.02)
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = solvers.edm_sample(gm, noise, num_steps=35)
    assert gm.nearest_mode_distance(x).mean() < 0.05
    x1 = solvers.edm_sample(gm, noise, num_steps=1)
    assert torch.allclose(x1, gm(noise * 80, 80.0).clamp(-1, 1))  # NFE 1: D(x_T)


def test_ts_semantics_match_the_reference_grid():
    levels, final = sampling.ts_to_sigmas([0, 62, 150], 151)
    grid = schedules.karras_sigmas(151)
    assert levels == pytest.approx([80.0, grid[62].item()], rel=1e-12)
    assert final == pytest.approx(0.002, rel=1e-12)
    with pytest.raises(ValueError):
        sampling.ts_to_sigmas([0], 151)
    with pytest.raises(ValueError):
        sampling.ts_to_sigmas([0, 200], 151)


def test_multistep_sampler_steps_and_noise():
    calls = []

    class Record(nn.Module):
        def forward(self, x, sigma, class_labels=None):
            calls.append((x.clone(), sigma.clone()))
            return torch.zeros_like(x)

    noise = sampling.PerImageNoise(seed=0, indices=range(4), shape=(2,))
    out = sampling.sample_ts(Record(), noise, [0, 62, 150], 151)
    assert len(calls) == 2  # NFE = len(ts) - 1
    assert torch.allclose(calls[0][1], torch.full((4,), 80.0))
    s62 = schedules.karras_sigmas(151)[62].item()
    # second input = x0 (zeros) + sqrt(s62^2 - smin^2) z
    ref = sampling.PerImageNoise(seed=0, indices=range(4), shape=(2,))
    z0, z1 = ref.next(), ref.next()
    assert torch.allclose(calls[0][0], 80 * z0)
    assert torch.allclose(calls[1][0], math.sqrt(s62**2 - 0.002**2) * z1)
    assert torch.equal(out, torch.zeros(4, 2))


def test_samples_do_not_depend_on_batch_size():
    torch.manual_seed(0)
    net = ConsistencyPrecond(MLP(dim=2, hidden=16, depth=1)).eval()
    full = sampling.sample_ts(net, sampling.PerImageNoise(7, range(10), (2,)), [0, 20, 39], 40)
    parts = [sampling.sample_ts(net, sampling.PerImageNoise(7, idx, (2,)), [0, 20, 39], 40)
             for idx in (range(0, 3), range(3, 10))]
    # Noise is bitwise per image; the network's batched matmuls may differ in the last ulp.
    assert torch.allclose(full, torch.cat(parts), atol=1e-6, rtol=0)
    z_full = sampling.PerImageNoise(7, range(10), (2,)).next()
    z_part = sampling.PerImageNoise(7, range(3, 10), (2,)).next()
    assert torch.equal(z_full[3:], z_part)
    one = sampling.sample_onestep(net, sampling.PerImageNoise(7, [4], (2,)))
    assert torch.allclose(one[0], sampling.sample_onestep(
        net, sampling.PerImageNoise(7, range(10), (2,)))[4], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- EMA


def test_ema_update_rule_and_names():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    a0 = a.weight.detach().clone()
    update_average(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * a0 + 0.1 * b.weight)
    update_average(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError):
        update_average(a, b, 1.0)
    rates = (0.9999, 0.99994, 0.9999432189950708)
    names = {ema_name(r) for r in rates}
    assert len(names) == 3 and "ema_0_9999" in names


# ----------------------------------------------------------------------------- sharded target


def _tiny_precond(dropout=0.1):
    from cmscale.networks import ConsistencyPrecond, create_unet

    torch.manual_seed(0)
    return ConsistencyPrecond(create_unet("tiny16", dropout=dropout)).train()


def test_sharded_target_matches_a_replicated_target_bitwise():
    from cmscale.ema import ShardedTarget, frozen_copy, update_average

    net = _tiny_precond()
    replicated = frozen_copy(net)
    sharded = ShardedTarget(net)
    halves = [ShardedTarget(net, rank=r, world_size=2) for r in (0, 1)]
    numel = sum(p.numel() for p in net.parameters())
    assert halves[0].local.numel() == -(-numel // 2)  # a rank holds half of the target
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.5, 2.0, 40.0])
    for mu in (0.9, 0.99, 0.0, 0.95):
        net(x, sigma).square().mean().backward()
        opt.step()
        opt.zero_grad()
        update_average(replicated, net, mu)
        sharded.update(mu)
        for h in halves:
            h.update(mu)
    flat = torch.cat([p.detach().reshape(-1) for p in replicated.parameters()])
    assert torch.equal(sharded.avg.full(), flat)
    assert torch.equal(torch.cat([h.local for h in halves])[:numel], flat)
    # the forward, in train mode with the same dropout draws, is the replicated target's
    torch.manual_seed(5)
    with torch.no_grad():
        want = replicated(x, sigma)
    torch.manual_seed(5)
    got = sharded(x, sigma)
    assert torch.equal(got, want) and not got.requires_grad
    sharded.release()
    assert sharded._flat is None
    # gathered into a plain network for evaluation / export
    into = sharded.gather(frozen_copy(net))
    for a, b in zip(into.parameters(), replicated.parameters()):
        assert torch.equal(a, b)
