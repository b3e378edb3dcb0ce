"""The files of a PEFT adapter directory: names, errors, reading and writing them."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ftjax.io.files import save_safetensors, write_json

__all__ = ["PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "PeftFormatError", "fail", "host",
           "host_slice", "host_any", "write_adapter", "read_adapter_config", "read_tensors"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class PeftFormatError(ValueError):
    """A PEFT adapter that ftjax cannot read or write; lists every problem."""


def fail(what: str, problems: list[str]) -> PeftFormatError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return PeftFormatError(f"{what}: {len(problems)} problem(s):\n{lines}")


def host(x: Any) -> np.ndarray:
    """A float32 host numpy copy of x."""
    import jax
    return np.asarray(jax.device_get(x), np.float32)


def host_slice(x: Any, layer: Any) -> np.ndarray:
    """host(x[layer]); the whole of x for layer None (an unstacked leaf)."""
    return host(x if layer is None else x[layer])


def host_any(x: Any) -> np.ndarray:
    """A host numpy copy of x in its own dtype."""
    import jax
    return np.asarray(jax.device_get(x))


def write_adapter(path: str, tensors: dict[str, np.ndarray], conf: dict) -> None:
    """adapter_model.safetensors (float32) and adapter_config.json, each written atomically."""
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    save_safetensors(os.path.join(path, WEIGHTS_NAME), tensors)
    write_json(os.path.join(path, CONFIG_NAME), conf)


def read_adapter_config(path: str) -> dict:
    """The adapter_config.json dict of a PEFT adapter directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"PEFT adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no {CONFIG_NAME}; is it a PEFT save_pretrained "
                                "directory?")
    with open(cfg_path) as f:
        conf = json.load(f)
    if "peft_type" not in conf:
        raise PeftFormatError(f"{cfg_path} has no 'peft_type'")
    return conf


def read_tensors(path: str, problems: list[str]) -> dict[str, np.ndarray]:
    """The adapter's tensors ({} and a problem when there is no safetensors file)."""
    f = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(f):
        bins = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {bins}: ftjax reads no pickles; re-save with PEFT's save_pretrained, "
                "which writes safetensors by default)") if bins else ""
        problems.append(f"no {WEIGHTS_NAME} in {path!r}{hint}")
        return {}
    from safetensors.numpy import load_file

    from ftjax.io.safetensors_header import read_header
    read_header(f, fix="re-export or re-download the adapter")  # truncated: one line naming it
    return load_file(f)
