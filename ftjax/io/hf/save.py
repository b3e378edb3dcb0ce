"""Writing ftjax params as a Hugging Face directory that transformers loads."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np

from ftjax.io.files import save_safetensors, write_json
from ftjax.io.hf.config import config_to_hf, hf_problems
from ftjax.io.hf.families import fail
from ftjax.io.hf.layout import MOE_LAYOUTS, leaf_shapes, tensor_layout
from ftjax.io.hf.load import dtype_name
from ftjax.io.hf.tokenizer_files import copy_tokenizer_files
from ftjax.models.config import ModelConfig

__all__ = ["save_pretrained"]

_STORAGE_DTYPES = ("float32", "bfloat16", "float16")


def _host_leaves(params: dict) -> dict[str, np.ndarray]:
    """Flat host copies of every leaf (structured weights materialized to dense)."""
    import jax
    from ftjax.io.params_file import flatten
    from ftjax.peft.core import is_structured, materialize
    flat = {}
    for k, v in flatten(params).items():
        if is_structured(v):
            v = materialize(v)
        flat[k] = np.asarray(jax.device_get(v))
    return flat


def save_pretrained(path: str, cfg: ModelConfig, params: dict, *, shard_size_mb: float = 5000,
                    dtype: Any = None, extra_config: Optional[dict] = None,
                    tokenizer_dir: Optional[str] = None, moe_layout: str = "hub",
                    extra_tensors: Optional[dict[str, np.ndarray]] = None) -> list[str]:
    """Writes a transformers directory: config.json, generation_config.json, safetensors.

    The family is `cfg.family`. Tensors are stored in `dtype` (default cfg.param_dtype; one of
    float32/bfloat16/float16) as `model.safetensors`, or as `model-0000k-of-0000N.safetensors`
    shards of at most `shard_size_mb` plus `model.safetensors.index.json`, all with
    `{"format": "pt"}` metadata. Tied embeddings write no `lm_head.weight`. `extra_config`
    adds config.json keys (bos/eos/pad token ids are null unless given there);
    `tokenizer_dir` copies tokenizer files from another directory. Mixtral experts are written
    per expert (`moe_layout="hub"`, as transformers itself saves them; readable by transformers
    4 and 5) or stacked (`"fused"`, transformers 5's state-dict names). `extra_tensors` (HF
    name -> array, stored as given) go into the last file, e.g. a classification head's
    `score.weight`. Returns the files written.
    """
    path = os.fspath(path)
    storage = dtype_name(dtype if dtype is not None else cfg.param_dtype)
    problems = hf_problems(cfg)
    if storage not in _STORAGE_DTYPES:
        problems.append(f"dtype={storage!r} (use one of {_STORAGE_DTYPES})")
    if moe_layout not in MOE_LAYOUTS:
        problems.append(f"moe_layout={moe_layout!r} (use one of {MOE_LAYOUTS})")
    leaves = leaf_shapes(cfg)
    from ftjax.io.params_file import flatten
    given = flatten(params)
    missing = sorted(set(leaves) - set(given))
    unexpected = sorted(set(given) - set(leaves))
    if missing:
        problems.append(f"params lack leaves {missing}")
    if unexpected:
        problems.append(f"params have leaves the config does not describe {unexpected}")
    for k in sorted(set(leaves) & set(given)):
        shape = tuple(given[k].shape)
        if shape != leaves[k]:
            problems.append(f"param {k!r} has shape {list(shape)}, config expects "
                            f"{list(leaves[k])}")
    if problems:
        raise fail(f"cannot save {cfg.family!r} params as a Hugging Face checkpoint", problems)
    hf_config = config_to_hf(cfg, dtype=storage, extra=extra_config)

    flat = _host_leaves(params)
    layout = tensor_layout(cfg, moe_layout=moe_layout)
    np_storage = np.dtype(storage)
    item = np_storage.itemsize
    sizes = [int(np.prod(e.hf_shape(leaves))) * item for e in layout]
    limit = max(1, int(shard_size_mb * 1024 * 1024))
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    n_shards = len(shards)
    names = (["model.safetensors"] if n_shards == 1 else
             [f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors" for j in range(n_shards)])

    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):  # stale weights of an earlier save would mix with these
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old) \
                and old not in names:
            os.remove(os.path.join(path, old))
    weight_map = {}
    extra = {k: np.ascontiguousarray(v) for k, v in (extra_tensors or {}).items()}
    for name, idx in zip(names, shards):
        tensors = dict(extra) if name == names[-1] else {}
        weight_map.update({k: name for k in tensors})
        for i in idx:
            e = layout[i]
            parts = [flat[p] if layer is None else flat[p][layer] for p, layer in e.targets]
            tensors[e.key] = np.ascontiguousarray(e.to_hf(parts).astype(np_storage, copy=False))
            weight_map[e.key] = name
        save_safetensors(os.path.join(path, name), tensors)
        del tensors
    written = list(names)
    if n_shards > 1:
        total = int(sum(sizes)) + sum(int(v.nbytes) for v in extra.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(os.path.join(path, "model.safetensors.index.json"), index)
        written.append("model.safetensors.index.json")
    write_json(os.path.join(path, "config.json"), hf_config)
    gen = {"_from_model_config": True}
    gen.update({k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config.get(k) is not None})
    write_json(os.path.join(path, "generation_config.json"), gen)
    written += ["config.json", "generation_config.json"]
    if tokenizer_dir is not None:
        written += copy_tokenizer_files(tokenizer_dir, path)
    return written
