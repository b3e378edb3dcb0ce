"""config.json <-> ModelConfig, per family (the table in `families.py`).

Reading mirrors transformers: a config.json may omit keys (the class defaults in
`HFFamily.defaults` apply), RoPE comes in its v4 (`rope_theta` + `rope_scaling`) or v5
(`rope_parameters`) form, and every field ftjax cannot express is collected as a problem, so
one `HFCheckpointError` lists them all. Writing emits both RoPE forms (v4 and v5 readers).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from ftjax.io.hf.families import HF_FAMILIES, NOT_YET, HFFamily, fail, family_of
from ftjax.models.config import ModelConfig

__all__ = ["config_from_hf", "config_to_hf", "hf_problems", "load_config", "read_config",
           "parse_config", "model_config_from_section"]

_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_ROPE_TYPES = ("default", "linear", "llama3")
# Why a fixed field must have its value (added to the generic "requires X" message).
_WHY = {"num_experts": " (a dense MLP; sparse MoE models are written as MixtralForCausalLM)"}


# --------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _parse_rope(c: dict, problems: list[str], default_theta: float = 10000.0) -> dict[str, Any]:
    """RoPE fields from v4 (`rope_theta` + `rope_scaling`) or v5 (`rope_parameters`) keys.

    Mirrors transformers' precedence: a non-empty `rope_scaling` replaces `rope_parameters`;
    rope_theta comes from the dict, else the top level, else the class's `default_theta`.
    """
    rp = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        problems.append(f"rope parameters must be a dict, got {rp!r}")
        rp = {}
    nested = [v for v in rp.values() if isinstance(v, dict)]
    if nested:  # per layer type (Gemma3 style)
        if any(v != nested[0] for v in nested):
            problems.append(f"per-layer-type RoPE parameters {rp} cannot be expressed (ftjax "
                            "uses one RoPE for all layers)")
        rp = nested[0]
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = rp.get("rope_theta", c.get("rope_theta", default_theta))
    out: dict[str, Any] = dict(rope_theta=float(theta))
    prf = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={prf} is not supported (RoPE on the full head)")
    if rope_type not in _ROPE_TYPES:
        problems.append(f"rope_type {rope_type!r} is not supported (supported: "
                        f"{', '.join(_ROPE_TYPES)})")
        return out
    if rope_type == "default":
        return out
    if "factor" not in rp:
        problems.append(f"rope_type {rope_type!r} needs a 'factor' in {rp}")
        return out
    out.update(rope_scaling=rope_type, rope_factor=float(rp["factor"]))
    if rope_type == "llama3":
        for key, field in (("low_freq_factor", "rope_low_freq_factor"),
                           ("high_freq_factor", "rope_high_freq_factor")):
            if key in rp:
                out[field] = float(rp[key])
            else:
                problems.append(f"rope_type 'llama3' needs {key!r} in {rp}")
        # A top-level original_max_position_embeddings wins, as in transformers (Phi-3 style).
        out["rope_original_max_position"] = int(
            c.get("original_max_position_embeddings")
            or rp.get("original_max_position_embeddings", c.get("max_position_embeddings")))
    return out


def _window(c: dict, fam: HFFamily, n_layers: int, problems: list[str]) -> Optional[int]:
    """One sliding window for all layers, or None; per-layer mixes cannot be expressed."""
    if fam.window == "all":  # transformers applies the window to every layer
        return int(c["sliding_window"]) if c["sliding_window"] is not None else None
    if fam.window != "qwen":
        return None
    w = c["sliding_window"] if c["use_sliding_window"] else None
    if w is None:
        return None
    kinds = set(c.get("layer_types") or [
        "sliding_attention" if i >= c["max_window_layers"] else "full_attention"
        for i in range(n_layers)])
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(w)
    problems.append(f"layer_types {sorted(kinds)} mix full and sliding-window attention across "
                    f"layers (max_window_layers={c.get('max_window_layers')}); ftjax applies one "
                    "window to every layer")
    return int(w)


def _activation(c: dict, fam: HFFamily, problems: list[str]) -> str:
    name = next((c[k] for k in fam.activation_keys if c.get(k)), c.get(fam.activation_keys[-1]))
    if fam.gelu_is_tanh and name == "gelu":  # transformers maps Gemma's legacy "gelu" to tanh
        name = "gelu_pytorch_tanh"
    if name not in _ACT_FROM_HF:
        problems.append(f"activation {name!r} is not supported (supported: "
                        f"{sorted(_ACT_FROM_HF)})")
        return "silu"
    return _ACT_FROM_HF[name]


def _parse_moe(c: dict, problems: list[str]) -> dict[str, Any]:
    """MoE fields of a MixtralConfig: softmax over all E, top-k, renormalised (= softmax over
    the k largest logits, ftjax's "topk_softmax"), dropless, no shared experts, no z-loss."""
    e, k = int(c["num_local_experts"]), int(c["num_experts_per_tok"])
    if not 1 <= k <= e:
        problems.append(f"num_experts_per_tok={k} must be between 1 and num_local_experts={e}")
    if float(c["router_jitter_noise"] or 0.0):
        problems.append(f"router_jitter_noise={c['router_jitter_noise']}: transformers "
                        "multiplies the hidden states fed to the router and the experts by "
                        "U(1-eps, 1+eps) noise, ftjax's router_jitter only the router input "
                        "(Switch); set router_jitter_noise to 0 in config.json (it acts only in "
                        "training; the weights do not depend on it) and choose ftjax's "
                        "model.router_jitter in the run config")
    return dict(num_experts=e, num_experts_per_tok=k, router="topk_softmax",
                router_aux_loss_coef=float(c["router_aux_loss_coef"]), moe_dispatch="dropless")

def parse_config(c: dict) -> tuple[Optional[str], dict[str, Any], list[str]]:
    """(family, ModelConfig fields, problems) from a config.json dict."""
    family, why = family_of(c)
    if family is None:
        return None, {}, [why]
    fam = HF_FAMILIES[family]
    problems: list[str] = []
    for alias, key in fam.aliases.items():  # before the defaults, which hold the key itself
        if alias in c and key not in c:
            c = {**c, key: c[alias]}
    c = {**fam.defaults, **c}
    if c.get("text_config"):
        problems.append("nested text_config (multimodal configs) is not supported")
    if c.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true is not supported (causal only)")
    k = fam.keys
    d, n_heads, n_layers = int(c[k["hidden_size"]]), int(c[k["num_heads"]]), int(c[k["num_layers"]])
    inter = c[k["intermediate_size"]]
    f = dict(family=family, vocab_size=int(c[k["vocab_size"]]), hidden_size=d,
             intermediate_size=int(inter or 4 * d),  # GPT-2: n_inner None means 4 * n_embd
             num_layers=n_layers, num_heads=n_heads,
             max_position_embeddings=int(c[k["max_position_embeddings"]]),
             norm_eps=float(c[k["norm_eps"]]), activation=_activation(c, fam, problems),
             tie_embeddings=bool(c[k["tie_embeddings"]]), **fam.fixed_fields)
    if fam.style == "gpt2":
        f["num_kv_heads"] = n_heads
        if not c["scale_attn_weights"]:
            f["attn_scale"] = 1.0
        if c["scale_attn_by_inverse_layer_idx"]:
            problems.append("scale_attn_by_inverse_layer_idx=true (a per-layer attention scale) "
                            "is not supported")
        if c["add_cross_attention"]:
            problems.append("add_cross_attention=true is not supported (decoder-only models)")
        if d % n_heads:
            problems.append(f"n_embd={d} is not divisible by n_head={n_heads}")
    else:
        f.update(num_kv_heads=int(c["num_key_value_heads"] or n_heads),
                 head_dim=int(c["head_dim"]) if c.get("head_dim") else None)
        if f["head_dim"] is not None and f["head_dim"] * n_heads == d:
            f["head_dim"] = None  # the default; keeps configs comparable
        if fam.attention_bias:
            bias = bool(c.get("attention_bias", False))
            f.update(qkv_bias=bias, o_bias=bias)
        if fam.mlp_bias:
            f["mlp_bias"] = bool(c["mlp_bias"])
        if fam.moe:
            f.update(_parse_moe(c, problems))
        f["sliding_window"] = _window(c, fam, n_layers, problems)
        f.update(_parse_rope(c, problems, fam.default_theta))
    if "initializer_range" in c:
        f["init_std"] = float(c["initializer_range"])
    return family, f, problems


def config_from_hf(hf_config: dict, *, source: str = "config.json") -> ModelConfig:
    """The ModelConfig a transformers config.json dict describes; one error lists all problems."""
    family, fields, problems = parse_config(hf_config)
    if not problems:
        try:
            return ModelConfig(**fields)
        except ValueError as e:
            problems.append(str(e))
    raise fail(f"cannot use {source}", problems)


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (reads only its config.json)."""
    return config_from_hf(read_config(path), source=os.path.join(path, "config.json"))


def read_config(path: str) -> dict:
    """The config.json dict of a Hugging Face directory (clear errors when there is none)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json; is it a transformers "
                                "save_pretrained directory?")
    with open(cfg_path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# ModelConfig -> config.json


def hf_problems(cfg: ModelConfig, family: Optional[str] = None) -> list[str]:
    """Why `cfg` cannot be written as the transformers class of `family` (default cfg.family)."""
    family = family or cfg.family
    if family not in HF_FAMILIES:
        why = NOT_YET.get(family, "")
        return [f"family {family!r} has no Hugging Face writer{': ' + why if why else ''}"]
    fam = HF_FAMILIES[family]
    arch = fam.architecture
    problems: list[str] = []

    def need(field: str, ok: bool, want: str):
        if not ok:
            problems.append(f"{field}={getattr(cfg, field)!r}: {arch} requires {want}")

    hd = cfg.dim_per_head
    for field, value in fam.fixed_fields.items():
        need(field, getattr(cfg, field) == value, repr(value) + _WHY.get(field, ""))
    if fam.style == "gpt2":
        need("num_kv_heads", cfg.num_kv_heads == cfg.num_heads, "num_kv_heads == num_heads")
        need("head_dim", hd * cfg.num_heads == cfg.hidden_size, "hidden_size // num_heads")
        need("attn_scale", cfg.attn_scale in (None, 1.0, hd ** -0.5),
             "None (head_dim**-0.5) or 1.0")
    else:
        need("attn_scale", cfg.attn_scale in (None, hd ** -0.5), "None (head_dim**-0.5)")
    if fam.attention_bias:
        need("o_bias", cfg.o_bias == cfg.qkv_bias,
             f"o_bias == qkv_bias (one attention_bias flag; qkv_bias={cfg.qkv_bias})")
    if fam.gelu_is_tanh:
        need("activation", cfg.activation != "gelu",
             "not 'gelu' (transformers reads Gemma's 'gelu' as the tanh approximation)")
    if fam.moe:
        problems += _moe_problems(cfg, arch)
    return problems


def _moe_problems(cfg: ModelConfig, arch: str) -> list[str]:
    """Why cfg's MoE is not a MixtralConfig. Training-only choices are not checked and not
    written: dispatch, capacity factor, z-loss weight, and router_jitter (transformers'
    router_jitter_noise jitters router and expert inputs, ftjax's the router's only, so it
    is written as 0)."""
    problems = []
    if cfg.num_experts <= 0:
        problems.append(f"num_experts={cfg.num_experts}: {arch} is a sparse MoE (num_experts > 0)")
    if cfg.num_shared_experts:
        problems.append(f"num_shared_experts={cfg.num_shared_experts}: {arch} has no shared "
                        "experts")
    if cfg.router != "topk_softmax" and not cfg.router_renormalize:
        problems.append(f"router={cfg.router!r} with router_renormalize=False: {arch} "
                        "renormalises the top-k probabilities (router='topk_softmax', or "
                        "'softmax_topk' with router_renormalize=True)")
    return problems


def _rope_dicts(cfg: ModelConfig) -> tuple[Optional[dict], dict]:
    """(v4 `rope_scaling`, v5 `rope_parameters`) for cfg."""
    if cfg.rope_scaling is None:
        scaling = None
    elif cfg.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    else:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_position}
    params = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return scaling, params

def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32",
                 extra: Optional[dict] = None) -> dict:
    """The transformers config.json dict for cfg, with both RoPE forms (v4 and v5 readers).

    extra: keys merged last (e.g. bos_token_id / eos_token_id, which ModelConfig does not hold).
    """
    problems = hf_problems(cfg)
    if problems:
        raise fail(f"cannot write a {cfg.family!r} ModelConfig as a Hugging Face config",
                   problems)
    fam = HF_FAMILIES[cfg.family]
    c: dict[str, Any] = {"architectures": [fam.architecture], "model_type": fam.model_type,
                         "initializer_range": cfg.init_std, "dtype": dtype,
                         "torch_dtype": dtype, "use_cache": True,
                         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    c.update({key: getattr(cfg, field) for field, key in fam.keys.items()})
    if fam.style == "gpt2":
        c.update(activation_function="gelu_new" if cfg.activation == "gelu_tanh"
                 else _ACT_TO_HF[cfg.activation],
                 scale_attn_weights=cfg.attn_scale != 1.0,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                 add_cross_attention=False)
    else:
        scaling, params = _rope_dicts(cfg)
        c.update({key: _ACT_TO_HF[cfg.activation] for key in fam.activation_keys})
        c.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
                 attention_dropout=0.0, rope_theta=cfg.rope_theta, rope_scaling=scaling,
                 rope_parameters=params)
        if fam.attention_bias:
            c["attention_bias"] = cfg.qkv_bias
        if fam.mlp_bias:
            c["mlp_bias"] = cfg.mlp_bias
        if fam.window == "all":
            c["sliding_window"] = cfg.sliding_window
        if fam.moe:
            c.update(num_local_experts=cfg.num_experts,
                     num_experts_per_tok=cfg.num_experts_per_tok,
                     intermediate_size=cfg.expert_intermediate_size or cfg.intermediate_size,
                     router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0,
                     output_router_logits=False)
        if fam.window == "qwen":
            w = cfg.sliding_window
            kind = "full_attention" if w is None else "sliding_attention"
            c.update(use_sliding_window=w is not None, sliding_window=w,
                     max_window_layers=0 if w is not None else cfg.num_layers,
                     layer_types=[kind] * cfg.num_layers)
    c.update(extra or {})
    return c


# --------------------------------------------------------------------------------------------
# Config sections with model.init_from="hf:DIR"

# Execution choices, and MoE training choices a config.json does not carry (Mixtral's is
# dropless, without z-loss; its router_jitter_noise must be 0, see _parse_moe).
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "moe_dispatch",
                   "capacity_factor", "router_jitter", "router_z_loss_coef",
                   "moe_grouped_impl", "moe_block_size", "attention_impl", "attention_block")


def model_config_from_section(fields: dict[str, Any], hf_dir: str,
                              log: Callable[[str], None] = print) -> ModelConfig:
    """The ModelConfig of a run initialised from a Hugging Face directory.

    The architecture comes from the checkpoint's config.json; only the run-time fields
    (dtype, param_dtype, scan_layers, remat, and the MoE choices moe_dispatch,
    capacity_factor, router_jitter, router_z_loss_coef, moe_grouped_impl, moe_block_size, and
    the attention core attention_impl, attention_block) come from the config's model section.
    Section fields that disagree with the checkpoint are overwritten, and each is reported via
    `log`.
    """
    ckpt = load_config(hf_dir)
    runtime = {k: fields[k] for k in _RUNTIME_FIELDS if k in fields}
    cfg = ckpt.replace(**runtime)
    ignored = {k: (v, getattr(cfg, k)) for k, v in fields.items()
               if k not in _RUNTIME_FIELDS and k != "init_std" and hasattr(cfg, k)
               and getattr(cfg, k) != v}
    if ignored:
        log(f"model.init_from=hf:{hf_dir}: the architecture comes from its config.json; the "
            "model section's " + ", ".join(f"{k}={a!r} (checkpoint: {b!r})"
                                            for k, (a, b) in ignored.items())
            + " are overridden")
    return cfg

