"""ftjax's own small-model file: params as flat safetensors plus the ModelConfig as JSON.

Keys are '/'-joined param paths ("layers/attn/q_proj/kernel"); the ModelConfig is stored in
the safetensors metadata, so one file is a complete model. (Hugging Face layouts live in
`ftjax.io.hf`.)
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from ftjax.io.safetensors_header import read_header
from ftjax.models.config import ModelConfig


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def save_params(path: str, cfg: ModelConfig, params: dict, **metadata: Any) -> None:
    """Writes params (gathered to host, float32 unless bf16) and cfg into one safetensors file."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(params).items()}
    meta = {"ftjax_model_config": json.dumps(cfg.to_dict())}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written model


def load_params(path: str, expected_cfg: ModelConfig | None = None, *,
                check_only: bool = False) -> tuple[ModelConfig, dict | None]:
    """Reads a file written by `save_params`; checks every tensor against the config's shapes.
    A quantized file (`ftjax.io.quantized.save_quantized`) is read by `load_quantized`: its
    params hold Int8Weight/NF4Weight leaves.

    The header (config, tensor names and shapes, the file's size) is checked before any tensor
    is read; `check_only` stops there and returns `(cfg, None)`: seconds for any model size.
    """
    from ftjax import models
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    header = read_header(path, fix="re-download it, or re-export it with save_params")
    meta = header.metadata
    if "ftjax_quantized" in meta:  # weight-only int8/NF4 file: its params are quantized leaves
        from ftjax.io.quantized import load_quantized
        return load_quantized(path, expected_cfg, check_only=check_only)
    if "ftjax_model_config" not in meta:
        raise ValueError(f"{path!r} has no 'ftjax_model_config' metadata; it was not written by "
                         "ftjax.io.params_file.save_params (for Hugging Face directories use "
                         "ftjax.io.hf)")
    cfg = ModelConfig.from_dict(json.loads(meta["ftjax_model_config"]))
    if expected_cfg is not None:
        diff = {k: (v, getattr(cfg, k)) for k, v in expected_cfg.to_dict().items()
                if k not in ("dtype", "param_dtype", "scan_layers", "remat")
                and getattr(cfg, k) != v}
        if diff:
            raise ValueError(f"{path!r} holds a different architecture than configured: "
                             + ", ".join(f"{k}: configured {a!r}, file {b!r}" for k, (a, b) in diff.items()))
    shapes = {k: shape for k, (_, shape) in header.tensors.items()}
    want = flatten(jax.tree.map(lambda s: s.shape, models.param_shapes(cfg),
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    bad = sorted(k for k in set(want) & set(shapes) if tuple(shapes[k]) != tuple(want[k]))
    if missing or unexpected or bad:
        raise ValueError(f"{path!r} does not match its config: missing {missing}, unexpected "
                         f"{unexpected}, wrong shapes "
                         f"{[(k, shapes[k], want[k]) for k in bad]}")
    if check_only:
        return cfg, None
    return cfg, unflatten(load_file(path))
