"""Weight-only quantized inference: int8 / NF4 params for generation and serving, and a
one-file quantized checkpoint that loads without ever holding the float weights.

    qparams = quantize_for_inference(params, "int8")      # or "nf4"
    save_quantized("model.int8.safetensors", cfg, qparams)
    cfg, qparams = load_quantized("model.int8.safetensors")
    python -m ftjax.io.quantized --model base.safetensors --kind nf4 --out base.nf4.safetensors

The quantized leaves are `ftjax.peft.quant`'s structured weights (`Int8Weight`: per-output
channel absmax; `NF4Weight`: 64-blocks, double-quantized block scales), so the model runs
them unchanged through `linear`: every product dequantizes one matrix (one layer's, under the
scan) inside the traced op. That saves parameter memory, not compute: without int8/NF4 kernels
(CPU, and this code on any backend) a decode step costs the dequantization on top of the
float matmul. Embeddings, norms, biases and MoE routers stay float (small, and the
embedding's rows are looked up rather than multiplied).

File format (FORMAT, version FORMAT_VERSION): one safetensors file, written atomically.
  tensors:  every leaf that was not quantized under its param path ("embed/embedding"); every
            quantized kernel only as its fields, "<path>.<field>" ("layers/attn/q_proj/
            kernel.codes", ".scale" / ".absmax", ".absmax_scale", ".absmax_offset"). No
            tensor holds a float copy of a quantized kernel.
  metadata: "ftjax_model_config" (the ModelConfig as JSON, as in params files),
            "ftjax_quantized" (JSON: format, version, kind, block_size and per quantized leaf
            its type, dense shape, dtype and static fields), and the caller's own keys (JSON
            values; e.g. the `chat_template` a run recorded).
`load_quantized` checks the header against the config (every field's expected shape and dtype
comes from `jax.eval_shape` of the quantizer, so nothing is computed) before reading any
tensor, then rebuilds the structured leaves from the integer codes and scales directly.
`ftjax.io.params_file.load_params` hands such files to `load_quantized`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.io.params_file import flatten, unflatten
from ftjax.io.safetensors_header import WeightsFileError, read_header
from ftjax.models.config import ModelConfig
from ftjax.peft import core, quant

__all__ = ["FORMAT", "FORMAT_VERSION", "KINDS", "DEFAULT_TARGETS", "quantize_for_inference",
           "quantized_kind", "param_bytes", "save_quantized", "load_quantized",
           "is_quantized_file", "main"]

FORMAT = "ftjax-quantized"
FORMAT_VERSION = 1
META_KEY = "ftjax_quantized"
CONFIG_KEY = "ftjax_model_config"
KINDS = ("int8", "nf4")
# Every dense projection: attention, dense MLP, stacked MoE experts and their shared experts,
# and the untied LM head. (A tied head is the embedding table, which stays float.)
DEFAULT_TARGETS = (
    r"layers/attn/(q|k|v|o)_proj/kernel",
    r"layers/mlp/(gate|up|down)_proj/kernel",
    r"layers/moe/(gate|up|down)_proj/kernel",
    r"layers/moe/shared/(gate|up|down)_proj/kernel",
    r"lm_head/kernel",
)
_TYPES = {"int8": quant.Int8Weight, "nf4": quant.NF4Weight}
_KIND_OF = {cls: kind for kind, cls in _TYPES.items()}
# numpy dtype name -> safetensors dtype string (as the header spells it).
_ST_DTYPES = {"uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
              "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
              "bool": "BOOL"}
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_FIX = "re-write it with ftjax.io.quantized.save_quantized (or python -m ftjax.io.quantized)"


# ------------------------------------------------------------------------------------------
# Quantizing params
# ------------------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; choose one of {list(KINDS)} "
                         "(weight-only int8 per output channel, or NF4 in 64-blocks)")


def _require_float_matrix(path: str, w: Any) -> None:
    if isinstance(w, quant.QUANTIZED):
        raise ValueError(f"{path} is already quantized ({type(w).__name__}); quantize the float "
                         "params, not quantized ones")
    if core.is_structured(w):
        raise ValueError(f"{path} is a {type(w).__name__}, not a dense weight; merge the "
                         "adapters first (ftjax.peft.core.merge) and quantize the merged params")
    if not path.endswith(("/kernel", "/embedding")):
        raise ValueError(f"{path} is not a matmul weight (a kernel or an embedding table); only "
                         "those go through the model's linear/embed ops: drop it from the targets")
    dtype = jnp.dtype(getattr(w, "dtype", "int32")).name
    if getattr(w, "ndim", 0) < 2 or dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{path} (shape {getattr(w, 'shape', None)}, dtype {dtype}) is not a "
                         f"float matrix [.., in, out] of {list(_FLOAT_DTYPES)}")


def quantize_for_inference(params: Any, kind: str = "int8",
                           targets: Optional[Sequence[str]] = None, block_size: int = 64,
                           double_quant: bool = True) -> Any:
    """Weight-only quantization of every dense projection kernel (`DEFAULT_TARGETS`, or the
    `targets` regexes over param paths) to `Int8Weight` (kind "int8") or `NF4Weight` ("nf4",
    `block_size` weights per scale, double-quantized scales unless `double_quant=False`;
    both are ignored by int8, which has one scale per output channel). Other leaves are
    returned as they are. Raises for an unknown kind, for targets that match nothing, and for
    matched leaves that are not float matrices (already quantized, or LoRA-wrapped: merge)."""
    _check_kind(kind)
    kw = {}
    if kind == "nf4":
        if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
            raise ValueError(f"NF4 block_size must be a positive even integer, got {block_size!r}")
        kw = dict(block_size=block_size, double_quant=bool(double_quant))
    return core.select_targets(params, tuple(targets or DEFAULT_TARGETS),
                               lambda path, w, k: quant.quantize(w, kind, **kw),
                               name=f"{kind} quantization", check=_require_float_matrix)


def _quantized_items(params: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    core.map_weights(lambda p, w: out.append((p, w)) if isinstance(w, quant.QUANTIZED)
                     else None, params)
    return out


def quantized_kind(params: Any) -> Optional[str]:
    """"int8" or "nf4" when the tree's quantized leaves are all of that kind, "mixed" when
    both occur, None when nothing is quantized."""
    kinds = {_KIND_OF[type(w)] for _, w in _quantized_items(params)}
    return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def _nbytes(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def param_bytes(params: Any) -> dict[str, int]:
    """Bytes the params occupy: `total` (every array, quantized fields included),
    `quantized` (the codes and scales of the quantized leaves), `quantized_as_float32` (what
    those leaves would take as dense float32) and `float` (every other array)."""
    quantized = sum(_nbytes(x) for _, w in _quantized_items(params) for x in jax.tree.leaves(w))
    dense = sum(4 * int(np.prod(w.shape, dtype=np.int64)) for _, w in _quantized_items(params))
    total = sum(_nbytes(x) for x in jax.tree.leaves(params))
    return {"total": total, "quantized": quantized, "quantized_as_float32": dense,
            "float": total - quantized}


# ------------------------------------------------------------------------------------------
# The file: per-leaf entries and the header check shared by save and load
# ------------------------------------------------------------------------------------------

def _entry(w: Any) -> dict:
    """The JSON entry of a quantized leaf: what `_expected_leaf` needs to rebuild its layout."""
    if isinstance(w, quant.NF4Weight):
        shape = list(w.codes.shape[:-2]) + [int(w.n_in), int(w.codes.shape[-1])]
        return {"type": "nf4", "shape": shape, "dtype": w.dtype, "block_size": w.block_size,
                "block_size2": w.block_size2, "double_quant": bool(w.double_quant)}
    return {"type": "int8", "shape": list(w.codes.shape), "dtype": w.dtype}


def _expected_leaf(path: str, entry: Any, file: str) -> Any:
    """The quantized leaf an entry describes, its array fields as ShapeDtypeStructs (from
    `jax.eval_shape` of the quantizer: nothing is computed or allocated)."""
    def bad(problem: str) -> WeightsFileError:
        return WeightsFileError(f"{file}: corrupt '{META_KEY}' metadata: leaf {path!r} {problem}; "
                                f"{_FIX}")
    if not isinstance(entry, dict) or entry.get("type") not in _TYPES:
        raise bad(f"has type {entry.get('type') if isinstance(entry, dict) else entry!r}, "
                  f"not one of {list(_TYPES)}")
    shape, dtype = entry.get("shape"), entry.get("dtype")
    if not (isinstance(shape, list) and len(shape) >= 2
            and all(isinstance(d, int) and d > 0 for d in shape)):
        raise bad(f"has shape {shape!r}, not a list of >= 2 positive ints")
    if dtype not in _FLOAT_DTYPES:
        raise bad(f"has dtype {dtype!r}, not one of {list(_FLOAT_DTYPES)}")
    dense = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    if entry["type"] == "int8":
        return jax.eval_shape(quant.quantize_int8, dense)
    kw = {k: entry.get(k) for k in ("block_size", "block_size2", "double_quant")}
    if not (isinstance(kw["block_size"], int) and kw["block_size"] >= 2
            and kw["block_size"] % 2 == 0 and isinstance(kw["block_size2"], int)
            and kw["block_size2"] >= 1 and isinstance(kw["double_quant"], bool)):
        raise bad(f"has NF4 settings {kw}, not an even block_size >= 2, a block_size2 >= 1 "
                  "and a boolean double_quant")
    return jax.eval_shape(lambda w: quant.quantize_nf4(w, **kw), dense)


def _fields(w: Any) -> dict[str, Any]:
    """The non-None array fields of a quantized leaf."""
    return {f: getattr(w, f) for f in w.array_fields() if getattr(w, f) is not None}


def _check_layout(file: str, cfg: ModelConfig, tensors: dict[str, tuple[str, tuple]],
                  leaves: dict) -> dict[str, Any]:
    """Checks that `tensors` (name -> (safetensors dtype, shape)) and the per-leaf `leaves`
    entries form exactly the model of `cfg`; returns path -> expected quantized leaf."""
    from ftjax import models
    want = flatten(jax.tree.map(lambda s: tuple(s.shape), models.param_shapes(cfg),
                                is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    problems: list[str] = []
    expected: dict[str, Any] = {}
    used: set[str] = set()
    for path in sorted(set(leaves) - set(want)):
        problems.append(f"quantized leaf {path!r} is not a param of the model")
    for path, shape in want.items():
        if path in leaves:
            e = _expected_leaf(path, leaves[path], file)
            if tuple(leaves[path]["shape"]) != tuple(shape):
                problems.append(f"{path}: quantized from shape {tuple(leaves[path]['shape'])}, "
                                f"the model's is {tuple(shape)}")
                continue
            if path in tensors:
                problems.append(f"{path}: a float copy is stored beside its quantized fields")
            for field, sds in _fields(e).items():
                name = f"{path}.{field}"
                got = tensors.get(name)
                need = (_ST_DTYPES[np.dtype(sds.dtype).name], tuple(sds.shape))
                if got is None:
                    problems.append(f"missing tensor {name!r}")
                elif (got[0], tuple(got[1])) != need:
                    problems.append(f"{name}: {got[0]} {tuple(got[1])}, expected {need[0]} "
                                    f"{need[1]}")
                used.add(name)
            expected[path] = e
        elif path not in tensors:
            problems.append(f"missing tensor {path!r}")
        else:
            used.add(path)
            if tuple(tensors[path][1]) != tuple(shape):
                problems.append(f"{path}: shape {tuple(tensors[path][1])}, the model's is "
                                f"{tuple(shape)}")
            elif tensors[path][0] not in ("F32", "BF16", "F16"):
                problems.append(f"{path}: dtype {tensors[path][0]}, expected F32, BF16 or F16")
    problems += [f"unexpected tensor {n!r}" for n in sorted(set(tensors) - used - set(want))]
    if problems:
        raise WeightsFileError(f"{file}: does not match its config: " + "; ".join(problems[:12])
                               + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12
                                  else ""))
    return expected


def _cfg_diff(cfg: ModelConfig, expected_cfg: ModelConfig, path: str) -> None:
    diff = {k: (v, getattr(cfg, k)) for k, v in expected_cfg.to_dict().items()
            if k not in ("dtype", "param_dtype", "scan_layers", "remat")
            and getattr(cfg, k) != v}
    if diff:
        raise ValueError(f"{path!r} holds a different architecture than configured: "
                         + ", ".join(f"{k}: configured {a!r}, file {b!r}"
                                     for k, (a, b) in diff.items()))


# ------------------------------------------------------------------------------------------
# Save and load
# ------------------------------------------------------------------------------------------

def save_quantized(path: str, cfg: ModelConfig, qparams: Any,
                   metadata: Optional[dict] = None) -> None:
    """Writes quantized params (from `quantize_for_inference`) and `cfg` as one safetensors
    file (see the module docstring), atomically. The tree must be exactly the model of `cfg`
    (checked as `load_quantized` checks it); adapters must be merged first. `metadata`: extra
    JSON-serialisable values stored under their keys (e.g. `chat_template`)."""
    metadata = dict(metadata or {})
    reserved = sorted({META_KEY, CONFIG_KEY} & set(metadata))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are written by save_quantized itself")
    tensors: dict[str, np.ndarray] = {}
    leaves: dict[str, dict] = {}
    for p, v in flatten(qparams).items():
        if isinstance(v, quant.QUANTIZED):
            leaves[p] = _entry(v)
            for field, x in _fields(v).items():
                tensors[f"{p}.{field}"] = np.asarray(jax.device_get(x))
        elif core.is_structured(v):
            raise ValueError(f"{p} is a {type(v).__name__}: merge the adapters "
                             "(ftjax.peft.core.merge) and quantize the merged params "
                             "before saving")
        else:
            tensors[p] = np.asarray(jax.device_get(v))
    if not leaves:
        raise ValueError("no quantized leaves in the params; run quantize_for_inference first "
                         "(float params are saved with ftjax.io.params_file.save_params)")
    header = {k: (_ST_DTYPES.get(v.dtype.name, v.dtype.name), v.shape)
              for k, v in tensors.items()}
    _check_layout(path, cfg, header, leaves)
    kinds = sorted({e["type"] for e in leaves.values()})
    block = sorted({e["block_size"] for e in leaves.values() if e["type"] == "nf4"})
    info = {"format": FORMAT, "version": FORMAT_VERSION,
            "kind": kinds[0] if len(kinds) == 1 else "mixed",
            "block_size": block[0] if len(block) == 1 else (block or None),
            "leaves": leaves}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta.update({CONFIG_KEY: json.dumps(cfg.to_dict()), META_KEY: json.dumps(info)})
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written model


def is_quantized_file(path: str) -> bool:
    """True when `path` is a safetensors file written by `save_quantized`."""
    return META_KEY in read_header(path).metadata


def _read_info(path: str, header) -> dict:
    meta = header.metadata
    if META_KEY not in meta:
        raise ValueError(f"{path!r} is not a quantized ftjax file (no '{META_KEY}' metadata); "
                         "load float params files with ftjax.io.params_file.load_params and "
                         "quantize them with quantize_for_inference")
    try:
        info = json.loads(meta[META_KEY])
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise WeightsFileError(f"{path}: corrupt '{META_KEY}' metadata ({e}); {_FIX}") from None
    if info.get("format") != FORMAT:
        raise WeightsFileError(f"{path}: '{META_KEY}' metadata names format "
                               f"{info.get('format')!r}, not {FORMAT!r}; {_FIX}")
    version = info.get("version")
    if not isinstance(version, int) or version < 1:
        raise WeightsFileError(f"{path}: corrupt '{META_KEY}' metadata: version {version!r}; "
                               f"{_FIX}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path!r} is quantized-format version {version}, newer than the "
                         f"{FORMAT_VERSION} this ftjax reads; update ftjax")
    if not isinstance(info.get("leaves"), dict) or not info["leaves"]:
        raise WeightsFileError(f"{path}: corrupt '{META_KEY}' metadata: no per-leaf entries "
                               f"('leaves'); {_FIX}")
    return info


def load_quantized(path: str, expected_cfg: Optional[ModelConfig] = None, *,
                   check_only: bool = False) -> tuple[ModelConfig, Any]:
    """(cfg, qparams) from a file written by `save_quantized`: the quantized leaves are
    rebuilt from their stored codes and scales (no float weight is ever formed), the other
    leaves are the stored arrays (numpy, as `load_params` returns them).

    The header (metadata, every tensor's name, dtype and shape, the file's size) is checked
    against the config before any tensor is read; `check_only` stops there and returns
    `(cfg, None)`. `expected_cfg`: refuse a file of another architecture."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"quantized model file {path!r} does not exist")
    header = read_header(path, fix=_FIX)
    info = _read_info(path, header)
    if CONFIG_KEY not in header.metadata:
        raise WeightsFileError(f"{path}: no '{CONFIG_KEY}' metadata; {_FIX}")
    try:
        cfg = ModelConfig.from_dict(json.loads(header.metadata[CONFIG_KEY]))
    except (ValueError, TypeError) as e:
        raise WeightsFileError(f"{path}: corrupt '{CONFIG_KEY}' metadata ({e}); {_FIX}") \
            from None
    if expected_cfg is not None:
        _cfg_diff(cfg, expected_cfg, path)
    expected = _check_layout(path, cfg, header.tensors, info["leaves"])
    if check_only:
        return cfg, None
    from safetensors.numpy import load_file
    stored = load_file(path)
    flat: dict[str, Any] = {}
    for p, e in expected.items():
        flat[p] = dataclasses.replace(e, **{f: stored.pop(f"{p}.{f}") for f in _fields(e)})
    flat.update(stored)
    return cfg, unflatten(flat)


# ------------------------------------------------------------------------------------------
# python -m ftjax.io.quantized: write a quantized file from a params file or an HF directory
# ------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(prog="python -m ftjax.io.quantized",
                                description="Write a weight-only quantized ftjax file (int8 or "
                                            "NF4) from a params file or an HF directory.")
    p.add_argument("--model", required=True,
                   help="ftjax params .safetensors file, or a Hugging Face directory")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="the quantized .safetensors file to write")
    p.add_argument("--block-size", type=int, default=64, help="NF4 block size")
    p.add_argument("--no-double-quant", action="store_true",
                   help="NF4: float32 block scales instead of 8-bit double-quantized ones")
    args = p.parse_args(argv)
    from ftjax.io.files import read_metadata
    if os.path.isdir(args.model):
        from ftjax.io.hf import load_pretrained
        cfg, params = load_pretrained(args.model)
        meta = {"source": os.path.abspath(args.model)}
    else:
        from ftjax.io.params_file import load_params
        if os.path.isfile(args.model) and is_quantized_file(args.model):
            raise ValueError(f"{args.model!r} is already quantized; quantize the float model")
        cfg, params = load_params(args.model)
        meta = {k: v for k, v in read_metadata(args.model).items() if k != CONFIG_KEY}
    meta["quantized_from"] = os.path.abspath(args.model)
    qparams = quantize_for_inference(params, args.kind, block_size=args.block_size,
                                     double_quant=not args.no_double_quant)
    del params
    save_quantized(args.out, cfg, qparams, meta)
    b = param_bytes(qparams)
    print(f"wrote {args.out}: {args.kind}, {os.path.getsize(args.out):,} bytes (quantized "
          f"kernels {b['quantized']:,} bytes, {b['quantized_as_float32']:,} as float32)")
    return args.out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"python -m ftjax.io.quantized: error: {e}")
