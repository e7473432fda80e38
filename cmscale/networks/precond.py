"""Preconditioning: the only place that knows c_skip, c_out, c_in, c_noise.

A raw network ``F`` is any ``nn.Module`` with ``forward(x, noise_labels, class_labels=None)``
(the ADM UNet, or an MLP on vectors). The wrappers below turn it into

- a consistency function (Song et al. 2023, eq. 7 and appendix C):
  ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))`` whose
  boundary condition ``f(x, sigma_min) = x`` holds exactly, because c_skip(sigma_min) = 1 and
  c_out(sigma_min) = 0 are exact in floating point;
- an EDM denoiser ``D(x, sigma)`` (Karras et al. 2022, table 1) with the same form but no
  sigma_min shift, used for teachers;
- a TrigFlow consistency function (Lu & Song 2025, eq. 6) ``f(x_t, t) = cos(t) x_t -
  sin(t) sigma_d F(x_t / sigma_d, c_noise(t))`` on ``x_t = cos(t) x0 + sin(t) z``,
  ``z ~ N(0, sigma_d^2 I)``, whose boundary ``f(x, 0) = x`` is exact (cos 0 = 1, sin 0 = 0).

Both use the reference's time input ``c_noise = 250 ln(sigma + 1e-44)``, so the public
openai/consistency_models checkpoints (edm_*, cd_*, ct_*) work unchanged.

The skip connection is applied in float32 (or float64 for float64 inputs) even under autocast:
the output of a low-precision network is cast up before ``c_skip x + c_out F``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .unet import timestep_embedding


def _as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B,) tensor in the skip connection's precision, on x's device."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def cm_scalings(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Consistency-model scalings ``(c_skip, c_out, c_in)`` (Song et al. 2023, appendix C).

    ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``,
    ``c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``.
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = 0.5):
    """EDM denoiser scalings ``(c_skip, c_out, c_in)`` (Karras et al. 2022, table 1)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """The reference's network time input, ``250 ln(sigma + 1e-44)``."""
    return 250.0 * torch.log(sigma + 1e-44)


class _Precond(nn.Module):
    """Shared wrapper; subclasses choose the scalings."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def scalings(self, sigma: torch.Tensor):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = _as_sigma(sigma, x)
        c_skip, c_out, c_in = (_bcast(c, x) for c in self.scalings(sigma))
        x_hp = x.to(sigma.dtype)
        F = self.model((c_in * x_hp).to(x.dtype), c_noise(sigma), class_labels)
        return c_skip * x_hp + c_out * F.to(sigma.dtype)


class ConsistencyPrecond(_Precond):
    """``f(x, sigma)``: the consistency parametrisation with f(x, sigma_min) = x exactly."""

    def scalings(self, sigma):
        return cm_scalings(sigma, self.sigma_data, self.sigma_min)


class EDMPrecond(_Precond):
    """``D(x, sigma)``: the EDM denoiser parametrisation, for teachers and EDM training."""

    def scalings(self, sigma):
        return edm_scalings(sigma, self.sigma_data)



# ----------------------------------------------------------------------------- TrigFlow


def trig_to_sigma(t, sigma_data: float = 0.5):
    """EDM's noise level of TrigFlow time t: ``sigma = sigma_d tan(t)``."""
    return sigma_data * torch.tan(torch.as_tensor(t))


def sigma_to_trig(sigma, sigma_data: float = 0.5):
    """TrigFlow time of EDM's noise level: ``t = arctan(sigma / sigma_d)``."""
    return torch.atan(torch.as_tensor(sigma) / sigma_data)


def negate_output_layer(model: nn.Module) -> nn.Module:
    """Flip the sign of a raw network's output layer in place (``model.out[-1]``: the UNet's
    last conv, the MLP's last linear), so that its output is ``-F``.

    An EDM denoiser ``D = cos^2(t) x + sigma_d sin(t) F_edm(cos(t) x / sigma_d)`` (its
    scalings at sigma = sigma_d tan t) is the TrigFlow network ``F = -F_edm`` with the same
    time input: this turns an EDM teacher (ours, or a public edm_*.pt) into a TrigFlow one,
    exactly, and starts an sCD/sCT student from it."""
    last = model.out[-1]
    with torch.no_grad():
        for p in last.parameters():
            p.neg_()
    return model


class AdaptiveWeight(nn.Module):
    """sCM's learned log-weight ``w_phi(t)`` (Lu & Song 2025, eq. 9): a linear map of a
    sinusoidal embedding of ln(sigma_d tan t), zero at initialisation (uniform weighting)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = channels
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        with torch.autocast(log_sigma.device.type, enabled=False):
            emb = timestep_embedding(log_sigma, self.channels, max_period=100.0)
            return self.linear(emb.to(self.linear.weight.dtype)).reshape(-1)


class TrigFlowPrecond(nn.Module):
    """TrigFlow consistency function ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d,
    c_noise(t))`` (Lu & Song 2025, eq. 6), with its learned weighting ``w_phi(t)``.

    The network's time input (``time_input``): ``"log_sigma"`` (default) is EDM's
    ``c_noise(sigma) = 250 ln(sigma)`` at ``sigma = sigma_d tan(t)``, held at ``sigma_max``
    beyond it: the UNet presets, EDM teachers and public checkpoints keep their time embedding,
    and t = pi/2 (one-step sampling) is finite; in the tangent of the rearranged JVP the time
    moves by ``cos t sin t``, i.e. c_noise by the constant 250 (d ln tan t / dt = 1 / (sin t
    cos t)). ``"t"`` is the paper's ``c_noise(t) = t``, scaled to DDPM's range [0, 1000]
    (``1000 t / (pi/2)``) for the UNet's positional embedding; it does not fit EDM weights.

    Calls:
    - ``net(x, sigma, labels)``: the consistency function in EDM's variables, like every
      other network of cmscale (``x = x0 + sigma eps``; samplers, editing, FID): it is
      ``f(cos(t) x, t)`` at ``t = arctan(sigma / sigma_d)``.
    - ``net(x_t, t, labels, trigflow=True)``: ``f(x_t, t)`` in TrigFlow's variables.
    - ``net(x_t, t, labels, trigflow=True, raw=True)``: ``(F, w_phi(t))``, what sCT/sCD
      train; F in float32 (float64 for float64 inputs).
    Wrapped around an EDM network whose output layer is negated
    (:func:`negate_output_layer`), ``net(x, sigma)`` is that EDM denoiser D(x, sigma).
    """

    TIME_INPUTS = ("log_sigma", "t")
    # d c_noise per unit of ln(sigma) (log_sigma) or of t (t), before noise_label_scale
    C_NOISE_RATE = {"log_sigma": 250.0, "t": 2000.0 / math.pi}

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, time_input: str = "log_sigma"):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if time_input not in self.TIME_INPUTS:
            raise ValueError(f"time_input must be one of {self.TIME_INPUTS}, got {time_input!r}")
        self.time_input = time_input
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.t_max = math.atan(self.sigma_max / self.sigma_data)  # time input held beyond it
        self.weight = AdaptiveWeight()

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """ln(sigma_d tan t) of the time input, with t held in [0, t_max]."""
        t = t.clamp(0.0, self.t_max)
        return torch.log(self.sigma_data * torch.tan(t) + 1e-44)

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input (see ``time_input``)."""
        rate = self.C_NOISE_RATE[self.time_input]
        if self.time_input == "t":
            return t.clamp(0.0, math.pi / 2) * rate
        return rate * self.log_sigma(t)

    def raw(self, x_t: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """``F(x_t / sigma_d, c_noise(t))`` in the skip connection's precision."""
        t = _as_sigma(t, x_t)
        F = self.model((x_t.to(t.dtype) / self.sigma_data).to(x_t.dtype), self.c_noise(t),
                       class_labels)
        return F.to(t.dtype)

    def trig(self, x_t: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F``; exactly x_t at t = 0."""
        t = _as_sigma(t, x_t)
        # cos is clamped at 0: float32(pi/2) lies above pi/2, where cos would turn negative.
        cos, sin = _bcast(torch.cos(t).clamp_min(0), x_t), _bcast(torch.sin(t), x_t)
        return cos * x_t.to(t.dtype) - sin * self.sigma_data * self.raw(x_t, t, class_labels)

    def forward(self, x: torch.Tensor, time, class_labels=None, trigflow: bool = False,
                raw: bool = False):
        if raw:
            t = _as_sigma(time, x)
            return self.raw(x, t, class_labels), self.weight(self.log_sigma(t))
        if trigflow:
            return self.trig(x, time, class_labels)
        sigma = _as_sigma(time, x)
        t = torch.atan(sigma / self.sigma_data)
        return self.trig((_bcast(torch.cos(t), x) * x.to(t.dtype)).to(x.dtype), t, class_labels)
