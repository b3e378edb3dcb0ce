"""Small file helpers shared by the checkpoint formats: atomic JSON and safetensors writes,
safetensors metadata."""
from __future__ import annotations

import json
import os
import re

import numpy as np

__all__ = ["write_json", "save_safetensors", "read_metadata", "natural_key"]


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


def read_metadata(path: str) -> dict:
    """The metadata of a safetensors file, JSON values decoded. For ftjax params files:
    `ftjax_model_config` and what the writer passed to `save_params`, e.g. `chat_template`
    ({"name", "source"}: the layout a run trained in) or `source` (the Hugging Face directory
    a file was converted from)."""
    from ftjax.io.safetensors_header import read_header  # a damaged file: one line naming it
    meta = read_header(path).metadata
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def natural_key(s: str):
    """Sort key that orders embedded numbers numerically ("layers.2" before "layers.10")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
