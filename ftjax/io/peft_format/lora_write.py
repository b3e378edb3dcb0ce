"""Writing LoRA-family weights (LoRA, DoRA, rsLoRA scales, LoRA on MoE experts) as a PEFT
LORA adapter: tensors and adapter_config.json fields.

r / lora_alpha are the most common rank and alpha, with rank_pattern / alpha_pattern for the
modules that differ; every alpha is chosen so that PEFT's scale equals the leaf's exactly.
"""
from __future__ import annotations

import math

import numpy as np

from ftjax.io.peft_format.factors import Adapter, module_adapter, row_norms, to_peft_factors
from ftjax.io.peft_format.files import PREFIX, PeftFormatError, fail, host_slice
from ftjax.io.peft_format.modules import (alpha_for, most_common, nested_keys, pattern_value,
                                          patterns_for, target_modules_for, target_params_for)
from ftjax.peft.core import materialize

__all__ = ["write_lora"]


def write_lora(req) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, adapter_config) of the LORA adapter for `req.leaves` (a `save.WriteRequest`).

    With any DoRA leaf the adapter is `use_dora` (PEFT's flag is global), and plain LoRA
    leaves get the magnitude that makes DoRA their identity.
    """
    path, cfg, table, ptable, leaves = req.path, req.cfg, req.table, req.ptable, req.leaves
    param_slots = {p for t in ptable.values() for p, _ in t.parts}
    fields = {p: req.codecs[p].export(w) for p, w in leaves.items()}
    problems: list[str] = []
    use_dora = any(req.codecs[p].kind == "dora" for p in leaves)
    if use_dora:
        for p in leaves:
            if p.endswith("/embedding"):
                problems.append(f"DoRA/LoRA on the embedding {p!r} cannot be written with "
                                "use_dora=true (PEFT's embedding DoRA normalises other axes)")
        if problems:
            raise fail(f"cannot write PEFT adapter {path!r}", problems)

    if use_dora and any(p in param_slots for p in leaves):
        raise fail(f"cannot write PEFT adapter {path!r}", [
            "use_dora=true (DoRA leaves) together with LoRA on mixture-of-experts weights: "
            "PEFT's target_parameters LoRA does not work with use_dora, and use_dora is global "
            "to an adapter"])
    param_adapters = {n: ad for n, t in ptable.items()
                      if (ad := module_adapter(t, fields)) is not None}
    adapters: dict[str, Adapter] = {}
    for name, module in table.items():
        ad = module_adapter(module, fields)
        if ad is None:
            continue
        if use_dora and len(module.parts) > 1:
            raise fail(f"cannot write PEFT adapter {path!r}", [
                f"use_dora=true with an adapter on the fused module {name!r} (GPT-2 c_attn) "
                "is not supported"])
        if use_dora and ad.magnitude is None:
            # use_dora is global in PEFT: a plain LoRA module becomes DoRA with m = ||W + sBA||,
            # which is exactly the identity rescaling.
            base = host_slice(materialize(fields[module.parts[0][0]]["base"]),
                              module.parts[0][1])
            ad.magnitude = row_norms(base + ad.scale * (ad.A.T @ ad.B.T))
        adapters[name] = ad

    # ftjax's LoRA on a tied embedding also changes the LM head (the same matrix). PEFT ties
    # the head's adapter to the embedding's (lora_A = emb_B.T, lora_B = emb_A.T) with
    # ensure_weight_tying, and writes the tied copies too; so do we.
    tied = next((n for n in adapters if cfg.tie_embeddings
                 and table[n].parts[0][0] == "embed/embedding"), None)
    head = {}
    if tied is not None:
        e = adapters[tied]
        head["lm_head"] = Adapter(A=np.ascontiguousarray(e.B.T), B=np.ascontiguousarray(e.A.T),
                                   scale=e.scale)
    every = {**adapters, **head, **param_adapters}
    ranks = {n: ad.rank for n, ad in every.items()}
    r = int(most_common(list(ranks.values())))
    best = None
    for rs in ((False, True) if req.use_rslora is None else (bool(req.use_rslora),)):
        alphas = {n: alpha_for(ad.scale, ad.rank, rs) for n, ad in every.items()}
        alpha = most_common(list(alphas.values()))
        pats = patterns_for(alphas, alpha)
        if best is None or len(pats) < len(best[3]):
            best = (rs, alphas, alpha, pats)
    rslora, alphas, alpha, alpha_pattern = best
    rank_pattern = patterns_for(ranks, r)
    for n, ad in every.items():  # check what PEFT will compute from the config
        rr = pattern_value(rank_pattern, n, r)
        aa = pattern_value(alpha_pattern, n, alpha)
        s = aa / math.sqrt(rr) if rslora else aa / rr
        if rr != ranks[n] or abs(s - ad.scale) > 1e-12 * abs(ad.scale):
            raise PeftFormatError(f"internal: config gives {n!r} r={rr}, scale={s}; the "
                                  f"adapter has r={ranks[n]}, scale={ad.scale}")

    conf = {
        "peft_type": "LORA", "revision": None,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": use_dora,
        "target_modules": target_modules_for(list(adapters), table) if adapters else [],
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": cfg.family == "gpt2", "bias": "none", "lora_bias": False,
        "lora_dropout": 0.0, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "ensure_weight_tying": tied is not None, "inference_mode": True,
    }
    if param_adapters:
        conf["target_parameters"] = target_params_for(list(param_adapters), ptable)
    stems = {v: k for k, v in nested_keys(ptable, list(param_adapters)).items()}
    tensors: dict[str, np.ndarray] = {}
    for name, ad in every.items():
        key = PREFIX + name
        if name in param_adapters:
            A, B = to_peft_factors(ad)
            tensors[f"{PREFIX}{stems[name]}.lora_A.weight"] = A
            tensors[f"{PREFIX}{stems[name]}.lora_B.weight"] = B
            continue
        if name in table and table[name].embedding:
            tensors[f"{key}.lora_embedding_A"] = ad.A
            tensors[f"{key}.lora_embedding_B"] = ad.B
        else:
            tensors[f"{key}.lora_A.weight"] = ad.A
            tensors[f"{key}.lora_B.weight"] = ad.B
        if use_dora:
            tensors[f"{key}.lora_magnitude_vector"] = ad.magnitude
    return tensors, conf
