"""Reading a Hugging Face directory (config.json + safetensors) into ftjax params."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", so safetensors can read bf16)
import numpy as np

from ftjax.io.files import natural_key
from ftjax.io.safetensors_header import WeightsFileError, read_header
from ftjax.io.hf.config import parse_config, read_config
from ftjax.io.hf.families import SUPPORTED_ARCHITECTURES, fail
from ftjax.io.hf.layout import (Entry, detect_moe_layout, detect_prefix, ignorable, leaf_shapes,
                                tensor_layout)
from ftjax.models.config import DTYPES, ModelConfig

__all__ = ["load_pretrained"]

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def dtype_name(dtype: Any) -> str:
    """numpy's name of a dtype-like ("bfloat16", "float32")."""
    return np.dtype(dtype).name


def _weight_files(path: str, problems: list[str]) -> list[str]:
    """The safetensors files of a directory (from the index when there is one)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
        except (ValueError, AttributeError) as e:
            raise WeightsFileError(f"{index}: not a valid index ({e}); re-download the "
                                   "checkpoint") from None
        files = sorted(set(weight_map.values()), key=natural_key)
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                keys = [k for k, v in weight_map.items() if v == name]
                problems.append(f"shard {name!r} named in model.safetensors.index.json is "
                                f"missing (it holds {len(keys)} tensors: {keys})")
        return [f for f in files if os.path.isfile(os.path.join(path, f))]
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    files = sorted((f for f in os.listdir(path) if f.endswith(".safetensors")), key=natural_key)
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {bins}: ftjax reads no pickles; re-save with transformers' "
                "save_pretrained, which writes safetensors)") if bins else ""
        problems.append(f"no *.safetensors files in {path!r}{hint}")
    return files


def _read_headers(path: str, files: list[str]) -> dict[str, tuple[str, tuple, str]]:
    """key -> (file, shape, safetensors dtype), reading only the headers."""
    out: dict[str, tuple[str, tuple, str]] = {}
    for name in files:  # a truncated or corrupt shard: one line naming it (WeightsFileError)
        header = read_header(os.path.join(path, name), fix="re-download the checkpoint")
        for k, (dtype, shape) in header.tensors.items():
            out[k] = (name, shape, dtype)
    return out


def load_pretrained(path: str, dtype: Any = None, *, check_only: bool = False,
                    hf_config: Optional[dict] = None, extra_tensors: Sequence[str] = ()
                    ) -> tuple[ModelConfig, dict | None]:
    """Reads a local Hugging Face directory into `(ModelConfig, params)`.

    The architecture comes from config.json; tensors are streamed one at a time into
    preallocated layer-stacked numpy arrays of `dtype` (default float32; "bfloat16" halves
    host memory), recorded as `cfg.param_dtype`. Leaves are host numpy arrays: place them with
    `jax.device_put(params, shardings)`. Raises `HFCheckpointError` listing every problem.
    Every check reads only config.json and the safetensors headers; `check_only` stops after
    them and returns `(cfg, None)`. hf_config replaces config.json (e.g. a sequence
    classification config read as its causal LM, `seqcls.py`); extra_tensors are tensors the
    file may hold outside the causal LM's layout (read separately by the caller).
    """
    path = os.fspath(path)
    c = hf_config if hf_config is not None else read_config(path)
    problems: list[str] = []
    family, fields, cfg_problems = parse_config(c)
    problems += [f"config.json: {p}" for p in cfg_problems]
    dtype = dtype_name(dtype) if dtype is not None else "float32"
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r} is not a ModelConfig param_dtype (use one of {DTYPES})")
        dtype = "float32"
    cfg = None
    if family is not None:
        try:
            cfg = ModelConfig(**fields, param_dtype=dtype)
        except ValueError as e:
            problems.append(f"config.json: {e}")
    files = _weight_files(path, problems)
    headers = _read_headers(path, files) if files else {}
    layout: dict[str, Entry] = {}
    if cfg is not None:
        leaves = leaf_shapes(cfg)
        layout = {e.key: e for e in tensor_layout(cfg, detect_prefix(cfg, headers),
                                                  detect_moe_layout(cfg, headers))}
        missing = [k for k in layout if k not in headers]
        if missing and headers:
            problems.append(f"missing tensors ({len(missing)}): {missing}")
        unexpected = sorted((k for k in headers if k not in layout and not ignorable(k, cfg)
                             and k not in extra_tensors),
                            key=natural_key)
        if unexpected:
            problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
        dense = [k for k in unexpected if re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", k)]
        if getattr(cfg, "num_experts", 0) and dense:
            problems.append(f"the file holds dense MLP weights ({dense[0]}, ...), but config.json "
                            f"describes {SUPPORTED_ARCHITECTURES[family][0]}, a mixture-of-experts "
                            "model with router and expert weights; is its architecture right?")
        for k, e in layout.items():
            if k in headers:
                want, got = e.hf_shape(leaves), headers[k][1]
                if got != want:
                    problems.append(f"tensor {k!r} in {headers[k][0]} has shape {list(got)}, "
                                    f"expected {list(want)} from config.json")
    for k, (name, _, dt) in sorted(headers.items(), key=lambda kv: natural_key(kv[0])):
        if dt not in _SAFETENSORS_DTYPES and k in layout:
            problems.append(f"tensor {k!r} in {name} has dtype {dt} (supported: "
                            f"{sorted(_SAFETENSORS_DTYPES)})")
    if problems:
        raise fail(f"cannot load Hugging Face checkpoint {path!r}"
                    + (f" as {SUPPORTED_ARCHITECTURES[family][0]}" if family else ""), problems)
    if check_only:
        return cfg, None

    np_dtype = np.dtype(dtype)
    leaves = leaf_shapes(cfg)
    flat = {p: np.empty(s, np_dtype) for p, s in leaves.items()}
    from safetensors import safe_open
    by_file: dict[str, list[str]] = {}
    for k in layout:
        by_file.setdefault(headers[k][0], []).append(k)
    for name in files:
        for k in by_file.get(name, []):
            # Reopened per tensor: safe_open memory-maps the file, and the pages read stay
            # resident while it is open, which would double peak host memory.
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                t = f.get_tensor(k)
            e = layout[k]
            for (leaf, layer), part in zip(e.targets, e.to_ftjax(t)):
                if layer is None:
                    flat[leaf][...] = part
                else:
                    flat[leaf][layer] = part
            del t
    from ftjax.io.params_file import unflatten
    return cfg, unflatten(flat)

