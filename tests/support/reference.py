"""Consistency losses written out from the algorithms (Song et al. 2023, Algorithms 2 and 3;
iCT), apart from ``cmscale.losses``, to check its values in tests.

The random draws follow the documented order of one micro-batch: the pair index n, then the
noise z (one draw of the shape of x), then the online forward; the target forward replays the
RNG state the online forward started from (same dropout masks).
"""
import math

import torch


def karras_grid(N, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The Karras grid, float64: sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.tensor([(a + i / (N - 1) * (b - a)) ** rho for i in range(N)],
                        dtype=torch.float64)


def l2(a, b):
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)


def pseudo_huber(a, b):
    d = (a - b).reshape(a.shape[0], -1)
    c = 0.00054 * math.sqrt(d.shape[1])
    return torch.sqrt((d**2).sum(1) + c * c) - c


def heun(D, x, t, t2, labels=None):
    """One Heun step of dx/dsigma = (x - D(x, sigma)) / sigma from t to t2 (per-sample)."""
    v = lambda s: s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    d = (x - D(x, t, labels)) / v(t)
    x2 = x + d * v(t2 - t)
    d2 = (x2 - D(x2, t2, labels)) / v(t2)
    return x + (d + d2) * v((t2 - t) / 2)


def pair_loss(net, target, x, N, *, teacher=None, labels=None, metric=l2, index=None,
              weight=None):
    """Per-sample ``weight(n) * metric(f(x + sigma_n z, sigma_n), f_target(x_next, sigma_n+1))``.

    CT: x_next = x + sigma_{n+1} z; CD: one Heun step of ``teacher`` from x + sigma_n z.
    ``index``: draws n (default uniform on 0..N-2, as CT and CD); ``weight``: lambda per pair
    (default 1)."""
    sig = karras_grid(N).float()
    B = x.shape[0]
    n = index(B) if index is not None else torch.randint(0, N - 1, (B,))
    z = torch.randn_like(x)
    t, t2 = sig[n], sig[n + 1]
    v = lambda s: s.reshape(-1, *([1] * (x.ndim - 1)))
    x_t = x + v(t) * z
    state = torch.get_rng_state()
    online = net(x_t, t, labels)
    with torch.no_grad():
        x_t2 = x + v(t2) * z if teacher is None else heun(teacher, x_t, t, t2, labels)
        torch.set_rng_state(state)
        tgt = target(x_t2, t2, labels)
    w = torch.ones(B) if weight is None else weight(sig, n)
    return w * metric(online.float(), tgt.float())
