"""Reading and writing plain weight files (never pickled code).

A weights file holds one raw network's state dict with the reference's key names (so our
exports, the public openai/consistency_models .pt files and teachers are interchangeable):
``.safetensors``, or a torch file loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os

import torch


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    # Our exports saved with torch keep the state dict under "state_dict" next to metadata.
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def save_state_dict(state: dict[str, torch.Tensor], path: str, metadata: dict | None = None):
    """Write atomically (temporary name, then rename) as safetensors or torch."""
    tmp = f"{path}.tmp-{os.getpid()}"
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        meta = {k: json.dumps(v) if not isinstance(v, str) else v
                for k, v in (metadata or {}).items()}
        save_file(state, tmp, metadata=meta)
    else:
        torch.save({"state_dict": state, "metadata": metadata or {}}, tmp)
    os.replace(tmp, path)
