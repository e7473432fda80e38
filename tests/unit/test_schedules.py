import math

import pytest
import torch

from cmscale import schedules


def test_karras_grid_endpoints_and_formula():
    s = schedules.karras_sigmas(40)
    assert s.dtype == torch.float64 and s.shape == (40,)
    assert s[0].item() == 80.0
    assert s[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert torch.all(s[:-1] > s[1:])
    # middle point by hand: ((80^(1/7) + 0.5 (0.002^(1/7) - 80^(1/7)))^7 for 3 points
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert schedules.karras_sigmas(3)[1].item() == pytest.approx(mid, rel=1e-14)
    with pytest.raises(ValueError):
        schedules.karras_sigmas(1)


# The LSUN 256 CT settings of openai/consistency_models: s0 = 2, s1 = 150, K = 1M, mu0 = 0.95.
@pytest.mark.parametrize(
    "step,N,mu",
    [(0, 2, 0.9025), (10_000, 16, 0.9932), (100_000, 48, None), (500_000, 107, None),
     (1_000_000, 151, 0.99932)],
)
def test_ct_schedule_reference_table(step, N, mu):
    n, m = schedules.ct_schedule(step, 1_000_000, s0=2, s1=150, mu0=0.95)
    assert n == N
    if mu is not None:
        assert m == pytest.approx(mu, abs=5e-5)
    # mu uses N' = N - 1, not N (the reference's quirk that produced the paper's numbers)
    assert m == pytest.approx(math.exp(2 * math.log(0.95) / (n - 1)), rel=1e-15)


def test_ct_schedule_mu0_squared_at_start_and_monotone():
    assert schedules.ct_schedule(0, 10, 2, 150, 0.95) == (2, 0.95**2)
    values = [schedules.ct_schedule(k, 1000, 2, 150, 0.95) for k in range(0, 1001, 50)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        schedules.ct_schedule(0, 0, 2, 150, 0.95)


def test_cd_schedule_fixed():
    assert schedules.cd_schedule(0) == (40, 0.95)
    assert schedules.cd_schedule(123_456) == (40, 0.95)


def test_ict_curriculum_doubles_from_10_to_1280():
    K = 400_000
    k_prime = K // 8  # floor(K / (log2(1280/10) + 1))
    got = [schedules.ict_num_scales(k, K) for k in range(0, K + 1, k_prime)]
    assert got == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]
    assert schedules.ict_num_scales(k_prime - 1, K) == 11
    assert schedules.ict_schedule(0, K) == (11, 0.0)


def test_lognormal_index_probs_match_lognormal_mass():
    sigmas = schedules.karras_sigmas(11)
    p = schedules.lognormal_index_probs(sigmas, -1.1, 2.0)
    assert p.shape == (10,) and torch.all(p > 0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # Independent check with the normal CDF on ln(sigma).
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2))))
    raw = [cdf(sigmas[i].item()) - cdf(sigmas[i + 1].item()) for i in range(10)]
    total = sum(raw)
    for a, b in zip(p.tolist(), raw):
        assert a == pytest.approx(b / total, rel=1e-10)
    # the mode is near exp(P_mean) ~ 0.33: pairs straddling it get the most mass
    best = int(p.argmax())
    assert sigmas[best + 1] < 1.0 and sigmas[best] > 0.1


def test_ict_weights():
    # the 5-point Karras grid (rho 7) is 80, 17.527832, 2.5152190, 0.16975276, 0.002: the
    # weights are one over its gaps, one per pair index n = 0..3
    w = schedules.ict_weights(schedules.karras_sigmas(5))
    want = [1 / (80 - 17.527832), 1 / (17.527832 - 2.5152190), 1 / (2.5152190 - 0.16975276),
            1 / (0.16975276 - 0.002)]
    assert w.shape == (4,)
    assert torch.allclose(w, torch.tensor(want, dtype=w.dtype), rtol=1e-6)
    assert torch.all(w[1:] > w[:-1])  # smaller gaps at low noise weigh more


def test_target_horizon_warning_for_short_ct_runs():
    from cmscale.config import load_config
    from cmscale.methods import build_method

    def target_horizon_warning(overrides):
        return build_method(load_config(None, overrides), "cpu").target_horizon_warning()

    ref = ["loss.mode=ct", "loss.start_scales=2", "loss.end_scales=150", "loss.start_ema=0.95"]
    msg = target_horizon_warning(ref + ["train.total_steps=3000"])
    assert msg and "mu=0.9993" in msg and "1463 steps" in msg and "total_steps=3000" in msg
    assert target_horizon_warning(ref + ["train.total_steps=800000"]) is None
    # the quality benchmark's short-run CT (s1 20, mu0 0.9): horizon ~95 steps of 3000
    ok = ["loss.mode=ct", "loss.start_scales=2", "loss.end_scales=20", "loss.start_ema=0.9",
          "train.total_steps=3000"]
    assert target_horizon_warning(ok) is None
    assert target_horizon_warning(["loss.mode=ict", "train.total_steps=100"]) is None
    assert target_horizon_warning(["loss.mode=edm", "train.total_steps=100"]) is None


def test_ect_stage_advances_every_d_steps_from_stage_1():
    d = 25_000  # the paper's CIFAR-10 stage: 3.2M images at batch 128
    assert [schedules.ect_stage(k, d) for k in (0, 1, d - 1, d, 2 * d - 1, 2 * d, 199_999)] == [
        1, 1, 1, 2, 2, 3, 8]
    with pytest.raises(ValueError):
        schedules.ect_stage(0, 0)


def test_ect_mapping_function_exact_values():
    # r = max(0, t (1 - n(t) / q^a)), n(t) = 1 + k sigmoid(-b t); values worked by hand with
    # sigmoid(-1) = 1 / (1 + e) = 0.2689414213699951, sigmoid(-2) = 0.11920292202211755.
    t = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 80.0, 0.5], dtype=torch.float64)
    stage = [1, 3, 4, 1, 2, 1, 1]
    want = [0.0,                                          # n = 3.1515 > 2: clamped to 0
            1.0 - (1 + 8 * 0.2689414213699951) / 8,       # 0.6060585786300049
            1.0 - (1 + 8 * 0.2689414213699951) / 16,      # 0.8030292893150024
            2.0 * (1 - (1 + 8 * 0.11920292202211755) / 2),  # 0.04637662382305963
            2.0 * (1 - (1 + 8 * 0.11920292202211755) / 4),  # 1.0231883118847351
            40.0,                                         # sigmoid(-80) ~ 2e-35: n = 1
            0.0]
    got = [schedules.ect_r(t[i:i + 1], a).item() for i, a in enumerate(stage)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert want[1] == pytest.approx(0.6060585786300049, rel=1e-15)
    # the gap is t - r; it halves (q = 2) from stage to stage once r > 0
    g = [schedules.ect_gap(t[1:2], a).item() for a in (3, 4, 5)]
    assert g[0] == pytest.approx(2 * g[1], rel=1e-14) == pytest.approx(4 * g[2], rel=1e-14)
    # k = 0 is the constant mapping r = t (1 - q^-a); other q and b enter as written
    assert schedules.ect_r(t[:1], 2, q=2.0, k=0.0).item() == pytest.approx(0.75, rel=1e-15)
    want_q4 = 1.0 - (1 + 2.0 / (1 + math.exp(0.5))) / 4  # q 4, k 2, b 0.5 at t = 1
    assert schedules.ect_r(t[:1], 1, q=4.0, k=2.0, b=0.5).item() == pytest.approx(want_q4,
                                                                                  rel=1e-14)
    with pytest.raises(ValueError):
        schedules.ect_r(t, 0)


def test_ect_gap_stays_positive_below_float32_resolution():
    # With a large q (ECT's one-hour recipe uses q = 256) the gap t n(t) / q^a soon falls below
    # float32's resolution: at stage 4 it is 7e-10 at t = 1, and computed as t - r it would be
    # 0 and the weight 1/(t - r) infinite.
    t = torch.tensor([1.0])
    gap = schedules.ect_gap(t, 4, q=256.0)
    assert gap.item() == pytest.approx((1 + 8 * 0.2689414213699951) / 2**32, rel=1e-6)
    assert (t - schedules.ect_r(t, 4, q=256.0)).item() == 0.0  # r itself rounds to t
    w = schedules.ect_weights(t, gap)
    assert torch.isfinite(w).all() and w.item() == pytest.approx(1 / gap.item(), rel=1e-6)


def test_ect_weights():
    t = torch.tensor([0.5, 2.0], dtype=torch.float64)
    gap = torch.tensor([0.25, 0.1], dtype=torch.float64)
    assert schedules.ect_weights(t, gap).tolist() == pytest.approx([4.0, 10.0], rel=1e-15)
    # karras: 1/t^2 + 1/sigma_data^2 = (t^2 + sd^2) / (t sd)^2
    assert schedules.ect_weights(t, gap, "karras").tolist() == pytest.approx(
        [1 / 0.25 + 4.0, 1 / 4.0 + 4.0], rel=1e-15)
    with pytest.raises(ValueError, match="weighting"):
        schedules.ect_weights(t, gap, "uniform")
