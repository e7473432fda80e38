"""Sampling from a consistency function f(x, sigma): one-step and multistep.

Noise is drawn per image index: image i of a run seeded with ``seed`` always gets the same
initial noise and the same per-step noise, so samples do not depend on the batch size or on
how many ranks share the work. Multistep sampling is Song et al. 2023, Algorithm 1 (as in
openai/consistency_models ``cm/karras_diffusion.py``, ``stochastic_iterative_sampler``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import schedules


class PerImageNoise:
    """Independent standard-normal streams, one per image index, seeded by (seed, index).

    ``next()`` returns the next draw of every stream as a (B, *shape) batch, so the k-th draw
    for image i is the same whatever batch image i is in.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int],
                 device=None, dtype=torch.float32):
        self.shape = tuple(shape)
        self.device, self.dtype = device, dtype
        self.generators = []
        for i in indices:
            g = torch.Generator()
            # SeedSequence mixes (seed, index) into well-separated 64-bit seeds.
            state = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, np.uint32)
            g.manual_seed(int(state[0]) << 32 | int(state[1]))
            self.generators.append(g)

    def next(self) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(draws).to(device=self.device, dtype=self.dtype)


@torch.no_grad()
def sample_sigmas(net, noise: PerImageNoise, sigmas: Sequence[float], class_labels=None,
                  final_sigma: float | None = None, sigma_min: float = schedules.SIGMA_MIN,
                  sigma_max: float = schedules.SIGMA_MAX) -> torch.Tensor:
    """Multistep consistency sampling (Algorithm 1) at an explicit list of noise levels.

    ``x = sigmas[0] z_0``; for each sigma_i: ``x0 = clamp(f(x, sigma_i))``; between steps
    ``x = x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) z``. ``len(sigmas)`` network evaluations.
    ``final_sigma`` (default sigma_min, i.e. none) re-noises after the last step, which is what
    the reference does when ``ts`` does not end at ``steps - 1``.
    """
    if len(sigmas) == 0:
        raise ValueError("need at least one noise level")
    levels = [float(s) for s in sigmas]
    if any(not (sigma_min <= s <= sigma_max) for s in levels):
        raise ValueError(f"noise levels must lie in [{sigma_min}, {sigma_max}], got {levels}")
    x = noise.next() * levels[0]
    nexts = levels[1:] + [sigma_min if final_sigma is None else float(final_sigma)]
    for s, s_next in zip(levels, nexts):
        x0 = net(x, torch.full((x.shape[0],), s, device=x.device), class_labels)
        x0 = x0.clamp(-1, 1).to(noise.dtype)
        s_next = min(max(s_next, sigma_min), sigma_max)
        scale = (s_next**2 - sigma_min**2) ** 0.5
        x = x0 + scale * noise.next() if scale > 0 else x0
    return x


@torch.no_grad()
def sample_trig(net, noise: PerImageNoise, times: Sequence[float], class_labels=None,
                sigma_data: float | None = None) -> torch.Tensor:
    """Multistep sampling of a TrigFlow consistency function (Lu & Song 2025, Algorithm 1).

    ``x = sigma_d z_0`` at ``times[0]`` (normally pi/2); at each t_i
    ``x0 = clamp(f(x, t_i))``, then ``x = cos t_{i+1} x0 + sin t_{i+1} sigma_d z``.
    ``net(x_t, t, labels, trigflow=True)`` is f; ``sigma_data`` defaults to ``net``'s.
    """
    sd = float(sigma_data if sigma_data is not None else _sigma_data(net))
    times = [float(t) for t in times]
    if not times:
        raise ValueError("need at least one time")
    x = noise.next() * sd  # the prior at pi/2 (and roughly, as var(x0) ~ sigma_d^2, below)
    for i, t in enumerate(times):
        x0 = net(x, torch.full((x.shape[0],), t, device=x.device), class_labels, trigflow=True)
        x0 = x0.clamp(-1, 1).to(noise.dtype)
        if i + 1 < len(times):
            t_next = times[i + 1]
            x = math.cos(t_next) * x0 + math.sin(t_next) * sd * noise.next()
    return x0


def _sigma_data(net) -> float:
    """sigma_data of a (possibly wrapped) TrigFlow network."""
    while not hasattr(net, "sigma_data") and hasattr(net, "net"):
        net = net.net  # cmscale.sample.FixedShapeNet
    return net.sigma_data


def ts_to_sigmas(ts: Sequence[int], steps: int, sigma_min: float = schedules.SIGMA_MIN,
                 sigma_max: float = schedules.SIGMA_MAX, rho: float = schedules.RHO):
    """The reference's ``ts``/``steps`` pair as (noise levels to evaluate at, final level).

    ``ts`` are integer indices into a Karras grid of ``steps`` points (0 = sigma_max); the
    network is evaluated at ``ts[:-1]``; ``ts[-1]`` only sets the last re-noising level (none
    when it is ``steps - 1``, i.e. sigma_min). ``ts=0,62,150 steps=151`` is two steps.
    """
    ts = [int(t) for t in ts]
    if len(ts) < 2:
        raise ValueError(f"ts needs at least two indices (got {ts}); one step is ts=0,{steps-1}")
    if any(not 0 <= t < steps for t in ts) or any(a >= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"ts must increase within [0, {steps - 1}], got {ts}")
    # The grid's ends are exact (the formula's float rounding would leave sigma_min + 1e-18,
    # i.e. a final re-noising of ~1e-10 that the reference adds; we add none).
    ends = {0: sigma_max, steps - 1: sigma_min}
    at = [ends.get(t, float(schedules.karras_sigma_at(t, steps, sigma_min, sigma_max, rho)))
          for t in ts]
    return at[:-1], at[-1]


def sample_ts(net, noise: PerImageNoise, ts: Sequence[int], steps: int, class_labels=None,
              sigma_min: float = schedules.SIGMA_MIN, sigma_max: float = schedules.SIGMA_MAX,
              rho: float = schedules.RHO) -> torch.Tensor:
    """Multistep sampling with the reference's ``ts``/``steps`` semantics (see ts_to_sigmas)."""
    levels, final = ts_to_sigmas(ts, steps, sigma_min, sigma_max, rho)
    return sample_sigmas(net, noise, levels, class_labels, final_sigma=final,
                         sigma_min=sigma_min, sigma_max=sigma_max)


def sample_onestep(net, noise: PerImageNoise, class_labels=None,
                   sigma_max: float = schedules.SIGMA_MAX,
                   sigma_min: float = schedules.SIGMA_MIN) -> torch.Tensor:
    """One-step generation: ``clamp(f(sigma_max z, sigma_max))``."""
    return sample_sigmas(net, noise, [sigma_max], class_labels, sigma_min=sigma_min,
                         sigma_max=sigma_max)
