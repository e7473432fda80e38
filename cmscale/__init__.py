"""cmscale: distributed training of diffusion consistency models (Song et al. 2023; iCT)."""

__version__ = "0.2.0"
