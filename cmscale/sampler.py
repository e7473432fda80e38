"""One sampler specification: what turns per-image noise into images, parsed in one place.

Syntax (``eval.samplers``, ``cmscale fid-report --sampler``; ``str`` gives it back):

- ``onestep``: ``clamp(f(sigma_max z, sigma_max))`` (NFE 1);
- ``ts=0,20,39/40``: the reference's multistep ``ts`` indices into a Karras grid of 40 points
  (NFE ``len(ts) - 1``, see :func:`cmscale.sampling.ts_to_sigmas`);
- ``sigmas=80,0.8``: explicit noise levels (NFE ``len(sigmas)``);
- ``edm`` / ``edm=N``: the EDM Heun sampler with N steps (NFE ``2 N - 1``; ``edm`` is 40 steps,
  NFE 79, the reference's teacher setting), EDM denoisers only;
- ``euler=N``: Euler (DDIM) steps on a Karras grid of N + 1 levels whose last is 0 (NFE N),
  EDM denoisers only;
- ``trig=1.5708,1.1``: TrigFlow steps at decreasing times in (0, pi/2] (``pi/2`` may be
  written ``max``), sCT/sCD networks only (NFE ``len(times)``, see
  :func:`cmscale.sampling.sample_trig`).

Both EDM samplers clamp every denoised estimate to [-1, 1], as the reference's sampler does.

Consistency models take onestep, ts and sigmas, EDM denoisers edm and euler, and TrigFlow
networks (sct, scd) also trig (:meth:`Sampler.check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import schedules
from .sampling import PerImageNoise, sample_sigmas, sample_trig, ts_to_sigmas
from .solvers import EDM_STEPS, clamped, edm_sample, euler_step

SYNTAX = "onestep, ts=I,J,.../STEPS, sigmas=A,B,..., edm[=N], euler=N, trig=T,T,..."
EDM_KINDS = ("edm", "euler")
TRIG_MODES = ("sct", "scd")  # networks with TrigFlow's time (cmscale.networks.TrigFlowPrecond)


def parse_ints(text: str) -> list[int]:
    """'0, 62,150' -> [0, 62, 150]."""
    return [int(t) for t in str(text).replace(" ", "").split(",") if t]


def parse_times(text: str) -> list[float]:
    """TrigFlow times: 'max,1.1' -> [pi/2, 1.1] ('max' or 'pi/2' is pi/2)."""
    return [math.pi / 2 if t in ("max", "pi/2") else float(t)
            for t in str(text).replace(" ", "").split(",") if t]


def parse_floats(text: str) -> list[float]:
    """'80,0.8' -> [80.0, 0.8]."""
    return [float(t) for t in str(text).replace(" ", "").split(",") if t]


@dataclass(frozen=True)
class Sampler:
    kind: str                       # onestep | ts | sigmas | edm | euler
    ts: tuple[int, ...] = ()        # ts: indices into the Karras grid of ``steps`` points
    steps: int | None = None        # ts: grid size; edm: Heun steps; euler: Euler steps
    sigmas: tuple[float, ...] = ()  # sigmas: the noise levels
    times: tuple[float, ...] = ()   # trig: the TrigFlow times

    def __post_init__(self):
        k = self.kind
        if k == "ts":
            ts, steps = self.ts, self.steps
            if (len(ts) < 2 or not steps or ts[0] < 0 or ts[-1] >= steps
                    or any(a >= b for a, b in zip(ts, ts[1:]))):
                raise ValueError(f"ts must increase within [0, STEPS - 1], got ts {list(ts)} "
                                 f"with STEPS {steps} (e.g. ts=0,20,39/40)")
        elif k == "sigmas":
            if not self.sigmas or any(v <= 0 for v in self.sigmas):
                raise ValueError(f"positive noise levels, got {list(self.sigmas)}")
        elif k in EDM_KINDS:
            if self.steps is None or self.steps < 1:
                raise ValueError(f"{k} needs at least 1 step, got {self.steps}")
        elif k == "trig":
            t = self.times
            if (not t or any(not 0 < v <= math.pi / 2 + 1e-6 for v in t)
                    or any(a <= b for a, b in zip(t, t[1:]))):
                raise ValueError(f"trig needs decreasing times in (0, pi/2], got {list(t)} "
                                 f"(e.g. trig=max,1.1)")
        elif k != "onestep":
            raise ValueError(f"unknown sampler kind {k!r} ({SYNTAX})")

    @classmethod
    def parse(cls, text: str) -> Sampler:
        """'onestep' | 'ts=0,20,39/40' | 'sigmas=80,0.8' | 'edm[=N]' | 'euler=N'."""
        t = str(text).replace(" ", "")
        try:
            if t in ("onestep", "1step", "one"):
                return cls("onestep")
            if t.startswith("ts="):
                if "/" not in t:
                    raise ValueError("write ts=I0,I1,.../STEPS (e.g. ts=0,20,39/40)")
                ts, steps = t[3:].rsplit("/", 1)
                return cls("ts", ts=tuple(parse_ints(ts)), steps=int(steps))
            if t.startswith("sigmas="):
                return cls("sigmas", sigmas=tuple(parse_floats(t[7:])))
            if t == "edm" or t.startswith("edm="):
                return cls("edm", steps=int(t[4:]) if "=" in t else EDM_STEPS)
            if t.startswith("euler="):
                return cls("euler", steps=int(t[6:]))
            if t.startswith("trig="):
                return cls("trig", times=tuple(parse_times(t[5:])))
        except ValueError as e:
            raise ValueError(f"sampler {text!r}: {e}") from None
        raise ValueError(f"unknown sampler {text!r} ({SYNTAX})")

    @classmethod
    def from_flags(cls, mode: str, ts: str | None = None, steps: int | None = None,
                   sigmas: str | None = None, times: str | None = None) -> Sampler:
        """``cmscale sample``'s ``--ts/--steps/--sigmas/--times`` for a network of ``mode``;
        without any, one step (at pi/2 for a TrigFlow network)."""
        if mode == "edm":
            if ts or sigmas or times:
                raise ValueError("an EDM denoiser is sampled with the Heun sampler: use --steps")
            return cls("edm", steps=int(steps or EDM_STEPS))
        if times:
            if ts or sigmas or steps:
                raise ValueError("give --times, or --ts/--steps, or --sigmas")
            return cls("trig", times=tuple(parse_times(times))).check(mode)
        if mode in TRIG_MODES and not (ts or sigmas or steps):
            return cls("trig", times=(math.pi / 2,))
        if sigmas:
            if ts:
                raise ValueError("give --ts/--steps or --sigmas, not both")
            return cls("sigmas", sigmas=tuple(parse_floats(sigmas)))
        if ts:
            if not steps:
                raise ValueError("--ts needs --steps (the size of the Karras grid)")
            return cls("ts", ts=tuple(parse_ints(ts)), steps=int(steps))
        if steps:
            raise ValueError("--steps without --ts: give --ts (e.g. 0,62,150 --steps 151)")
        return cls("onestep")

    def __str__(self) -> str:
        if self.kind == "ts":
            return f"ts={','.join(map(str, self.ts))}/{self.steps}"
        if self.kind == "sigmas":
            return f"sigmas={','.join(repr(v) for v in self.sigmas)}"
        if self.kind in EDM_KINDS:
            return f"{self.kind}={self.steps}"
        if self.kind == "trig":
            return "trig=" + ",".join("max" if abs(v - math.pi / 2) < 1e-6 else repr(v)
                                      for v in self.times)
        return self.kind

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return {"onestep": 1, "ts": len(self.ts) - 1, "sigmas": len(self.sigmas),
                "edm": 2 * (self.steps or 0) - 1, "euler": self.steps,
                "trig": len(self.times)}[self.kind]

    def check(self, mode: str) -> Sampler:
        """Raise ValueError unless this sampler fits a network trained in ``mode``."""
        if (self.kind in EDM_KINDS) != (mode == "edm") or (
                self.kind == "trig" and mode not in TRIG_MODES):
            raise ValueError(f"sampler {str(self)!r} does not fit a {mode!r} network (EDM "
                             f"denoisers take edm[=N] or euler=N; consistency models onestep, "
                             f"ts=... or sigmas=...; sct/scd networks also trig=...)")
        return self

    def describe(self, sigma_min: float, sigma_max: float, rho: float = schedules.RHO) -> dict:
        """The settings as ``cmscale sample`` records them in ``sample.json``."""
        if self.kind == "edm":
            return dict(sampler="edm_heun", steps=self.steps)
        if self.kind == "euler":
            return dict(sampler="edm_euler", steps=self.steps)
        if self.kind == "ts":
            levels, final = ts_to_sigmas(self.ts, self.steps, sigma_min, sigma_max, rho)
            return dict(sampler="multistep", ts=list(self.ts), steps=self.steps, sigmas=levels,
                        final_sigma=final)
        if self.kind == "sigmas":
            return dict(sampler="multistep", sigmas=list(self.sigmas))
        if self.kind == "trig":
            return dict(sampler="trigflow", times=list(self.times))
        return dict(sampler="onestep", sigmas=[sigma_max])

    @torch.no_grad()
    def run(self, net, noise: PerImageNoise, labels=None, sigma_min: float = schedules.SIGMA_MIN,
            sigma_max: float = schedules.SIGMA_MAX, rho: float = schedules.RHO) -> torch.Tensor:
        """Images in [-1, 1] from ``net`` (f(x, sigma), or D(x; sigma) for edm/euler; trig
        calls ``net(x_t, t, labels, trigflow=True)``)."""
        if self.kind == "edm":
            return edm_sample(net, noise.next(), self.steps, labels, sigma_min=sigma_min,
                              sigma_max=sigma_max, rho=rho)
        if self.kind == "euler":
            levels = schedules.karras_sigmas(self.steps + 1, sigma_min, sigma_max, rho)
            levels[-1] = 0.0
            x = noise.next() * float(levels[0])
            den = clamped(net)
            for a, b in zip(levels[:-1], levels[1:]):
                x = euler_step(den, x, float(a), float(b), labels)
            return x.clamp(-1, 1)
        if self.kind == "trig":
            return sample_trig(net, noise, self.times, labels)
        final = None
        if self.kind == "ts":
            levels, final = ts_to_sigmas(self.ts, self.steps, sigma_min, sigma_max, rho)
        elif self.kind == "sigmas":
            levels = list(self.sigmas)
        else:
            levels = [sigma_max]
        return sample_sigmas(net, noise, levels, labels, final_sigma=final,
                             sigma_min=sigma_min, sigma_max=sigma_max)
