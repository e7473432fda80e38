"""Strict loading of a weights file into a raw network, with one error message.

``load_strict(raw, path, preset, what)`` loads ``path`` (:func:`cmscale.weights.load_state_dict`)
into ``raw`` with ``strict=True``; a file that does not fit raises ValueError naming the file,
the preset and the first missing, unexpected and shape-mismatched keys.
"""

from __future__ import annotations

from torch import nn

from .weights import load_state_dict

SHOWN_KEYS = 3  # keys of each kind named in the error


def load_strict(raw: nn.Module, path: str, preset: str, what: str = "weights") -> nn.Module:
    """``raw`` with the weights of ``path``; ValueError if the file does not fit ``preset``."""
    state = load_state_dict(path)
    own = raw.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{name} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}"
                + (", ..." if len(keys) > SHOWN_KEYS else "")
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches (file vs preset)", shapes)) if keys]
    if problems:
        raise ValueError(f"{what} {path} does not fit UNet preset {preset!r}: "
                         + "; ".join(problems))
    raw.load_state_dict(state, strict=True)
    return raw
