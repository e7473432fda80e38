"""The exact toy is exact, and CD / iCT learn its probability-flow map."""

import pytest
import torch

from cmscale.networks import ConsistencyPrecond, MLP
from cmscale.toy import GaussianMixture, evaluate_toy, train_toy


def test_closed_form_denoiser_matches_monte_carlo_posterior_mean():
    gm = GaussianMixture.ring()
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(400_000, generator=g)
    for sigma in (0.15, 0.5, 2.0):
        x = torch.tensor([[0.5, 0.2], [-0.1, 0.0], [0.0, -0.7]], dtype=torch.float64)
        # E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(x; x0_i, sigma^2)
        logw = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)
        w = torch.softmax(logw, dim=1)
        mc = w @ x0
        assert torch.allclose(gm.denoise(x, sigma), mc, atol=5e-3), sigma


def test_pf_ode_map_is_deterministic_and_lands_on_the_data():
    gm = GaussianMixture.ring()
    z = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = gm.pf_ode_map(z * 80, 80.0, steps=256)
    b = gm.pf_ode_map(z * 80, 80.0, steps=512)
    assert torch.allclose(a, b, atol=2e-3)  # converged in the step count
    d = gm.nearest_mode_distance(b)
    # the ODE pushes noise onto the modes: distances like real samples' (std 0.05 -> ~0.063)
    assert 0.04 < d.mean() < 0.09


def test_cd_with_the_exact_teacher_learns_the_map():
    gm = GaussianMixture.ring()
    torch.manual_seed(0)
    untrained = evaluate_toy(ConsistencyPrecond(MLP()).eval(), gm, n=500)
    net, target = train_toy("cd", gm, steps=600, batch=256)
    r = evaluate_toy(net.eval(), gm, n=500)
    assert r["map_err"] < 0.12 and r["map_err"] < untrained["map_err"] / 4, r
    assert r["mode_dist_1"] < 0.2, r


def test_ict_from_samples_learns_the_map():
    gm = GaussianMixture.ring()
    torch.manual_seed(0)
    untrained = evaluate_toy(ConsistencyPrecond(MLP()).eval(), gm, n=500)
    net, _ = train_toy("ict", gm, steps=600, batch=256)
    r = evaluate_toy(net.eval(), gm, n=500)
    assert r["map_err"] < untrained["map_err"] / 2, (r, untrained)
    with pytest.raises(ValueError):
        train_toy("gan", gm, steps=1)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_toy_weighting_switch(method):
    """``adaptive_weight=False`` trains sCT/sCD with uniform weighting: the learned log-weight
    keeps its zero initialisation while the network learns; with the default it moves."""
    gm = GaussianMixture.ring()
    uniform, _ = train_toy(method, gm, steps=30, batch=64, adaptive_weight=False)
    learned, _ = train_toy(method, gm, steps=30, batch=64)
    assert all((p == 0).all() for p in uniform.weight.parameters())
    assert any((p != 0).any() for p in learned.weight.parameters())
    # same seed and data: the networks differ only through the weighting
    diff = [(a - b).abs().max().item() for a, b in zip(uniform.model.parameters(),
                                                        learned.model.parameters())]
    assert max(diff) > 0
