"""Networks: raw models (ADM UNet, MLP) and the preconditioning wrapped around them."""

from .mlp import MLP
from .unet import PRESETS, UNet, create_unet
from .precond import (ConsistencyPrecond, EDMPrecond, TrigFlowPrecond, c_noise, cm_scalings,
                      edm_scalings, negate_output_layer, sigma_to_trig, trig_to_sigma)

__all__ = ["MLP", "UNet", "PRESETS", "create_unet", "ConsistencyPrecond", "EDMPrecond", "c_noise", "cm_scalings", "edm_scalings",
           "TrigFlowPrecond", "negate_output_layer", "sigma_to_trig", "trig_to_sigma"]
