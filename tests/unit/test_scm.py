"""TrigFlow preconditioning, the EDM <-> TrigFlow conversion, the UNet's JVP, the sCT/sCD loss
against independent implementations, and TrigFlow sampling."""

import copy
import math

import pytest
import torch

from cmscale import losses
from cmscale.config import ConfigError, load_config
from cmscale.methods import METHODS, build_method, build_net
from cmscale.networks import (MLP, EDMPrecond, TrigFlowPrecond, create_unet, negate_output_layer,
                              sigma_to_trig, trig_to_sigma)
from cmscale.sampler import Sampler
from cmscale.sampling import PerImageNoise

SD = 0.5


def _randomise(net, std=0.05, seed=0):
    # the UNet's zero-initialised output layers would make F = 0 and every check trivial
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def _unet(dtype=torch.float32, **overrides):
    # attention at 8x8, scale-shift norm
    return _randomise(create_unet("tiny16", **overrides)).to(dtype)


# ----------------------------------------------------------------------------- TrigFlow precond


def test_time_conversion_exact_values():
    assert trig_to_sigma(torch.tensor(math.pi / 4, dtype=torch.float64)).item() == \
        pytest.approx(SD, rel=1e-15)
    assert sigma_to_trig(torch.tensor(SD, dtype=torch.float64)).item() == \
        pytest.approx(math.pi / 4, rel=1e-15)
    s = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(trig_to_sigma(sigma_to_trig(s)), s, rtol=1e-14, atol=0)


def test_trigflow_boundary_is_exact_and_pi_half_is_finite():
    net = TrigFlowPrecond(_unet())
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.0, 0.7, math.pi / 2])
    with torch.no_grad():
        f = net(x, t, trigflow=True)
        F, w = net(x, t, raw=True)
    assert torch.equal(f[0], x[0])  # cos 0 = 1, sin 0 = 0: bit-exact
    # at pi/2 only the network speaks: f = -sigma_d F (cos held at 0), finite
    torch.testing.assert_close(f[2], -SD * F[2], rtol=1e-6, atol=1e-7)
    assert torch.isfinite(f).all() and f[2].abs().max() > 0
    c = math.cos(0.7)
    torch.testing.assert_close(f[1], c * x[1] - math.sin(0.7) * SD * F[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(w, torch.zeros(3))  # the learned weighting starts uniform


def test_edm_teacher_is_the_trigflow_network_with_negated_output():
    raw = _unet(torch.float64)
    edm = EDMPrecond(copy.deepcopy(raw))
    trig = TrigFlowPrecond(negate_output_layer(copy.deepcopy(raw)))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    t = sigma_to_trig(sigma)
    with torch.no_grad():
        D = edm(x, sigma)
        # EDM's call protocol of the TrigFlow network: the same denoiser
        torch.testing.assert_close(trig(x, sigma), D, rtol=1e-12, atol=1e-12)
        # TrigFlow's own variables: f(cos t x, t) = D(x, sigma_d tan t)
        x_t = torch.cos(t)[:, None, None, None] * x
        torch.testing.assert_close(trig(x_t, t, trigflow=True), D, rtol=1e-12, atol=1e-12)
        # and F = -F_edm at the same time input
        F, _ = trig(x_t, t, raw=True)
        c_noise = 250 * torch.log(sigma)
        torch.testing.assert_close(F, -raw(x_t / SD, c_noise), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the UNet's JVP


@pytest.mark.parametrize("double_norm", [False, True], ids=["adagn", "double_norm"])
def test_unet_jvp_equals_reverse_mode_and_central_difference(double_norm):
    """F(x, t) of the TrigFlow UNet (attention, GroupNorm32, scale-shift, with and without
    adaptive double normalisation): the JVP along (u, v) equals <w, J (u, v)> by reverse mode
    and a central difference. float64 throughout (GroupNorm32 and the time embedding keep
    float64): 1e-9 relative; the difference has O(eps^2) error at eps = 1e-5."""
    torch.manual_seed(0)
    net = TrigFlowPrecond(_unet(torch.float64, double_norm=double_norm)).requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    u, v = torch.randn_like(x), torch.tensor([0.8, -0.5], dtype=torch.float64)

    def F(a, b):
        return net(a, b, raw=True)[0]

    with torch.no_grad():
        y, jvp = torch.func.jvp(F, (x, t), (u, v))
    assert jvp.abs().max() > 1e-3  # both inputs matter
    x_ = x.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    w = torch.randn_like(y)
    gx, gt = torch.autograd.grad((F(x_, t_) * w).sum(), (x_, t_))
    reverse = (gx * u).sum() + (gt * v).sum()
    assert (jvp * w).sum().item() == pytest.approx(reverse.item(), rel=1e-9)
    eps = 1e-5
    with torch.no_grad():
        fd = (F(x + eps * u, t + eps * v) - F(x - eps * u, t - eps * v)) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-8)


def test_unet_jvp_under_bf16_autocast_matches_fp32():
    """The same JVP in float32 and under bf16 autocast (the GroupNorm, embedding and output
    layer stay float32): bf16's 8-bit mantissa allows a few percent."""
    net = TrigFlowPrecond(_unet()).requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.4, 1.2])
    tangents = (torch.randn_like(x), torch.tensor([0.8, -0.5]))

    def F(a, b):
        return net(a, b, raw=True)[0]

    with torch.no_grad():
        _, ref = torch.func.jvp(F, (x, t), tangents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, low = torch.func.jvp(F, (x, t), tangents)
    assert low.dtype == torch.float32
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.03, rel


def test_double_norm_makes_each_block_blind_to_its_embedding_magnitude():
    """Adaptive double normalisation: each ResBlock's scale and shift are divided by their RMS
    over channels, so scaling a block's embedding projection by c > 0 leaves F unchanged (it
    changes F without the option); the parameters are the same, and it needs scale-shift."""
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([-1.0, 2.0])
    outs = {}
    for double_norm in (False, True):
        net = _unet(double_norm=double_norm).eval()
        with torch.no_grad():
            before = net(x, labels)
            for name, p in net.named_parameters():
                if ".emb_layers." in name:
                    p.mul_(7.0)
            outs[double_norm] = (before, net(x, labels))
    before, after = outs[True]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    before, after = outs[False]
    assert (after - before).abs().max() > 1e-2
    plain, double = create_unet("tiny16"), create_unet("tiny16", double_norm=True)
    assert plain.state_dict().keys() == double.state_dict().keys()
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        create_unet("tiny16", use_scale_shift_norm=False, double_norm=True, allow_time_blind=True)


def test_sct_tangent_under_fp16_autocast_is_computed_in_fp32():
    """Under fp16 autocast (DDP's fp16 step) the loss's JVP leaves fp16 and gives the fp32
    tangent to float rounding; the same JVP taken in fp16 is off by ~1e-3 relative (and can
    overflow). DeepSpeed's fp16 (fp16 weights) is refused for sct/scd."""
    net = TrigFlowPrecond(_unet()).requires_grad_(False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 1.2])
    dxdt = torch.randn_like(x)
    loss = losses.SCMLoss()
    with torch.no_grad():
        ref = loss.tangent(net, x, t, dxdt, None)
        with torch.autocast("cpu", dtype=torch.float16):
            ours = loss.tangent(net, x, t, dxdt, None)
            cs = (torch.cos(t) * torch.sin(t))

            def F_of(a, b):
                return net(a, b, None, trigflow=True, raw=True)[0]
            half = torch.func.jvp(F_of, (x, t), (cs.reshape(-1, 1, 1, 1) * dxdt, cs))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (half[1] - ref[1]).norm() / ref[1].norm() > 1e-4  # what fp16 would have given
    with pytest.raises(ConfigError, match="fp16"):
        load_config(None, ["loss.mode=sct", "train.backend=deepspeed", "train.zero_stage=2",
                           "train.precision=fp16"])


# ----------------------------------------------------------------------------- the loss


def _toy(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return _randomise(TrigFlowPrecond(MLP(dim=2, hidden=32, depth=2, emb_dim=16)), 0.3,
                      seed).to(dtype)


def _draws(loss, x0, seed):
    """The loss's own random draws (t, then z) for ``seed``."""
    torch.manual_seed(seed)
    t = loss.sample_t(x0.shape[0], x0.device, x0.dtype)
    z = torch.randn_like(x0) * SD
    return t, z


def _grads(net, fn):
    net.zero_grad(set_to_none=True)
    fn().sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in net.model.parameters()])


@pytest.mark.parametrize("distill", [False, True], ids=["sct", "scd"])
def test_scm_gradient_equals_the_discrete_ct_loss_with_a_tiny_step(distill):
    """Without normalisation (c >> ||g||, then times c) and weighting, the sCT/sCD gradient
    is that of the discrete-time pair loss cos t / (sigma_d sin t) ||f(x_t, t) - f-(x_{t-dt},
    t - dt)||^2 / (dt D) as dt -> 0 (x_{t-dt} on the same pair for sCT, an Euler step of the
    teacher for sCD). float64, dt = 1e-6: agreement to 1e-4 relative."""
    net = _toy()
    teacher = _toy(seed=1).requires_grad_(False) if distill else None
    c = 1e6
    scm = losses.SCMLoss(teacher, tangent_norm=c, tangent_warmup=0, adaptive_weight=False)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    g_scm = _grads(net, lambda: (torch.manual_seed(3), scm(net, x0))[1]) * c

    t, z = _draws(scm, x0, 3)
    dt = 1e-6

    def discrete():
        cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
        x_t = cos * x0 + sin * z
        with torch.no_grad():
            if distill:
                x_prev = x_t - dt * SD * teacher(x_t, t, trigflow=True, raw=True)[0]
            else:
                x_prev = torch.cos(t - dt)[:, None] * x0 + torch.sin(t - dt)[:, None] * z
            f_prev = net(x_prev, t - dt, trigflow=True)
        d = net(x_t, t, trigflow=True) - f_prev
        weight = torch.cos(t) / (SD * torch.sin(t) * dt)
        return weight * (d**2).mean(dim=1)

    g_ref = _grads(net, discrete)
    assert g_ref.norm() > 1e-3
    torch.testing.assert_close(g_scm, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())


@pytest.mark.parametrize("norm_over,prior", [("all", False), ("rms", False), ("all", True),
                                              ("rms", True)])
def test_scm_loss_equals_an_explicit_finite_difference_tangent(norm_over, prior):
    """The whole loss as configured (warm-up r, g / (||g|| + c) with ||g|| over all entries or
    their RMS, the optional prior weighting 1 / (sigma_d tan t), learned weight) against the
    same formula written with f's finite-difference time derivative along the trajectory
    instead of the rearranged JVP of F: values and gradients (weights and w) to 1e-6."""
    net = _toy()
    with torch.no_grad():
        net.weight.linear.bias.fill_(0.3)
        net.weight.linear.weight.normal_(0, 0.1)
    scm = losses.SCMLoss(tangent_warmup=10, tangent_norm=0.1, tangent_norm_over=norm_over,
                         prior_weight=prior)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    step, r = 4, 0.4
    assert scm.warmup(step) == r

    def ours():
        torch.manual_seed(5)
        return scm(net, x0, step=step)

    t, z = _draws(scm, x0, 5)

    def explicit():
        cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
        x_t = cos * x0 + sin * z
        dxdt = cos * z - sin * x0
        F, w = net(x_t, t, raw=True)
        with torch.no_grad():
            F_ = net(x_t, t, raw=True)[0]
            h = 1e-6
            Fp = net(x_t + h * dxdt, t + h, raw=True)[0]
            Fm = net(x_t - h * dxdt, t - h, raw=True)[0]
            dF = (Fp - Fm) / (2 * h)  # dF-/dt along the trajectory
            # f = cos x_t - sin sd F: cos df/dt with the warm-up on the terms of t-derivative
            g = cos * (-cos * SD * F_ + cos * dxdt) - r * cos * sin * (x_t + SD * dF)
            size = g.norm(dim=1, keepdim=True)
            if norm_over == "rms":
                size = (g**2).mean(dim=1, keepdim=True).sqrt()
            g = g / (size + 0.1)
        lam = 1 / (SD * torch.tan(t)) if prior else 1.0
        return torch.exp(-w) * lam * ((F - F_ - g) ** 2).mean(dim=1) + w

    torch.testing.assert_close(ours(), explicit(), rtol=1e-6, atol=1e-9)
    params = list(net.parameters())
    ga = torch.autograd.grad(ours().sum(), params)
    gb = torch.autograd.grad(explicit().sum(), params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert ga[-1].abs().sum() > 0  # the weighting's bias learns


def test_scm_time_proposal_follows_the_lognormal():
    scm = losses.SCMLoss(p_mean=-0.8, p_std=1.6)
    torch.manual_seed(0)
    t = scm.sample_t(200_000, "cpu", torch.float64)
    tau = torch.log(SD * torch.tan(t))
    assert tau.mean().item() == pytest.approx(-0.8, abs=0.01)
    assert tau.std().item() == pytest.approx(1.6, abs=0.01)
    assert 0 < t.min() and t.max() < math.pi / 2


# ----------------------------------------------------------------------------- method, config


def test_sct_method_plugs_in_with_its_defaults():
    cfg = load_config(None, ["loss.mode=sct"])
    assert (cfg.loss.scm_p_mean, cfg.loss.scm_p_std, cfg.loss.tangent_warmup,
            cfg.loss.tangent_norm, cfg.loss.adaptive_weight, cfg.loss.tangent_norm_over,
            cfg.loss.prior_weight) == (-0.8, 1.6, 10000, 0.1, True, "all", False)
    net = build_net(cfg)
    assert isinstance(net, TrigFlowPrecond) and not METHODS["sct"].needs_target
    # the weighting is part of the network: optimizer, EMAs and checkpoints see it
    assert any(n.startswith("weight.") for n, _ in net.named_parameters())
    method = build_method(cfg, torch.device("cpu"))
    method.prepare(net)
    assert method.logs(2500) == {"r": 0.25}
    assert [str(s) for s in method.default_samplers(cfg)] == ["trig=max", "trig=max,1.1"]
    with pytest.raises(ConfigError, match="loss.teacher"):
        load_config(None, ["loss.mode=scd"])
    with pytest.raises(ConfigError, match="tangent_norm_over"):
        load_config(None, ["loss.mode=sct", "loss.tangent_norm_over=max"])
    options = build_method(load_config(None, ["loss.mode=sct", "loss.tangent_norm_over=rms",
                                              "loss.prior_weight=true"]), torch.device("cpu"))
    options.prepare(build_net(options.cfg))
    assert (options.loss_fn.tangent_norm_over, options.loss_fn.prior_weight) == ("rms", True)
    with pytest.raises(ConfigError, match="trig_times"):
        load_config(None, ["loss.mode=sct", "sample.trig_times=[1.1,1.2]"])


def test_scd_teacher_and_student_start_from_an_edm_file(tmp_path):
    from cmscale.weights import save_state_dict

    edm = _unet()
    path = str(tmp_path / "edm.pt")
    save_state_dict(edm.state_dict(), path)
    cfg = load_config(None, ["loss.mode=scd", f"loss.teacher={path}",
                             "loss.init_from_teacher=true"])
    torch.manual_seed(0)
    net = build_net(cfg)
    method = build_method(cfg, torch.device("cpu"))
    method.prepare(net)
    teacher = method.loss_fn.teacher
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 3.0])
    with torch.no_grad():
        D = EDMPrecond(edm)(x, sigma)
        torch.testing.assert_close(teacher(x, sigma), D, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(x, sigma), D, rtol=1e-5, atol=1e-5)
    loss = method.loss(net, net, torch.rand(2, 3, 16, 16) * 2 - 1, None, None, step=3)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


# ----------------------------------------------------------------------------- sampling


def test_trig_sampler_spec_round_trips_and_fits_only_trigflow_networks():
    s = Sampler.parse("trig=max,1.1")
    assert s.times == (math.pi / 2, 1.1) and s.nfe == 2 and str(s) == "trig=max,1.1"
    assert Sampler.parse(str(s)) == s
    s.check("sct")
    s.check("scd")
    with pytest.raises(ValueError, match="does not fit"):
        s.check("ct")
    with pytest.raises(ValueError, match="decreasing"):
        Sampler.parse("trig=1.1,max")
    assert Sampler.from_flags("sct") == Sampler("trig", times=(math.pi / 2,))
    assert Sampler.from_flags("sct", times="max,0.8").times == (math.pi / 2, 0.8)
    assert Sampler.from_flags("ct") == Sampler("onestep")
    assert Sampler.parse("trig=max").describe(0.002, 80.0) == dict(sampler="trigflow",
                                                                 times=[math.pi / 2])


def test_trig_sampling_is_f_of_sigma_d_z_at_pi_half_then_renoised():
    net = TrigFlowPrecond(_unet()).eval()
    noise = PerImageNoise(7, range(3), (3, 16, 16))
    one = Sampler.parse("trig=max").run(net, noise)
    z = PerImageNoise(7, range(3), (3, 16, 16))
    z0 = z.next()
    with torch.no_grad():
        expect = net(SD * z0, torch.full((3,), math.pi / 2), trigflow=True).clamp(-1, 1)
    torch.testing.assert_close(one, expect, rtol=0, atol=0)
    two = Sampler.parse("trig=max,1.1").run(net, PerImageNoise(7, range(3), (3, 16, 16)))
    x = math.cos(1.1) * expect + math.sin(1.1) * SD * z.next()
    with torch.no_grad():
        expect2 = net(x, torch.full((3,), 1.1), trigflow=True).clamp(-1, 1)
    torch.testing.assert_close(two, expect2, rtol=0, atol=0)


def test_time_input_t_feeds_the_scaled_trigflow_time():
    seen = []

    class Probe(torch.nn.Module):
        out = torch.nn.Sequential(torch.nn.Identity())

        def forward(self, x, noise_labels, class_labels=None):
            seen.append(noise_labels.clone())
            return torch.zeros_like(x)

    t = torch.tensor([0.0, 0.5, math.pi / 2])
    TrigFlowPrecond(Probe(), time_input="t").raw(torch.zeros(3, 2), t)
    TrigFlowPrecond(Probe()).raw(torch.zeros(3, 2), t)
    torch.testing.assert_close(seen[0], t * 2000 / math.pi)
    sigma = (SD * torch.tan(t.clamp(max=math.atan(80 / SD)))).double()
    # (t = 0: 1e-44 is a float32 denormal; only finiteness matters there)
    torch.testing.assert_close(seen[1][1:].double(), 250 * torch.log(sigma[1:]), rtol=1e-6,
                               atol=1e-3)
    assert torch.isfinite(seen[1]).all()
    cfg = load_config(None, ["loss.mode=sct", "net.time_input=t"])
    assert build_net(cfg).time_input == "t"
    with pytest.raises(ConfigError, match="time_input"):
        load_config(None, ["loss.mode=scd", "loss.teacher=x.pt", "loss.init_from_teacher=true",
                           "net.time_input=t"])


def test_trig_sampling_through_cmscale_sample_fixed_shape_wrapper():
    from cmscale.sample import FixedShapeNet

    net = TrigFlowPrecond(_unet()).eval()
    s = Sampler.parse("trig=max,1.1")
    direct = s.run(net, PerImageNoise(3, range(3), (3, 16, 16)))
    wrapped = s.run(FixedShapeNet(net, 2), PerImageNoise(3, range(3), (3, 16, 16)))
    torch.testing.assert_close(wrapped, direct, rtol=1e-5, atol=1e-6)


def test_periodic_fid_accepts_trig_samplers_only_for_trigflow_runs():
    ok = load_config(None, ["loss.mode=sct", "eval.every_images=64",
                            "eval.samplers=[trig=max,'trig=max,1.1']"])
    assert [Sampler.parse(t).nfe for t in ok.eval.samplers] == [1, 2]
    with pytest.raises(ConfigError, match="eval.samplers"):
        load_config(None, ["loss.mode=ct", "eval.every_images=64", "eval.samplers=[trig=max]"])


def test_steep_time_embedding_is_warned_about():
    """sCT/sCD with the ADM presets' time input (250 ln sigma into sinusoids of frequency up
    to 1) collapsed in our measurements: the trainer warns and names the fix; the gentle
    embedding (tiny16's noise_label_scale 0.004), CT and the toy MLP say nothing."""
    def warnings(overrides):
        cfg = load_config(None, ["net.preset=tiny16", "data.resolution=16", *overrides])
        method = build_method(cfg, torch.device("cpu"))
        method.prepare(build_net(cfg))
        return method.warnings()

    assert warnings(["loss.mode=sct"]) == []
    steep = warnings(["loss.mode=sct", "net.overrides.noise_label_scale=1.0"])
    assert len(steep) == 1 and "250 rad per unit of ln(sigma)" in steep[0]
    assert "net.overrides.noise_label_scale=0.004" in steep[0]
    t_input = warnings(["loss.mode=sct", "net.overrides.noise_label_scale=1.0",
                        "net.time_input=t"])
    assert len(t_input) == 1 and "637 rad per unit of t" in t_input[0]
    assert warnings(["loss.mode=ct", "net.overrides.noise_label_scale=1.0",
                     "train.total_steps=800000"]) == []
    method = build_method(load_config(None, ["loss.mode=sct"]), torch.device("cpu"))
    assert method.time_embedding_rate(TrigFlowPrecond(MLP(dim=2))) is None
