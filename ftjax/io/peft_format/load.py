"""`load_peft_adapter`: a PEFT adapter directory -> base params with structured leaves.

The adapter's peft_type picks the format that reads it (lora_read.py, ia3.py); the weights it
builds come from the codecs registered for reading (registry.py, codecs.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from ftjax.io import hf
from ftjax.io.peft_format.files import fail, read_adapter_config, read_tensors
from ftjax.io.peft_format.modules import (Module, Param, fused_layout, module_table, nested_keys,
                                          param_table, select_params)
from ftjax.io.peft_format.registry import format_for, reader_codec, supported_formats
from ftjax.models.config import ModelConfig

__all__ = ["ReadRequest", "load_peft_adapter"]

# init_lora_weights values whose training rewrote the base weights (W - s*B0@A0): the adapter
# alone is wrong on the original base (PEFT's `path_initial_model_for_weight_conversion`
# converts such adapters to plain LoRA and records init_lora_weights=true).
_MUTATED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    """What a format's reader gets: the adapter (config, tensors), the model (cfg, base params,
    leaf shapes), its adaptable modules and MoE parameters, the MoE parameters the config
    targets with their key stems, and the problems found so far (the reader adds its own and
    raises them all at once)."""
    path: str
    conf: dict
    cfg: ModelConfig
    base_params: Any
    tensors: dict[str, np.ndarray]
    table: dict[str, Module]
    full: dict[str, hf.Entry]
    shapes: dict[str, tuple]
    ptable: dict[str, Param]
    targeted_params: list[str]
    stems: dict[str, str]
    problems: list[str]


def load_peft_adapter(path: str, cfg: ModelConfig, base_params: Any) -> Any:
    """`base_params` with the adapter of a PEFT directory applied as structured leaves.

    LORA adapters become LoRAWeight leaves (DoRAWeight with use_dora), IA3 adapters IA3Weight
    leaves. Reads rank_pattern / alpha_pattern / use_rslora, target_modules (list or regex),
    target_parameters (Mixtral's router and fused experts; also transformers-4 per-expert
    w1/w2/w3 modules), exclude_modules, layers_to_transform, feedforward_modules. Full weights
    in the file (an embedding's `base_layer.weight`, `modules_to_save`, `bias="all"` biases)
    replace the corresponding base weights, as PEFT's own loader does. Raises
    PeftFormatError listing every missing, unexpected or misshaped tensor and every
    unsupported config field. The input tree is not modified.
    """
    path = os.fspath(path)
    conf = read_adapter_config(path)
    fmt = format_for(conf["peft_type"])
    problems = config_problems(conf, reader_codec("dora") is not None)
    problems += [f"model: {p}" for p in hf.hf_problems(cfg)]
    if problems:
        raise fail(f"cannot load PEFT adapter {path!r}", problems)
    tensors = read_tensors(path, problems)
    # transformers-4 Mixtral adapters sit on per-expert Linear modules (block_sparse_moe.*)
    table = module_table(cfg, legacy_experts=any(".block_sparse_moe." in k for k in tensors))
    ptable = param_table(cfg)
    targeted = select_params(conf, ptable, cfg, problems)
    return fmt.read(ReadRequest(
        path=path, conf=conf, cfg=cfg, base_params=base_params, tensors=tensors, table=table,
        full={e.key: e for e in fused_layout(cfg)}, shapes=hf.leaf_shapes(cfg), ptable=ptable,
        targeted_params=targeted, stems=nested_keys(ptable, targeted), problems=problems))


def config_problems(conf: dict, dora_ok: bool) -> list[str]:
    """Everything in an adapter_config ftjax cannot read (peft_type, LoRA variants, ...)."""
    problems = []
    ptype = str(conf["peft_type"]).upper()
    if ptype != "LORA" and format_for(ptype) is not None:
        return problems
    if ptype != "LORA":
        kinds = " and ".join(f.describe for f in supported_formats().values())
        problems.append(f"peft_type {conf['peft_type']!r} is not supported (ftjax reads {kinds} "
                        "adapters)")
        return problems
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATED_BASE_INITS):
        problems.append(f"init_lora_weights={init!r}: this initialisation rewrote the base "
                        "weights, so the adapter is only valid on that residual model; convert "
                        "it with PEFT's save_pretrained(..., path_initial_model_for_weight_"
                        "conversion=...) first")
    if conf.get("use_dora") and not dora_ok:
        problems.append("use_dora=true, but ftjax.peft.dora.DoRAWeight is not available")
    if conf.get("lora_bias"):
        problems.append("lora_bias=true (a bias on lora_B) has no ftjax LoRAWeight form")
    for key in ("layer_replication", "trainable_token_indices", "alora_invocation_tokens"):
        if conf.get(key):
            problems.append(f"{key}={conf[key]!r} is not supported")
    for key in ("use_qalora", "use_bdlora"):
        if conf.get(key):
            problems.append(f"{key}=true (a LoRA variant) is not supported")
    for key in ("velora_config", "kasa_config", "monteclora_config", "arrow_config"):
        if conf.get(key):
            problems.append(f"{key} (a LoRA variant) is not supported")
    if conf.get("fan_in_fan_out") not in (None, False, True):
        problems.append(f"fan_in_fan_out={conf['fan_in_fan_out']!r}")
    return problems
