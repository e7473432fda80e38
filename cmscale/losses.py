"""Losses as small callables, and the distance metrics they use.

Every loss is ``loss(net, images, num_scales=N, class_labels=None, target=...) -> (B,)``:
per-sample losses, no reduction, no distributed calls (the training loop reduces). ``net`` is
the online network (a preconditioned module, possibly DDP-wrapped); ``target`` is the network
that gives the consistency target (an EMA of net for CD/CT, net itself under no_grad for iCT).

- :class:`CTLoss`   consistency training (Song et al. 2023, Algorithm 3 / eq. 10).
- :class:`CDLoss`   consistency distillation from a teacher denoiser (Algorithm 2 / eq. 7).
- :class:`ICTLoss`  improved CT (Song & Dhariwal 2023): pseudo-Huber, lognormal pair indices,
                    1/(sigma_n - sigma_{n+1}) weighting, target = stop-gradient online network.
- :class:`ECTLoss`  easy consistency tuning (Geng et al. 2025): iCT's self-target, pairs
                    (t, r) from ECT's mapping function; called with the stage in place of N.
- :class:`EDMLoss`  EDM denoising score matching, to train teachers (Karras et al. 2022, eq. 2).
- :class:`SCMLoss`  continuous-time sCT / sCD on TrigFlow (Lu & Song 2025, eq. 8 and
                    Algorithm 1), target = stop-gradient online network, tangent by one JVP.

Online and target passes share dropout masks: the RNG state (CPU and the current CUDA
device) is saved before the online forward and restored before the target forward.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import schedules
from .solvers import euler_step, heun_step

# ----------------------------------------------------------------------------- metrics


def _mean_flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).mean(dim=1)


class L2:
    """Mean of squares over all non-batch dimensions (the reference's ``l2``)."""

    def __call__(self, a, b):
        return _mean_flat((a - b) ** 2)


class L1:
    """Mean absolute difference over all non-batch dimensions."""

    def __call__(self, a, b):
        return _mean_flat((a - b).abs())


class PseudoHuber:
    """iCT's pseudo-Huber metric on the whole sample vector: ``sqrt(||a-b||^2 + c^2) - c``.

    ``c = 0.00054 sqrt(d)`` with d the number of entries per sample (iCT, section 3.3). It is a
    vector norm, not an elementwise Huber: a common reimplementation mistake.
    """

    def __init__(self, c: float | None = None):
        self.c = c

    def __call__(self, a, b):
        diff = (a - b).reshape(a.shape[0], -1)
        c = self.c if self.c is not None else 0.00054 * diff.shape[1] ** 0.5
        return torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c


VGG16_WEIGHTS = "vgg16-397923af.pth"  # torchvision's file name in the torch hub cache


def _vgg_weights_path(explicit: str | None) -> str:
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"LPIPS VGG16 weights not found at {explicit!r}")
        return explicit
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS)
    if os.path.isfile(hub):
        return hub
    raise FileNotFoundError(
        "LPIPS needs torchvision's ImageNet VGG16 weights and none were found. Put "
        f"{VGG16_WEIGHTS} (from torchvision's model zoo) at {hub} (set TORCH_HOME to move the "
        "cache), or pass loss.lpips_weights=/path/to/vgg16.pth. This machine cannot download it."
    )


LPIPS_VARIANTS = ("reference", "lpips")


class LPIPS:
    """LPIPS (VGG16) through the ``lpips`` package, used the way the reference uses it.

    Inputs in [-1, 1] are mapped to [0, 1] by (x + 1) / 2, and bilinearly resized to 224x224
    when the image side is below 256 (the reference's rule). ``variant``:

    - ``"reference"``: the reference's metric, piq's ``LPIPS(replace_pooling=True)``: VGG16 with
      2x2 average pooling instead of max pooling. piq's ImageNet mean/std normalisation of the
      [0, 1] input is the same affine map as lpips' scaling layer, and its per-channel head
      weights act like lpips' 1x1 linear layers, so only the pooling differs.
    - ``"lpips"``: the ``lpips`` package as published (torchvision's max pooling).

    The metric is computed in fp32 with autocast off, whatever the step's precision (the
    reference computes it in fp32; under bf16 autocast it is off by up to a few 1e-3 relative).

    The VGG16 backbone comes from ``weights`` (a torchvision ``vgg16`` state dict) or the torch
    hub cache; a clear error is raised when neither exists. The small calibrated linear heads
    ship inside the ``lpips`` package. ``random_backbone=True`` (tests only) skips the VGG
    weights: distances are then not perceptual, only well-defined.
    """

    def __init__(self, weights: str | None = None, random_backbone: bool = False, device=None,
                 variant: str = "reference"):
        import lpips  # imported here: it pulls torchvision, not needed for l2 runs

        if variant not in LPIPS_VARIANTS:
            raise ValueError(f"LPIPS variant must be one of {LPIPS_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if not random_backbone:
            state = torch.load(_vgg_weights_path(weights), map_location="cpu", weights_only=True)
            # lpips splits torchvision's vgg16().features into slice1..slice5 but keeps each
            # layer's index as its name, so "sliceK.<i>.weight" is "features.<i>.weight".
            mapped = {}
            for name in self.model.net.state_dict():
                key = "features." + name.split(".", 1)[1]
                if key not in state:
                    raise KeyError(f"{key} missing from the VGG16 weights file")
                mapped[name] = state[key]
            self.model.net.load_state_dict(mapped, strict=True)
        if variant == "reference":
            for sl in (self.model.net.slice1, self.model.net.slice2, self.model.net.slice3,
                       self.model.net.slice4, self.model.net.slice5):
                for name, layer in sl.named_children():
                    if isinstance(layer, torch.nn.MaxPool2d):
                        setattr(sl, name, torch.nn.AvgPool2d(kernel_size=2, stride=2))
        # channels-last weights: what oneDNN's convolutions prefer (see lpips_distance)
        self.model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        if device is not None:
            self.model.to(device)

    def to(self, device):
        self.model.to(device)
        return self

    def __call__(self, a, b):
        # the metric in fp32 whatever the step's autocast (the reference computes it in fp32)
        with torch.autocast(a.device.type, enabled=False):
            return lpips_distance(self.model, a.float(), b.float())


def lpips_distance(model, a: torch.Tensor, b: torch.Tensor,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-image LPIPS of an ``lpips.LPIPS`` ``model`` between ``a`` and the target ``b`` (both
    in [-1, 1]), resized to 224 px below 256 px as the reference does: the value of
    ``model((a + 1) / 2, (b + 1) / 2, normalize=True)`` up to float rounding, with less work.
    Both images are resized in one call, ``b``'s features are computed without autograd, and
    the VGG runs on channels-last tensors (oneDNN's preferred layout). ``dtype=torch.bfloat16``
    runs the VGG under bf16 autocast (an option: it changes the value beyond rounding)."""
    n = a.shape[0]
    x = torch.cat([a, b.detach()])
    if x.shape[1] == 1:  # grey images: the VGG sees R = G = B
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] < 256:
        x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
    x = (2 * ((x + 1) / 2) - 1).contiguous(memory_format=torch.channels_last)  # normalize=True
    x = model.scaling_layer(x)
    amp = (torch.autocast(x.device.type, dtype=dtype) if dtype is not None
           else contextlib.nullcontext())
    with amp:
        feats_a = model.net(x[:n])
        with torch.no_grad():
            feats_b = model.net(x[n:])
    total = 0
    for lin, fa, fb in zip(model.lins, feats_a, feats_b):
        fa, fb = fa.float(), fb.float()
        fa = fa / (torch.sqrt(torch.sum(fa**2, dim=1, keepdim=True)) + 1e-10)
        fb = fb / (torch.sqrt(torch.sum(fb**2, dim=1, keepdim=True)) + 1e-10)
        total = total + lin((fa - fb) ** 2).mean([2, 3], keepdim=True)
    return total.reshape(n)


def make_metric(name: str, **kwargs):
    """Metric by config name: ``l2``, ``l1``, ``pseudo_huber`` or ``lpips``."""
    metrics = {"l2": L2, "l1": L1, "pseudo_huber": PseudoHuber, "lpips": LPIPS}
    if name not in metrics:
        raise ValueError(f"unknown metric {name!r}; choose one of {sorted(metrics)}")
    return metrics[name](**kwargs)


# ----------------------------------------------------------------------------- RNG sharing


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def same_dropout(device: torch.device):
    """Yield a ``replay()`` that rewinds CPU and CUDA RNG to the state at entry.

    Call it before the target forward so the target draws the online pass's dropout masks.
    (The reference forks only the CPU RNG, so on GPU its masks differ: its PR 59.)
    """
    state = _rng_state(device)
    yield lambda: _set_rng_state(state, device)


# ----------------------------------------------------------------------------- losses


class _PairLoss:
    """Shared body of CT, CD and iCT: a pair (sigma_n > sigma_{n+1}) on one trajectory."""

    def __init__(self, metric="l2", sigma_min: float = schedules.SIGMA_MIN,
                 sigma_max: float = schedules.SIGMA_MAX, rho: float = schedules.RHO):
        self.metric = make_metric(metric) if isinstance(metric, str) else metric
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self._grids: dict = {}

    def sigmas(self, num_scales: int, device) -> torch.Tensor:
        # N changes a few hundred times in a run: build each grid once, not every step.
        key = (num_scales, str(device))
        if key not in self._grids:
            self._grids[key] = schedules.karras_sigmas(
                num_scales, self.sigma_min, self.sigma_max, self.rho).to(device=device,
                                                                         dtype=torch.float32)
        return self._grids[key]

    def sample_index(self, num_scales: int, batch: int, device) -> torch.Tensor:
        """n ~ U{0, ..., N-2} (Algorithms 2 and 3)."""
        return torch.randint(0, num_scales - 1, (batch,), device=device)

    def weight(self, sigmas: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """lambda(sigma_n): uniform, as the reference's CM runs."""
        return torch.ones_like(sigmas[n])

    def point_at_next(self, x, x_n, z, sigma_n, sigma_next, class_labels):
        """The point at sigma_{n+1} on the trajectory through x_n (subclasses define it)."""
        raise NotImplementedError

    def __call__(self, net, images, num_scales: int, class_labels=None, target=None):
        if num_scales < 2:
            raise ValueError(f"num_scales must be >= 2, got {num_scales}")
        target = net if target is None else target
        x = images
        B, device = x.shape[0], x.device
        sigmas = self.sigmas(num_scales, device)
        n = self.sample_index(num_scales, B, device)
        sigma_n, sigma_next = sigmas[n], sigmas[n + 1]
        shape = (-1,) + (1,) * (x.ndim - 1)
        z = torch.randn_like(x)
        x_n = x + sigma_n.reshape(shape).to(x.dtype) * z
        with same_dropout(device) as replay:
            online = net(x_n, sigma_n, class_labels)
            with torch.no_grad():
                x_next = self.point_at_next(x, x_n, z, sigma_n, sigma_next, class_labels)
                replay()
                tgt = target(x_next, sigma_next, class_labels)
        return self.weight(sigmas, n) * self.metric(online.float(), tgt.detach().float())


class CTLoss(_PairLoss):
    """Consistency training: the point at sigma_{n+1} is ``x + sigma_{n+1} z`` (same z).

    Equivalent to one Euler step of the PF ODE with x itself as the denoiser, as the
    reference writes it.
    """

    def point_at_next(self, x, x_n, z, sigma_n, sigma_next, class_labels):
        return x + sigma_next.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype) * z


class CDLoss(_PairLoss):
    """Consistency distillation: one teacher ODE step from sigma_n to sigma_{n+1}.

    ``teacher`` is a denoiser D(x, sigma, class_labels) (an :class:`EDMPrecond`, or the exact
    Gaussian-mixture denoiser); ``solver`` is ``"heun"`` (the reference's choice) or ``"euler"``.
    """

    def __init__(self, teacher, solver: str = "heun", **kwargs):
        super().__init__(**kwargs)
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
        self.teacher = teacher
        self.step = heun_step if solver == "heun" else euler_step

    def point_at_next(self, x, x_n, z, sigma_n, sigma_next, class_labels):
        return self.step(self.teacher, x_n, sigma_n, sigma_next, class_labels)


class ICTLoss(CTLoss):
    """Improved consistency training (Song & Dhariwal 2023).

    Pseudo-Huber metric by default, pair index from the discretised lognormal, weighting
    1/(sigma_n - sigma_{n+1}); call it with ``target=None`` (or the same net) so the target is
    the stop-gradient online network; N from :func:`cmscale.schedules.ict_num_scales`.
    """

    def __init__(self, metric="pseudo_huber", p_mean: float = -1.1, p_std: float = 2.0, **kwargs):
        super().__init__(metric=metric, **kwargs)
        self.p_mean, self.p_std = p_mean, p_std
        self._probs = {}

    def sample_index(self, num_scales, batch, device):
        if num_scales not in self._probs:
            probs = schedules.lognormal_index_probs(
                schedules.karras_sigmas(num_scales, self.sigma_min, self.sigma_max, self.rho),
                self.p_mean, self.p_std)
            self._probs[num_scales] = probs.float()
        probs = self._probs[num_scales].to(device)
        return torch.multinomial(probs, batch, replacement=True)

    def weight(self, sigmas, n):
        return schedules.ict_weights(sigmas)[n]


class ECTLoss:
    """Easy consistency tuning (Geng et al. 2025): iCT's self-target on ECT's pairs.

    ``t`` from ln t ~ N(P_mean, P_std^2), ``r = t - gap`` from the mapping function of the
    stage (:func:`cmscale.schedules.ect_gap`), one noise draw z for both points:
    ``w(t, r) d(f(x + t z, t), sg f(x + r z, r))``, with the target the stop-gradient online
    network under the same dropout masks, and ``f(x, 0) = x``: where r = 0 the target is the
    clean image. ``metric`` is ECT's pseudo-Huber ``sqrt(||a - b||^2 + c^2) - c`` (c = 0 gives
    the L2 norm, its CIFAR-10 choice); ``weighting`` ``inverse_gap`` (1 / (t - r)) or
    ``karras`` (:func:`cmscale.schedules.ect_weights`). Called with the stage in place of N.
    """

    def __init__(self, metric="pseudo_huber", p_mean: float = -1.1, p_std: float = 2.0,
                 q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 weighting: str = "inverse_gap", sigma_data: float = 0.5):
        self.metric = make_metric(metric) if isinstance(metric, str) else metric
        self.p_mean, self.p_std = p_mean, p_std
        self.q, self.k, self.b = q, k, b
        schedules.ect_weights(torch.ones(1), torch.ones(1), weighting)  # a bad name fails here
        self.weighting, self.sigma_data = weighting, sigma_data

    def __call__(self, net, images, stage: int, class_labels=None, target=None):
        target = net if target is None else target
        x = images
        shape = (-1,) + (1,) * (x.ndim - 1)
        t = schedules.edm_lognormal_sigmas(x.shape[0], self.p_mean, self.p_std,
                                           device=x.device)
        gap = schedules.ect_gap(t, stage, self.q, self.k, self.b)
        r = t - gap
        z = torch.randn_like(x)
        with same_dropout(x.device) as replay:
            online = net(x + t.reshape(shape).to(x.dtype) * z, t, class_labels)
            with torch.no_grad():
                replay()
                tgt = target(x + r.reshape(shape).to(x.dtype) * z, r, class_labels)
                # the boundary f(x, 0) = x, whatever the network makes of sigma = 0
                tgt = torch.where((r > 0).reshape(shape), tgt.float(), x.float())
        weight = schedules.ect_weights(t, gap, self.weighting, self.sigma_data)
        return weight * self.metric(online.float(), tgt)


class EDMLoss:
    """EDM denoising score matching for teachers: ``lambda(sigma) ||D(x + sigma z, sigma) - x||^2``.

    ln(sigma) ~ N(P_mean, P_std^2) and ``lambda = 1/sigma^2 + 1/sigma_data^2`` (the reference's
    "karras" weighting); the squared error is a mean over entries (the reference's mean_flat).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def __call__(self, net, images, num_scales: int | None = None, class_labels=None,
                 target=None):
        del num_scales, target  # EDM training has neither a grid nor a target network
        x = images
        sigma = schedules.edm_lognormal_sigmas(x.shape[0], self.p_mean, self.p_std,
                                               device=x.device)
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
        denoised = net(x + s * torch.randn_like(x), sigma, class_labels)
        weight = 1.0 / sigma**2 + 1.0 / self.sigma_data**2
        return weight * _mean_flat((denoised.float() - x.float()) ** 2)


def _jvp_precision(device: torch.device):
    """The JVP's precision: the step's, except that fp16 autocast gives way to fp32. The
    tangent is not loss-scaled, and dF/dt of a network near t = 0 or with large activations
    leaves fp16's range (max 65504) where bf16's and fp32's 8-bit exponent does not."""
    if (torch.is_autocast_enabled(device.type)
            and torch.get_autocast_dtype(device.type) == torch.float16):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class SCMLoss:
    """sCT / sCD (Lu & Song 2025): the continuous-time consistency loss on TrigFlow.

    For x0 (the images), ``tan t = exp(tau) / sigma_d`` with ``tau ~ N(P_mean, P_std^2)``,
    ``z ~ N(0, sigma_d^2 I)`` and ``x_t = cos t x0 + sin t z``:

    - ``dx_t/dt = cos t z - sin t x0`` (sCT), or ``sigma_d F_teacher(x_t / sigma_d, t)`` (sCD,
      ``teacher`` a :class:`~cmscale.networks.TrigFlowPrecond` around the teacher);
    - ``F-`` and ``cos t sin t dF-/dt``: one forward-mode JVP of the stop-gradient network at
      ``(x_t, t)`` with tangent ``(cos t sin t dx_t/dt, cos t sin t)`` (the rearranged form:
      no 1/(sin t cos t) appears, nothing overflows near t = 0 or pi/2);
    - ``g = -cos^2 t (sigma_d F- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF-/dt)`` with the
      tangent warm-up ``r = min(1, step / H)``, normalised ``g / (||g|| + c)``;
    - per-example loss ``exp(-w(t)) ||F - F- - g||^2 / D + w(t)`` with the learned log-weight w
      (``adaptive_weight=False``: ``||F - F- - g||^2 / D``); ``prior_weight=True`` also divides
      ``||F - F- - g||^2 / D`` by ``sigma = sigma_d tan t`` (NVlabs/FastGen's prior weighting).

    Its gradient is that of the consistency condition df/dt = 0 (the paper's eq. 8): at F = F-
    it is ``-2 g . dF/dtheta / D``, scaled by exp(-w). ``net`` is what the gradient flows through
    (DDP-wrapped); ``target`` the same weights as a plain module, for the JVP; both are
    called with ``trigflow=True, raw=True`` and draw the same dropout masks. The JVP forces
    PyTorch's math attention (the fused SDPA kernels have no forward-mode derivative on GPU)
    and runs in fp32 under fp16 autocast (``_jvp_precision``).
    """

    NORM_OVER = ("all", "rms")  # what ||g|| is measured over (see normalize)

    def __init__(self, teacher=None, sigma_data: float = 0.5, p_mean: float = -0.8,
                 p_std: float = 1.6, tangent_warmup: int = 10000, tangent_norm: float = 0.1,
                 adaptive_weight: bool = True, tangent_norm_over: str = "all",
                 prior_weight: bool = False):
        if tangent_warmup < 0 or tangent_norm < 0 or p_std <= 0:
            raise ValueError("need tangent_warmup >= 0, tangent_norm >= 0 and p_std > 0")
        if tangent_norm_over not in self.NORM_OVER:
            raise ValueError(f"tangent_norm_over must be one of {self.NORM_OVER}, "
                             f"got {tangent_norm_over!r}")
        self.tangent_norm_over, self.prior_weight = tangent_norm_over, bool(prior_weight)
        self.teacher, self.sigma_data = teacher, float(sigma_data)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.tangent_warmup, self.tangent_norm = int(tangent_warmup), float(tangent_norm)
        self.adaptive_weight = adaptive_weight

    def warmup(self, step: int) -> float:
        """The tangent warm-up factor r = min(1, step / H) (1 without warm-up)."""
        return min(1.0, step / self.tangent_warmup) if self.tangent_warmup else 1.0

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        """Tangent normalisation ``g / (||g|| + c)`` per example; ``||g||`` over all its entries
        (``tangent_norm_over="all"``, the paper's) or their root mean square (``"rms"``: c then
        means the same at every image size, as in NVlabs/FastGen's default)."""
        norm = g.reshape(g.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (g.ndim - 1))
        if self.tangent_norm_over == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / (norm + self.tangent_norm)

    def sample_t(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        """Training times: ``t = arctan(exp(tau) / sigma_d)``, tau ~ N(P_mean, P_std^2)."""
        tau = torch.randn(batch, device=device, dtype=dtype) * self.p_std + self.p_mean
        return torch.atan(torch.exp(tau) / self.sigma_data)

    def velocity(self, x0, z, x_t, t, class_labels):
        """dx_t/dt: the conditional velocity (sCT) or the teacher's PF-ODE velocity (sCD)."""
        cos, sin = (v.reshape((-1,) + (1,) * (x0.ndim - 1)) for v in (torch.cos(t), torch.sin(t)))
        if self.teacher is None:
            return cos * z - sin * x0
        with torch.no_grad():
            return self.sigma_data * self.teacher(x_t, t, class_labels, trigflow=True,
                                                  raw=True)[0]

    def tangent(self, target, x_t, t, dxdt, class_labels):
        """(F-, cos t sin t dF-/dt) of the stop-gradient ``target`` by one forward-mode JVP."""
        cs = torch.cos(t) * torch.sin(t)

        def F_of(x, tt):
            return target(x, tt, class_labels, trigflow=True, raw=True)[0]

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _jvp_precision(x_t.device):
            return torch.func.jvp(F_of, (x_t, t),
                                  (cs.reshape((-1,) + (1,) * (x_t.ndim - 1)) * dxdt, cs))

    def __call__(self, net, images, num_scales: int | None = None, class_labels=None,
                 target=None, step: int = 0):
        del num_scales  # continuous time: no grid
        target = net if target is None else target
        # float32 at least (float64 stays: derivative checks)
        sd, x0 = self.sigma_data, images.to(torch.promote_types(images.dtype, torch.float32))
        B, device = x0.shape[0], x0.device
        t = self.sample_t(B, device, x0.dtype)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        cos, sin = torch.cos(t).reshape(shape), torch.sin(t).reshape(shape)
        z = torch.randn_like(x0) * sd
        x_t = cos * x0 + sin * z
        dxdt = self.velocity(x0, z, x_t, t, class_labels)
        with same_dropout(device) as replay:
            F_theta, w = net(x_t, t, class_labels, trigflow=True, raw=True)
            replay()
            F_minus, dF = self.tangent(target, x_t, t, dxdt, class_labels)
        r = self.warmup(step)
        # dF is already cos t sin t dF-/dt (the JVP's tangent carries the factor)
        g = -cos**2 * (sd * F_minus - dxdt) - r * (cos * sin * x_t + sd * dF)
        g = self.normalize(g)
        mse = _mean_flat((F_theta.to(x0.dtype) - F_minus - g) ** 2)
        if self.prior_weight:  # 1 / sigma = 1 / (sigma_d tan t)
            mse = mse / (sd * torch.tan(t))
        w = w.to(x0.dtype)
        if self.adaptive_weight:
            return torch.exp(-w) * mse + w
        return mse + 0.0 * w  # w still takes part (zero gradient): DDP expects every parameter
