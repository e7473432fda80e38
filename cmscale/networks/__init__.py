"""Networks: raw models (ADM UNet, MLP) and the preconditioning wrapped around them."""

from .mlp import MLP
from .precond import ConsistencyPrecond, EDMPrecond, c_noise, cm_scalings, edm_scalings

__all__ = ["MLP", "ConsistencyPrecond", "EDMPrecond", "c_noise", "cm_scalings", "edm_scalings"]
