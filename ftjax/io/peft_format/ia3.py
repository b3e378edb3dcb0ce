"""PEFT IA3 adapters: writing IA3 weights and reading them back.

IA3's `ia3_l` is [out, 1] for a module whose output it scales and [1, in] for one in
`feedforward_modules` (its input); ftjax's IA3Weight.ia3_l is [.., out] / [.., in].
"""
from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

from ftjax.io import hf
from ftjax.io.files import natural_key
from ftjax.io.params_file import flatten, unflatten
from ftjax.io.peft_format.files import PREFIX, fail, host_slice
from ftjax.io.peft_format.modules import (bias_path, is_feedforward, is_targeted, split_key,
                                          target_modules_for)
from ftjax.io.peft_format.registry import reader_codec

__all__ = ["write_ia3", "read_ia3"]


def write_ia3(req) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, adapter_config) of the IA3 adapter for `req.leaves` (a `save.WriteRequest`):
    `ia3_l` [out, 1] (output scaling) or [1, in] (feedforward_modules: input)."""
    path, cfg, table, leaves, flat = req.path, req.cfg, req.table, req.leaves, req.flat
    problems, tensors, ff_names, names = [], {}, [], []
    for name, module in table.items():
        hit = [(p, i) for p, i in module.parts if p in leaves]
        if not hit:
            continue
        if len(module.parts) > 1:
            problems.append(f"IA3 on the fused module {name!r} (GPT-2 c_attn) is not supported")
            continue
        (p, i), = hit
        w = req.codecs[p].export(leaves[p])
        if not w["feedforward"] and bias_path(p) in flat:
            problems.append(f"{p!r}: IA3 output scaling of a biased projection; PEFT also "
                            "scales the bias, ftjax does not (make it a feedforward target or "
                            "leave it out)")
            continue
        vec = host_slice(w["ia3_l"], i).reshape(-1)
        tensors[f"{PREFIX}{name}.ia3_l"] = vec[None, :] if w["feedforward"] else vec[:, None]
        names.append(name)
        if w["feedforward"]:
            ff_names.append(name)
    if problems:
        raise fail(f"cannot write PEFT adapter {path!r}", problems)
    targets = target_modules_for(names, table)
    ff = target_modules_for(ff_names, table) if ff_names else []
    ff_sel = {n for n in names if any(n.endswith(f) for f in ff)}  # PEFT: endswith, no dot
    if ff_sel != set(ff_names) or not set(ff) <= set(targets):
        ff = sorted(re.escape(n) for n in ff_names)
        ff = "|".join(ff) if ff else []
        targets = "|".join(re.escape(n) for n in names)
    conf = {"peft_type": "IA3", "revision": None, "target_modules": targets,
            "feedforward_modules": ff, "fan_in_fan_out": cfg.family == "gpt2",
            "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None,
            "inference_mode": True}
    return tensors, conf


def read_ia3(req) -> Any:
    """`req.base_params` with the IA3 adapter of `req` (a `load.ReadRequest`) applied: one
    scaling vector per module, ones where a layer has none."""
    path, conf, cfg, base_params = req.path, req.conf, req.cfg, req.base_params
    tensors, table, shapes, problems = req.tensors, req.table, req.shapes, req.problems
    build = reader_codec("ia3").build
    arch = hf.HF_FAMILIES[cfg.family].architecture
    flat = dict(flatten(base_params))
    found, unexpected, missing = {}, [], []
    for key in sorted(tensors, key=natural_key):
        name, why = split_key(key, table, ("ia3_l",))
        if name is None:
            unexpected.append(f"{key} ({why} in {arch})")
        elif not is_targeted(conf, table[name]):
            unexpected.append(f"{key} ({name!r} is not selected by target_modules="
                              f"{conf.get('target_modules')!r})")
        else:
            found[name] = tensors[key]
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    per_leaf: dict[str, dict] = collections.defaultdict(dict)
    ff_of: dict[str, set] = collections.defaultdict(set)
    for name, module in table.items():
        if not is_targeted(conf, module):
            continue
        key = f"{PREFIX}{name}.ia3_l"
        if name not in found:
            missing.append(key)
            continue
        ff = is_feedforward(conf, name)
        want = (1, module.n_in) if ff else (module.n_out, 1)
        if tuple(found[name].shape) != want:
            problems.append(f"tensor {key} has shape {list(found[name].shape)}, expected "
                            f"{list(want)} ({'feedforward: input' if ff else 'output'} scaling)")
            continue
        if module.embedding or len(module.parts) > 1 or isinstance(module.parts[0][1], tuple):
            problems.append(f"IA3 on {name!r} is not supported (embeddings, fused modules and "
                            "per-expert modules)")
            continue
        (leaf, layer), = module.parts
        if not ff and bias_path(leaf) in flat:
            problems.append(f"{name!r}: IA3 output scaling of a biased projection (PEFT scales "
                            "the bias too, ftjax does not)")
            continue
        per_leaf[leaf][layer] = np.asarray(found[name], np.float32).reshape(-1)
        ff_of[leaf].add(ff)
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    for leaf, ffs in ff_of.items():
        if len(ffs) > 1:
            problems.append(f"{leaf!r}: feedforward_modules selects some layers only; ftjax's "
                            "stacked leaf scales all layers on the same side")
    if not per_leaf and not problems:
        problems.append(f"no module of {arch} is selected by target_modules="
                        f"{conf.get('target_modules')!r}")
    if problems:
        raise fail(f"cannot load PEFT adapter {path!r}", problems)
    for leaf, by_layer in per_leaf.items():
        ff = next(iter(ff_of[leaf]))
        shape = shapes[leaf]
        n = shape[-2] if ff else shape[-1]
        if None in by_layer:
            vec = by_layer[None]
        else:
            vec = np.ones((shape[0], n), np.float32)
            for layer, v in by_layer.items():
                vec[layer] = v
        flat[leaf] = build(flat[leaf], ia3_l=vec, feedforward=ff)
    return unflatten(flat)
