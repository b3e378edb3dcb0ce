"""Small file helpers shared by the checkpoint formats: atomic JSON and safetensors writes."""
from __future__ import annotations

import json
import os
import re

import numpy as np

__all__ = ["write_json", "save_safetensors", "natural_key"]


def write_json(path: str, data: dict) -> None:
    """Writes `data` as indented JSON with sorted keys (as transformers and PEFT do), atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes a safetensors file with `{"format": "pt"}` metadata (what torch readers expect),
    atomically (a crash leaves the previous file or none, never half of one)."""
    from safetensors.numpy import save_file
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def natural_key(s: str):
    """Sort key that orders embedded numbers numerically ("layers.2" before "layers.10")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
