"""Reading and writing plain weight files (never pickled code).

A weights file holds one raw network's state dict with the reference's key names (so our
exports, the public openai/consistency_models .pt files and teachers are interchangeable):
``.safetensors``, or a torch file loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os

import torch

from .atomic import atomic_path, write_bytes


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


def _safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors' serialisation with a deterministic header.

    The library keeps ``__metadata__`` in a hash map, so its key order (and the file's bytes)
    changes from process to process. The header is re-written here with sorted keys: the same
    weights and metadata give the same bytes, and the file is still read by any safetensors.
    """
    from safetensors.torch import save

    raw = save(state, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items()))  # data_offsets still point into the same buffer
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def save_state_dict(state: dict[str, torch.Tensor], path: str, metadata: dict | None = None):
    """Write atomically (temporary name, then rename) as safetensors or torch."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.endswith(".safetensors"):
        meta = {k: json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
                for k, v in (metadata or {}).items()}
        write_bytes(path, _safetensors_bytes(state, meta))
    else:
        with atomic_path(path) as tmp:
            torch.save({"state_dict": state, "metadata": metadata or {}}, tmp)
