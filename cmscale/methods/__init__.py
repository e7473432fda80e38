"""Training methods as plug-ins, one module each, chosen by ``loss.mode``.

``build_method(cfg, device)`` returns the :class:`Method` (schedule, per-example loss, what it
logs, its set-up); ``build_net(cfg)`` the plain preconditioned network it trains.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..networks import create_unet
from .base import Method
from .cd import CD
from .ct import CT
from .ect import ECT
from .edm import EDM
from .ict import ICT
from .scm import SCD, SCT

METHODS: dict[str, type[Method]] = {"edm": EDM, "cd": CD, "ct": CT, "ict": ICT, "ect": ECT,
                                     "sct": SCT, "scd": SCD}


def build_method(cfg: Config, device) -> Method:
    return METHODS[cfg.loss.mode](cfg, device)


def build_net(cfg: Config) -> torch.nn.Module:
    """The plain network: the UNet inside the method's preconditioning (consistency function
    f(x, sigma), or EDM denoiser D(x; sigma))."""
    raw = create_unet(cfg.net.preset, **{"kernels": cfg.net.kernels, **cfg.net.overrides})
    method = METHODS[cfg.loss.mode]
    return method.precond(raw, sigma_data=cfg.net.sigma_data, sigma_min=cfg.net.sigma_min,
                          sigma_max=cfg.net.sigma_max, **method.precond_kwargs(cfg))
