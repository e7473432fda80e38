"""Schedules as pure functions of training progress.

Everything here is a function of its arguments alone (no hidden state), so a resumed run
recomputes the same values from the step counter and every rank agrees without talking.

Conventions (EDM / Karras): a grid of N noise levels is indexed i = 0..N-1 from sigma_max
*down* to sigma_min, as the reference code does. A consistency pair is (sigma_n, sigma_{n+1})
with sigma_n > sigma_{n+1}; the online network sees the larger one.
"""

from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def karras_sigmas(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The Karras et al. (2022, eq. 5) grid of ``n`` noise levels, descending.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    Computed in float64 (as the reference's numpy code) and then cast to ``dtype``.
    """
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + i / (n - 1) * (lo - hi)) ** rho
    return sigmas.to(dtype)


def karras_sigma_at(
    index, steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
):
    """Noise level at (possibly fractional or tensor) ``index`` of a ``steps``-point Karras grid.

    This is the reference's multistep-sampler formula (``ts``/``steps`` semantics)."""
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + index / (steps - 1) * (lo - hi)) ** rho


def ct_schedule(step: int, total_steps: int, s0: int, s1: int, mu0: float) -> tuple[int, float]:
    """CT curriculum: "progressive" N and "adaptive" target EMA of openai/consistency_models
    (``cm/script_util.py``, ``create_ema_and_scales_fn``).

    ``N'(k) = max(1, ceil(sqrt(k/K * ((s1+1)^2 - s0^2) + s0^2) - 1))``,
    ``mu(k) = exp(s0 * ln(mu0) / N'(k))`` and ``N(k) = N'(k) + 1``. mu uses N', not N, so
    ``mu(0) = mu0^2``: the reference code computes mu before adding 1 to N, and that code
    produced the paper's numbers.
    Returns ``(N, mu)`` with N the number of grid points (pairs are indices 0..N-2).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 < mu0 < 1.0:
        raise ValueError(f"mu0 must be in (0, 1), got {mu0}")
    frac = step / total_steps
    n_prime = math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    n_prime = max(n_prime, 1)
    mu = math.exp(s0 * math.log(mu0) / n_prime)
    return n_prime + 1, mu


def cd_schedule(step: int = 0, num_scales: int = 40, mu: float = 0.95) -> tuple[int, float]:
    """CD uses a fixed grid (N = 40) and a fixed target EMA rate (0.95) in the reference."""
    del step  # constant in progress; the argument keeps the schedule signature uniform
    return num_scales, mu


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT curriculum (Song & Dhariwal 2023, eq. 5): N doubles every K' steps from s0 to s1.

    ``K' = floor(K / (log2(s1/s0) + 1))`` and ``N(k) = min(s0 * 2^floor(k/K'), s1) + 1``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    k_prime = max(k_prime, 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ict_schedule(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> tuple[int, float]:
    """``(N, mu)`` for iCT: mu = 0 means the target is the stop-gradient online network."""
    return ict_num_scales(step, total_steps, s0, s1), 0.0


def lognormal_index_probs(
    sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0
) -> torch.Tensor:
    """iCT's discretised lognormal over pair indices n = 0..N-2 of a descending grid.

    ``p(n) ∝ erf((ln sigma_n - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_{n+1} - P_mean) /
    (sqrt(2) P_std))``: the lognormal mass between the pair's two noise levels.
    """
    s = sigmas.to(torch.float64)
    cdf = torch.erf((torch.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    probs = cdf[:-1] - cdf[1:]
    return probs / probs.sum()


def ict_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """iCT loss weighting lambda(n) = 1 / (sigma_n - sigma_{n+1}) for each pair index n."""
    return 1.0 / (sigmas[:-1] - sigmas[1:])


def edm_lognormal_sigmas(
    batch: int, p_mean: float = -1.2, p_std: float = 1.2, generator=None, device=None
) -> torch.Tensor:
    """EDM training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, table 1)."""
    z = torch.randn(batch, generator=generator, device=device)
    return torch.exp(p_mean + p_std * z)


def ect_stage(step: int, stage_steps: int) -> int:
    """ECT's stage ``a`` at ``step`` (Geng et al. 2025): ``a = floor(step / d) + 1``.

    The gap ``t - r`` is divided by ``q`` each time the stage advances, every ``d`` steps. The
    first step is in stage 1, as in the authors' code (their stage counter starts at 0 and the
    decay is ``q^-(stage + 1)``).
    """
    if stage_steps <= 0:
        raise ValueError(f"stage_steps must be positive, got {stage_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step // stage_steps + 1


def ect_gap(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0,
            b: float = 1.0) -> torch.Tensor:
    """ECT's mapping function (Geng et al. 2025) as the gap ``t - r`` at stage a.

    ``r = max(0, t (1 - n(t) / q^a))`` with ``n(t) = 1 + k sigmoid(-b t)``, so the gap is
    ``t min(1, n(t) / q^a)``: it shrinks by ``q`` every stage, and relatively more at large t
    (n falls from 1 + k/2 at t = 0 to 1). Where it reaches t, r = 0 and the target is the clean
    image (the diffusion loss); ``k = 0`` is the paper's constant mapping. Computed as the gap,
    not as ``t - r``, so that a gap far below t's float resolution stays positive.
    """
    if stage < 1:
        raise ValueError(f"stage must be >= 1, got {stage}")
    n = 1.0 + k * torch.sigmoid(-b * t)
    return t * torch.clamp(n / q**stage, max=1.0)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0,
          b: float = 1.0) -> torch.Tensor:
    """The smaller noise level of ECT's pair: ``r = t - ect_gap(t, stage, q, k, b)`` (>= 0,
    exactly 0 where the mapping clamps)."""
    return t - ect_gap(t, stage, q, k, b)


def ect_weights(t: torch.Tensor, gap: torch.Tensor, kind: str = "inverse_gap",
                sigma_data: float = 0.5) -> torch.Tensor:
    """ECT's loss weighting of the pair (t, r = t - gap): ``1 / (t - r)`` (``inverse_gap``, the
    paper's CIFAR-10 choice) or ``1 / t^2 + 1 / sigma_data^2`` (``karras``, EDM's weighting,
    which the authors' ImageNet 64 code uses)."""
    if kind == "inverse_gap":
        return 1.0 / gap
    if kind == "karras":
        return 1.0 / t**2 + 1.0 / sigma_data**2
    raise ValueError(f"unknown ECT weighting {kind!r}; choose inverse_gap or karras")
