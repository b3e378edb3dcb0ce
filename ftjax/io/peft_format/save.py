"""`save_peft_adapter`: ftjax params with adapter leaves -> a PEFT adapter directory.

Each structured leaf is written by its codec (registry.py); all of them must share one
peft_type, whose format (lora_write.py, ia3.py) makes the tensors and adapter_config.json.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from ftjax.io import hf
from ftjax.io.files import natural_key
from ftjax.io.params_file import flatten
from ftjax.io.peft_format.files import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, fail, host_any,
                                        write_adapter)
from ftjax.io.peft_format.modules import Module, Param, module_table, param_table
from ftjax.io.peft_format.registry import Codec, codec_for, format_for, supported_weights
from ftjax.models.config import ModelConfig
from ftjax.peft.core import is_structured

__all__ = ["WriteRequest", "save_peft_adapter"]


@dataclasses.dataclass(frozen=True)
class WriteRequest:
    """What a format's writer gets: the adapter leaves (by path) with their codecs, every
    flat param, and the model's adaptable modules (`table`) and MoE parameters (`ptable`)."""
    path: str
    cfg: ModelConfig
    leaves: dict[str, Any]
    codecs: dict[str, Codec]
    flat: dict[str, Any]
    table: dict[str, Module]
    ptable: dict[str, Param]
    use_rslora: Optional[bool] = None


def save_peft_adapter(path: str, cfg: ModelConfig, params: Any, *,
                      base_model_name_or_path: str = "", task_type: Optional[str] = "CAUSAL_LM",
                      use_rslora: Optional[bool] = None,
                      modules_to_save: Sequence[str] = ()) -> list[str]:
    """Writes the adapter leaves of `params` (LoRA, DoRA, IA3: any weight with a registered
    codec, see registry.py) as a PEFT adapter directory.

    Files: `adapter_config.json` (sorted keys, as PEFT writes) and `adapter_model.safetensors`
    (float32, `{"format": "pt"}`). r / lora_alpha are the most common rank and alpha, with
    `rank_pattern` / `alpha_pattern` for the modules that differ; every alpha is chosen so
    that PEFT's scale equals the leaf's `scale` exactly. `use_rslora` only changes how the
    scales are expressed (None: whichever needs fewer alpha_pattern entries, plain on ties).
    With any DoRA leaf the adapter is `use_dora` (PEFT's flag is global), and plain LoRA
    leaves get the magnitude that makes DoRA their identity. Leaves that are not adapters are
    not written: the adapter applies to the base model the user loads (e.g. the one
    `base_model_name_or_path` names), except `modules_to_save`: paths of plain leaves that
    were trained in full (e.g. "lm_head/kernel"), written as PEFT's `modules_to_save` (the
    whole transformers module: weight and bias). Returns the files written.
    """
    path = os.fspath(path)
    problems = hf.hf_problems(cfg)
    if problems:
        raise fail(f"cannot write a PEFT adapter for a {cfg.family!r} ModelConfig", problems)
    table = module_table(cfg)
    ptable = param_table(cfg)
    param_slots = {p for t in ptable.values() for p, _ in t.parts}
    slots = {p for m in table.values() for p, _ in m.parts} | param_slots
    flat = flatten(params)
    leaves: dict[str, Any] = {}
    codecs: dict[str, Codec] = {}
    kinds: dict[str, str] = {}
    peft_types: dict[str, str] = {}
    for p, w in flat.items():
        if not is_structured(w):
            continue
        codec = codec_for(w)
        kinds[p] = codec.kind if codec else type(w).__name__
        if codec is None:
            problems.append(f"{p!r} is a {kinds[p]}, which has no PEFT form (supported: "
                            f"{supported_weights()})")
            continue
        peft_types[p] = codec.peft_type
        if p not in slots:
            problems.append(f"{p!r} holds an adapter, but it is not the weight of a "
                            f"transformers module of {hf.HF_FAMILIES[cfg.family].architecture} "
                            f"(adaptable leaves: {sorted(slots)})")
        elif p in param_slots and not codec.on_experts:
            problems.append(f"{p!r} is a {kinds[p]} adapter on a mixture-of-experts weight; "
                            "PEFT adapts these raw parameters (target_parameters) with plain "
                            "LoRA only (use LoRA there, or export merged)")
        else:
            leaves[p] = w
            codecs[p] = codec
    if not kinds:
        problems.append("params contain no adapter leaves (LoRAWeight); apply a PEFT method "
                        "first, or use ftjax.io.hf.save_pretrained for a full model")
    if len(set(peft_types.values())) > 1:
        problems.append(f"{' and '.join(sorted(set(peft_types.values())))} leaves mixed: a PEFT "
                        "adapter has one peft_type ("
                        + ", ".join(f"{p}: {k}" for p, k in kinds.items()) + ")")
    if problems:
        raise fail(f"cannot write PEFT adapter {path!r}", problems)
    saved_modules, full_tensors = saved_module_tensors(path, cfg, params, modules_to_save, leaves)
    peft_type = next(iter(peft_types.values()))
    fmt = format_for(peft_type)
    if fmt is None:
        raise fail(f"cannot write PEFT adapter {path!r}",
                   [f"no format is registered for peft_type {peft_type!r}"])
    tensors, conf = fmt.write(WriteRequest(path, cfg, leaves, codecs, flat, table, ptable,
                                           use_rslora))
    conf.update(task_type=task_type, base_model_name_or_path=base_model_name_or_path or None,
                modules_to_save=saved_modules)
    write_adapter(path, {**tensors, **full_tensors}, conf)
    return [CONFIG_NAME, WEIGHTS_NAME]


def saved_module_tensors(path: str, cfg: ModelConfig, params: Any, paths: Sequence[str],
                     adapted: dict) -> tuple[Optional[list[str]], dict[str, np.ndarray]]:
    """(modules_to_save config value, full tensors) for the transformers modules holding the
    plain leaves `paths`; PEFT saves a listed module's whole state dict under its own keys."""
    if not paths:
        return None, {}
    flat = flatten(params)
    layout = hf.tensor_layout(cfg)
    by_module: dict[str, list] = collections.defaultdict(list)
    for e in layout:
        by_module[e.key.rsplit(".", 1)[0]].append(e)
    problems = []
    for p in paths:
        if p not in flat:
            problems.append(f"modules_to_save: no param {p!r}")
        elif is_structured(flat[p]):
            problems.append(f"modules_to_save: {p!r} is an adapter leaf, not a plain weight")
        elif cfg.tie_embeddings and p == "embed/embedding":
            problems.append("modules_to_save: the embedding of a model with tied embeddings "
                            "(export it merged instead)")
    wanted = {m for m, es in by_module.items()
              if any(leaf in paths for e in es for leaf, _ in e.targets)}
    for m in sorted(wanted, key=natural_key):
        clash = [leaf for e in by_module[m] for leaf, _ in e.targets if leaf in adapted]
        if clash:
            problems.append(f"modules_to_save: module {m!r} also holds the adapter leaves "
                            f"{sorted(set(clash))} (PEFT does not adapt saved modules)")
    if problems:
        raise fail(f"cannot write PEFT adapter {path!r}", problems)

    def selected(names):
        return {m for m in by_module if any(re.match(rf"(^|.*\.){n}($|\..*)", m)
                                            for n in names)}
    names = sorted({m.rsplit(".", 1)[-1] for m in wanted})
    if selected(names) != wanted:
        names = sorted(re.escape(m) for m in wanted)
    host = {leaf: host_any(flat[leaf]) for m in wanted for e in by_module[m]
            for leaf, _ in e.targets}
    tensors = {}
    for m in wanted:
        for e in by_module[m]:
            parts = [host[leaf] if layer is None else host[leaf][layer]
                     for leaf, layer in e.targets]
            tensors[PREFIX + e.key] = e.to_hf(parts)
    return names, tensors
