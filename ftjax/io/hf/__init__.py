"""Hugging Face checkpoints <-> ftjax params: `config.json` and `*.safetensors`, per family.

`load_pretrained(dir)` reads a local transformers directory (single or sharded safetensors, any
of fp32/bf16/fp16) into `(ModelConfig, params)`, streaming tensor by tensor into preallocated,
layer-stacked host arrays, so peak host memory stays near one copy of the model.
`save_pretrained(dir, cfg, params)` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected keys.

Families (DESIGN.md §3): Llama, Mistral, Qwen2, Qwen3, Gemma, GPT-2 and Mixtral. Layout facts
(see shared/reference/hf-formats-and-losses.md §3): nn.Linear weights are [out, in] and ftjax
kernels [in, out]; GPT-2's Conv1D is already [in, out] and fuses q|k|v in `c_attn`; RoPE uses the
same rotate_half layout on both sides, so q/k rows need no permutation; Gemma norms are stored as
`w` and applied as (1 + w) on both sides (`norm_offset=1`), so they are copied unchanged.

Mixtral experts come in two file layouts, both read (checked against transformers 5.24):
"hub" (what `save_pretrained` of transformers 4 and 5 writes, and the Hub's checkpoints):
`block_sparse_moe.gate.weight` [E, d] and per expert `block_sparse_moe.experts.M.w1/w3/w2.weight`
(w1 = gate [f, d], w3 = up [f, d], w2 = down [d, f]); "fused" (transformers 5's in-memory
state dict): `mlp.gate.weight` [E, d], `mlp.experts.gate_up_proj` [E, 2f, d] (gate rows first,
then up) and `mlp.experts.down_proj` [E, d, f]. ftjax stacks them as `layers/moe/router/kernel`
[L, d, E] and `layers/moe/{gate,up,down}_proj/kernel` [L, E, in, out].

Every problem with a checkpoint (unsupported config field, missing, unexpected or misshaped
tensor) is collected and raised as one `HFCheckpointError` before any tensor data is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Iterable, Optional

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", so safetensors can read bf16)
import numpy as np

from ftjax.models.config import DTYPES, ModelConfig

__all__ = ["HFCheckpointError", "SUPPORTED_ARCHITECTURES", "load_pretrained", "save_pretrained",
           "load_config", "config_from_hf", "config_to_hf", "hf_problems", "tensor_layout",
           "model_config_from_section"]

# family -> (architecture class, model_type)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gpt2": ("GPT2LMHeadModel", "gpt2"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
}
# architecture or model_type -> why it cannot be read yet (none at the moment).
_NOT_YET: dict[str, str] = {}
_MOE_LAYOUTS = ("hub", "fused")
_SUPPORTED_TEXT = ", ".join(f"{a} ({f})" for f, (a, _) in SUPPORTED_ARCHITECTURES.items())

# transformers v5 class defaults for keys a config.json may omit (HF applies the same ones).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=None, hidden_act="silu", max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=None, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False),
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=None, hidden_act="silu", max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                    num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                    router_jitter_noise=0.0),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                 tie_word_embeddings=True, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, add_cross_attention=False),
}
# transformers' `default_theta` where a family's config class overrides 10000.
_DEFAULT_THETA = {"mixtral": 1e6}
_GPT2_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                 "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}

_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_ROPE_TYPES = ("default", "linear", "llama3")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_STORAGE_DTYPES = ("float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")


class HFCheckpointError(ValueError):
    """A Hugging Face directory or config that ftjax cannot read or write; lists every problem."""


def _fail(what: str, problems: list[str]) -> HFCheckpointError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return HFCheckpointError(f"{what}: {len(problems)} problem(s):\n{lines}\n"
                             f"Supported architectures: {_SUPPORTED_TEXT}.")


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


# --------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _family_of(c: dict) -> tuple[Optional[str], Optional[str]]:
    """(family, None) or (None, reason) from `architectures`, falling back to `model_type`."""
    archs = c.get("architectures") or []
    by_arch = {a: f for f, (a, _) in SUPPORTED_ARCHITECTURES.items()}
    for a in archs:
        if a in by_arch:
            return by_arch[a], None
    for a in archs:
        if a in _NOT_YET:
            return None, f"{a} is not supported yet: {_NOT_YET[a]}"
    mt = c.get("model_type")
    by_type = {t: f for f, (_, t) in SUPPORTED_ARCHITECTURES.items()}
    if mt in by_type and not archs:
        return by_type[mt], None
    if mt in _NOT_YET:
        return None, f"model_type {mt!r} is not supported yet: {_NOT_YET[mt]}"
    if mt in by_type:  # e.g. LlamaModel or LlamaForSequenceClassification: no causal LM head
        return None, (f"architectures {archs} (model_type {mt!r}) is not a causal LM class ftjax "
                      f"reads; expected {SUPPORTED_ARCHITECTURES[by_type[mt]][0]}")
    return None, f"unsupported architecture: architectures={archs}, model_type={mt!r}"


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


def _window(c: dict, family: str, n_layers: int, problems: list[str]) -> Optional[int]:
    """One sliding window for all layers, or None; per-layer mixes cannot be expressed."""
    if family in ("mistral", "mixtral"):  # transformers applies the window to every layer
        return int(c["sliding_window"]) if c["sliding_window"] is not None else None
    if family not in ("qwen2", "qwen3"):
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


def _activation(name: Any, family: str, problems: list[str]) -> str:
    if family == "gemma" and name == "gelu":  # transformers maps Gemma's legacy "gelu" to tanh
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


def _parse_config(c: dict) -> tuple[Optional[str], dict[str, Any], list[str]]:
    """(family, ModelConfig fields, problems) from a config.json dict."""
    family, why = _family_of(c)
    if family is None:
        return None, {}, [why]
    problems: list[str] = []
    c = {**_DEFAULTS[family], **c}
    if c.get("text_config"):
        problems.append("nested text_config (multimodal configs) is not supported")
    if family == "gpt2":
        for alias, key in _GPT2_ALIASES.items():
            if alias in c and key not in c:
                c[key] = c[alias]
        d, h = int(c["n_embd"]), int(c["n_head"])
        f = dict(family="gpt2", vocab_size=int(c["vocab_size"]), hidden_size=d,
                 intermediate_size=int(c["n_inner"] or 4 * d), num_layers=int(c["n_layer"]),
                 num_heads=h, num_kv_heads=h, max_position_embeddings=int(c["n_positions"]),
                 norm="layer", norm_bias=True, norm_eps=float(c["layer_norm_epsilon"]),
                 mlp="plain", mlp_bias=True, qkv_bias=True, o_bias=True, position="learned",
                 activation=_activation(c["activation_function"], family, problems),
                 tie_embeddings=bool(c["tie_word_embeddings"]))
        if not c["scale_attn_weights"]:
            f["attn_scale"] = 1.0
        if c["scale_attn_by_inverse_layer_idx"]:
            problems.append("scale_attn_by_inverse_layer_idx=true (a per-layer attention scale) "
                            "is not supported")
        if c["add_cross_attention"]:
            problems.append("add_cross_attention=true is not supported (decoder-only models)")
        if d % h:
            problems.append(f"n_embd={d} is not divisible by n_head={h}")
        if "initializer_range" in c:
            f["init_std"] = float(c["initializer_range"])
        return family, f, problems

    n_heads = int(c["num_attention_heads"])
    n_layers = int(c["num_hidden_layers"])
    act = c.get("hidden_activation") if family == "gemma" else None
    f = dict(family=family, vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
             intermediate_size=int(c["intermediate_size"]), num_layers=n_layers,
             num_heads=n_heads, num_kv_heads=int(c["num_key_value_heads"] or n_heads),
             head_dim=int(c["head_dim"]) if c.get("head_dim") else None,
             max_position_embeddings=int(c["max_position_embeddings"]),
             norm_eps=float(c["rms_norm_eps"]),
             activation=_activation(act or c["hidden_act"], family, problems),
             tie_embeddings=bool(c["tie_word_embeddings"]))
    if f["head_dim"] is not None and f["head_dim"] * n_heads == f["hidden_size"]:
        f["head_dim"] = None  # the default; keeps configs comparable
    attention_bias = bool(c.get("attention_bias", False))
    if family == "llama":
        f.update(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(c["mlp_bias"]))
    elif family == "qwen2":
        f.update(qkv_bias=True)
    elif family == "qwen3":
        f.update(qk_norm=True, qkv_bias=attention_bias, o_bias=attention_bias)
    elif family == "gemma":
        f.update(norm_offset=1.0, embed_scale=True, qkv_bias=attention_bias,
                 o_bias=attention_bias)
        if c.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention=true is not supported (causal only)")
    elif family == "mixtral":
        f.update(_parse_moe(c, problems))
    f["sliding_window"] = _window(c, family, n_layers, problems)
    f.update(_parse_rope(c, problems, _DEFAULT_THETA.get(family, 10000.0)))
    if "initializer_range" in c:
        f["init_std"] = float(c["initializer_range"])
    return family, f, problems


def config_from_hf(hf_config: dict, *, source: str = "config.json") -> ModelConfig:
    """The ModelConfig a transformers config.json dict describes; one error lists all problems."""
    family, fields, problems = _parse_config(hf_config)
    if not problems:
        try:
            return ModelConfig(**fields)
        except ValueError as e:
            problems.append(str(e))
    raise _fail(f"cannot use {source}", problems)


def load_config(path: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (reads only its config.json)."""
    return config_from_hf(_read_config(path), source=os.path.join(path, "config.json"))


def _read_config(path: str) -> dict:
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
    if family not in SUPPORTED_ARCHITECTURES:
        why = _NOT_YET.get(family, "")
        return [f"family {family!r} has no Hugging Face writer{': ' + why if why else ''}"]
    arch = SUPPORTED_ARCHITECTURES[family][0]
    problems: list[str] = []

    def need(field: str, ok: bool, want: str):
        if not ok:
            problems.append(f"{field}={getattr(cfg, field)!r}: {arch} requires {want}")

    hd = cfg.dim_per_head
    if family == "gpt2":
        need("position", cfg.position == "learned", "'learned'")
        need("norm", cfg.norm == "layer", "'layer'")
        need("norm_bias", cfg.norm_bias, "True")
        need("mlp", cfg.mlp == "plain", "'plain'")
        for name in ("qkv_bias", "o_bias", "mlp_bias"):
            need(name, getattr(cfg, name), "True")
        need("num_kv_heads", cfg.num_kv_heads == cfg.num_heads, "num_kv_heads == num_heads")
        need("head_dim", hd * cfg.num_heads == cfg.hidden_size, "hidden_size // num_heads")
        need("attn_scale", cfg.attn_scale in (None, 1.0, hd ** -0.5),
             "None (head_dim**-0.5) or 1.0")
        need("qk_norm", not cfg.qk_norm, "False")
        need("sliding_window", cfg.sliding_window is None, "None")
    else:
        need("position", cfg.position == "rope", "'rope'")
        need("norm", cfg.norm == "rms", "'rms'")
        need("norm_bias", not cfg.norm_bias, "False")
        need("mlp", cfg.mlp == "gated", "'gated'")
        need("attn_scale", cfg.attn_scale in (None, hd ** -0.5), "None (head_dim**-0.5)")
        need("qk_norm", cfg.qk_norm == (family == "qwen3"), str(family == "qwen3"))
        if family not in ("mistral", "mixtral", "qwen2", "qwen3"):
            need("sliding_window", cfg.sliding_window is None, "None")
        if family in ("llama", "qwen3", "gemma"):
            need("o_bias", cfg.o_bias == cfg.qkv_bias,
                 f"o_bias == qkv_bias (one attention_bias flag; qkv_bias={cfg.qkv_bias})")
        elif family in ("mistral", "mixtral"):
            need("qkv_bias", not cfg.qkv_bias, "False")
            need("o_bias", not cfg.o_bias, "False")
        else:  # qwen2
            need("qkv_bias", cfg.qkv_bias, "True")
            need("o_bias", not cfg.o_bias, "False")
        if family != "llama":
            need("mlp_bias", not cfg.mlp_bias, "False")
        if family == "gemma":
            need("activation", cfg.activation != "gelu",
                 "not 'gelu' (transformers reads Gemma's 'gelu' as the tanh approximation)")
    if family == "mixtral":
        problems += _moe_problems(cfg, arch)
    else:
        need("num_experts", not getattr(cfg, "num_experts", 0),
             "0 (a dense MLP; sparse MoE models are written as MixtralForCausalLM)")
    need("norm_offset", cfg.norm_offset == (1.0 if family == "gemma" else 0.0),
         str(1.0 if family == "gemma" else 0.0))
    need("embed_scale", cfg.embed_scale == (family == "gemma"), str(family == "gemma"))
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
        raise _fail(f"cannot write a {cfg.family!r} ModelConfig as a Hugging Face config",
                    problems)
    family = cfg.family
    arch, model_type = SUPPORTED_ARCHITECTURES[family]
    c: dict[str, Any] = {"architectures": [arch], "model_type": model_type,
                         "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                         "initializer_range": cfg.init_std, "dtype": dtype,
                         "torch_dtype": dtype, "use_cache": True,
                         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if family == "gpt2":
        c.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                 n_positions=cfg.max_position_embeddings, n_inner=cfg.intermediate_size,
                 activation_function="gelu_new" if cfg.activation == "gelu_tanh"
                 else _ACT_TO_HF[cfg.activation],
                 layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=cfg.attn_scale != 1.0,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                 add_cross_attention=False)
    else:
        scaling, params = _rope_dicts(cfg)
        c.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                 num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
                 hidden_act=_ACT_TO_HF[cfg.activation],
                 max_position_embeddings=cfg.max_position_embeddings,
                 rms_norm_eps=cfg.norm_eps, attention_dropout=0.0,
                 rope_theta=cfg.rope_theta, rope_scaling=scaling, rope_parameters=params)
        if family in ("llama", "qwen3", "gemma"):
            c["attention_bias"] = cfg.qkv_bias
        if family == "llama":
            c["mlp_bias"] = cfg.mlp_bias
        if family == "gemma":
            c["hidden_activation"] = c["hidden_act"]  # the key transformers v4 reads
        if family in ("mistral", "mixtral"):
            c["sliding_window"] = cfg.sliding_window
        if family == "mixtral":
            c.update(num_local_experts=cfg.num_experts,
                     num_experts_per_tok=cfg.num_experts_per_tok,
                     intermediate_size=cfg.expert_intermediate_size or cfg.intermediate_size,
                     router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0,
                     output_router_logits=False)
        if family in ("qwen2", "qwen3"):
            w = cfg.sliding_window
            kind = "full_attention" if w is None else "sliding_attention"
            c.update(use_sliding_window=w is not None, sliding_window=w,
                     max_window_layers=0 if w is not None else cfg.num_layers,
                     layer_types=[kind] * cfg.num_layers)
    c.update(extra or {})
    return c


# --------------------------------------------------------------------------------------------
# Tensor layout: which HF tensor fills which (stacked) ftjax leaf, and how.


Index = Optional[Any]  # None (an unstacked leaf), a layer int, or (layer, expert)


def _n_index(index: Index) -> int:
    """How many leading axes of the leaf an index selects."""
    if index is None:
        return 0
    return len(index) if isinstance(index, tuple) else 1


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor and the ftjax leaf slot(s) it maps to.

    kind: "copy" (same layout), "T" (nn.Linear [.., out, in] <-> kernel [.., in, out]: the last
    two axes swap), "split" (GPT-2's fused c_attn: the last axis is q|k|v, one target each) or
    "Tsplit" (Mixtral's fused experts.gate_up_proj [E, 2f, d]: swapped, then gate|up on the
    last axis).
    targets: (leaf path "a/b/c", index) per part; index None, a layer, or (layer, expert).
    """
    key: str
    kind: str
    targets: tuple[tuple[str, Index], ...]

    def hf_shape(self, leaf_shapes: dict[str, tuple]) -> tuple[int, ...]:
        shapes = [tuple(leaf_shapes[p][_n_index(i):]) for p, i in self.targets]
        if self.kind == "split":
            return shapes[0][:-1] + (sum(s[-1] for s in shapes),)
        if self.kind == "Tsplit":
            return shapes[0][:-2] + (sum(s[-1] for s in shapes), shapes[0][-2])
        if self.kind == "T":
            return shapes[0][:-2] + (shapes[0][-1], shapes[0][-2])
        return shapes[0]

    def to_ftjax(self, t: np.ndarray) -> list[np.ndarray]:
        if self.kind in ("T", "Tsplit"):
            t = np.swapaxes(t, -1, -2)
        if self.kind in ("split", "Tsplit"):
            return np.split(t, len(self.targets), axis=-1)
        return [t]

    def to_hf(self, parts: list[np.ndarray]) -> np.ndarray:
        t = np.concatenate(parts, axis=-1) if self.kind in ("split", "Tsplit") else parts[0]
        return np.swapaxes(t, -1, -2) if self.kind in ("T", "Tsplit") else t


def _leaf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from ftjax.models.transformer import Spec, param_specs
    from ftjax.io.params_file import flatten
    import jax
    specs = jax.tree.map(lambda s: s.shape, param_specs(cfg), is_leaf=lambda x: isinstance(x, Spec))
    return {k: tuple(v) for k, v in flatten(specs).items()}


def tensor_layout(cfg: ModelConfig, prefix: Optional[str] = None,
                  moe_layout: str = "hub") -> list[Entry]:
    """Every HF tensor of cfg's family, in file order, with its ftjax targets.

    prefix: the base-model prefix ("model." for Llama-style, "transformer." or "" for GPT-2);
    defaults to what transformers writes. moe_layout (Mixtral): "hub" (per-expert w1/w2/w3
    under block_sparse_moe, as transformers saves) or "fused" (transformers 5's stacked
    mlp.experts.gate_up_proj / down_proj).
    """
    if moe_layout not in _MOE_LAYOUTS:
        raise ValueError(f"moe_layout={moe_layout!r}; use one of {_MOE_LAYOUTS}")
    leaves = _leaf_shapes(cfg)
    out: list[Entry] = []

    def add(key: str, kind: str, *targets: tuple[str, Index]):
        if all(p in leaves for p, _ in targets):
            out.append(Entry(key, kind, tuple(targets)))

    L = cfg.num_layers
    if cfg.family == "gpt2":
        p = "transformer." if prefix is None else prefix
        add(p + "wte.weight", "copy", ("embed/embedding", None))
        add(p + "wpe.weight", "copy", ("pos_embed/embedding", None))
        for i in range(L):
            h = f"{p}h.{i}."
            for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                add(h + hf + ".weight", "copy", (f"layers/{ours}/scale", i))
                add(h + hf + ".bias", "copy", (f"layers/{ours}/bias", i))
            for kind, leaf in (("weight", "kernel"), ("bias", "bias")):
                add(f"{h}attn.c_attn.{kind}", "split",
                    *[(f"layers/attn/{n}_proj/{leaf}", i) for n in "qkv"])
                add(f"{h}attn.c_proj.{kind}", "copy", (f"layers/attn/o_proj/{leaf}", i))
                add(f"{h}mlp.c_fc.{kind}", "copy", (f"layers/mlp/up_proj/{leaf}", i))
                add(f"{h}mlp.c_proj.{kind}", "copy", (f"layers/mlp/down_proj/{leaf}", i))
        add(p + "ln_f.weight", "copy", ("final_norm/scale", None))
        add(p + "ln_f.bias", "copy", ("final_norm/bias", None))
    else:
        p = "model." if prefix is None else prefix
        add(p + "embed_tokens.weight", "copy", ("embed/embedding", None))
        for i in range(L):
            h = f"{p}layers.{i}."
            add(h + "input_layernorm.weight", "copy", ("layers/attn_norm/scale", i))
            for n in ("q", "k", "v", "o"):
                add(f"{h}self_attn.{n}_proj.weight", "T", (f"layers/attn/{n}_proj/kernel", i))
                add(f"{h}self_attn.{n}_proj.bias", "copy", (f"layers/attn/{n}_proj/bias", i))
            for n in ("q", "k"):
                add(f"{h}self_attn.{n}_norm.weight", "copy", (f"layers/attn/{n}_norm/scale", i))
            add(h + "post_attention_layernorm.weight", "copy", ("layers/mlp_norm/scale", i))
            _add_experts(add, h, i, cfg.num_experts if "layers/moe/router/kernel" in leaves
                         else 0, moe_layout)
            for n in ("gate", "up", "down"):
                add(f"{h}mlp.{n}_proj.weight", "T", (f"layers/mlp/{n}_proj/kernel", i))
                add(f"{h}mlp.{n}_proj.bias", "copy", (f"layers/mlp/{n}_proj/bias", i))
        add(p + "norm.weight", "copy", ("final_norm/scale", None))
    add("lm_head.weight", "T", ("lm_head/kernel", None))
    covered = {t for e in out for t, _ in e.targets}
    assert covered == set(leaves), f"layout misses {sorted(set(leaves) - covered)}"
    return out


def _add_experts(add: Callable, h: str, i: int, n_experts: int, moe_layout: str) -> None:
    """Mixtral's router and experts of layer i (h: the layer's key prefix)."""
    if not n_experts:
        return
    moe = "layers/moe/"
    if moe_layout == "fused":
        add(h + "mlp.gate.weight", "T", (moe + "router/kernel", i))
        add(h + "mlp.experts.gate_up_proj", "Tsplit", (moe + "gate_proj/kernel", i),
            (moe + "up_proj/kernel", i))
        add(h + "mlp.experts.down_proj", "T", (moe + "down_proj/kernel", i))
        return
    add(h + "block_sparse_moe.gate.weight", "T", (moe + "router/kernel", i))
    for e in range(n_experts):
        for w, n in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            add(f"{h}block_sparse_moe.experts.{e}.{w}.weight", "T",
                (f"{moe}{n}_proj/kernel", (i, e)))


def _detect_moe_layout(cfg: ModelConfig, keys: Iterable[str]) -> str:
    """"fused" when the file holds transformers 5's stacked expert tensors, else "hub"."""
    if not getattr(cfg, "num_experts", 0):
        return "hub"
    return "fused" if any(".mlp.experts.gate_up_proj" in k for k in keys) else "hub"


def _ignorable(key: str, cfg: ModelConfig) -> bool:
    """Buffers and aliases that carry no parameters of their own."""
    if cfg.family == "gpt2" and re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",
                                             key):
        return True  # GPT-2's causal-mask buffers in old checkpoints
    return key == "lm_head.weight" and cfg.tie_embeddings  # alias of the tied embedding


def _detect_prefix(cfg: ModelConfig, keys: Iterable[str]) -> Optional[str]:
    keys = set(keys)
    if cfg.family == "gpt2":
        return "transformer." if "transformer.wte.weight" in keys or "wte.weight" not in keys \
            else ""
    return "" if "embed_tokens.weight" in keys and "model.embed_tokens.weight" not in keys \
        else "model."


# --------------------------------------------------------------------------------------------
# Loading


def _weight_files(path: str, problems: list[str]) -> list[str]:
    """The safetensors files of a directory (from the index when there is one)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()), key=_natural_key)
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                keys = [k for k, v in weight_map.items() if v == name]
                problems.append(f"shard {name!r} named in model.safetensors.index.json is "
                                f"missing (it holds {len(keys)} tensors: {keys})")
        return [f for f in files if os.path.isfile(os.path.join(path, f))]
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    files = sorted((f for f in os.listdir(path) if f.endswith(".safetensors")), key=_natural_key)
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {bins}: ftjax reads no pickles; re-save with transformers' "
                "save_pretrained, which writes safetensors)") if bins else ""
        problems.append(f"no *.safetensors files in {path!r}{hint}")
    return files


def _read_headers(path: str, files: list[str]) -> dict[str, tuple[str, tuple, str]]:
    """key -> (file, shape, safetensors dtype), reading only the headers."""
    from safetensors import safe_open
    out: dict[str, tuple[str, tuple, str]] = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="numpy") as f:
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (name, tuple(s.get_shape()), s.get_dtype())
    return out


def load_pretrained(path: str, dtype: Any = None) -> tuple[ModelConfig, dict]:
    """Reads a local Hugging Face directory into `(ModelConfig, params)`.

    The architecture comes from config.json; tensors are streamed one at a time into
    preallocated layer-stacked numpy arrays of `dtype` (default float32; "bfloat16" halves
    host memory), recorded as `cfg.param_dtype`. Leaves are host numpy arrays: place them with
    `jax.device_put(params, shardings)`. Raises `HFCheckpointError` listing every problem.
    """
    path = os.fspath(path)
    c = _read_config(path)
    problems: list[str] = []
    family, fields, cfg_problems = _parse_config(c)
    problems += [f"config.json: {p}" for p in cfg_problems]
    dtype = _dtype_name(dtype) if dtype is not None else "float32"
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
        leaves = _leaf_shapes(cfg)
        layout = {e.key: e for e in tensor_layout(cfg, _detect_prefix(cfg, headers),
                                                  _detect_moe_layout(cfg, headers))}
        missing = [k for k in layout if k not in headers]
        if missing and headers:
            problems.append(f"missing tensors ({len(missing)}): {missing}")
        unexpected = sorted((k for k in headers if k not in layout and not _ignorable(k, cfg)),
                            key=_natural_key)
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
    for k, (name, _, dt) in sorted(headers.items(), key=lambda kv: _natural_key(kv[0])):
        if dt not in _SAFETENSORS_DTYPES and k in layout:
            problems.append(f"tensor {k!r} in {name} has dtype {dt} (supported: "
                            f"{sorted(_SAFETENSORS_DTYPES)})")
    if problems:
        raise _fail(f"cannot load Hugging Face checkpoint {path!r}"
                    + (f" as {SUPPORTED_ARCHITECTURES[family][0]}" if family else ""), problems)

    np_dtype = np.dtype(dtype)
    leaves = _leaf_shapes(cfg)
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


# --------------------------------------------------------------------------------------------
# Saving


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
                    tokenizer_dir: Optional[str] = None, moe_layout: str = "hub") -> list[str]:
    """Writes a transformers directory: config.json, generation_config.json, safetensors.

    The family is `cfg.family`. Tensors are stored in `dtype` (default cfg.param_dtype; one of
    float32/bfloat16/float16) as `model.safetensors`, or as `model-0000k-of-0000N.safetensors`
    shards of at most `shard_size_mb` plus `model.safetensors.index.json`, all with
    `{"format": "pt"}` metadata. Tied embeddings write no `lm_head.weight`. `extra_config`
    adds config.json keys (bos/eos/pad token ids are null unless given there);
    `tokenizer_dir` copies tokenizer files from another directory. Mixtral experts are written
    per expert (`moe_layout="hub"`, as transformers itself saves them; readable by transformers
    4 and 5) or stacked (`"fused"`, transformers 5's state-dict names). Returns the files written.
    """
    from safetensors.numpy import save_file
    path = os.fspath(path)
    storage = _dtype_name(dtype if dtype is not None else cfg.param_dtype)
    problems = hf_problems(cfg)
    if storage not in _STORAGE_DTYPES:
        problems.append(f"dtype={storage!r} (use one of {_STORAGE_DTYPES})")
    if moe_layout not in _MOE_LAYOUTS:
        problems.append(f"moe_layout={moe_layout!r} (use one of {_MOE_LAYOUTS})")
    leaves = _leaf_shapes(cfg)
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
        raise _fail(f"cannot save {cfg.family!r} params as a Hugging Face checkpoint", problems)
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
    for name, idx in zip(names, shards):
        tensors = {}
        for i in idx:
            e = layout[i]
            parts = [flat[p] if layer is None else flat[p][layer] for p, layer in e.targets]
            tensors[e.key] = np.ascontiguousarray(e.to_hf(parts).astype(np_storage, copy=False))
            weight_map[e.key] = name
        tmp = os.path.join(path, name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, name))
        del tensors
    written = list(names)
    if n_shards > 1:
        index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
        _write_json(os.path.join(path, "model.safetensors.index.json"), index)
        written.append("model.safetensors.index.json")
    _write_json(os.path.join(path, "config.json"), hf_config)
    gen = {"_from_model_config": True}
    gen.update({k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config.get(k) is not None})
    _write_json(os.path.join(path, "generation_config.json"), gen)
    written += ["config.json", "generation_config.json"]
    if tokenizer_dir is not None:
        written += copy_tokenizer_files(tokenizer_dir, path)
    return written


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the tokenizer files (tokenizer.json, vocab.json, chat template, ...) that
    `src_dir` has into `dst_dir`; returns their names (none when src_dir has none)."""
    copied = []
    for name in _TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Config sections with model.init_from="hf:DIR"

# Execution choices, and MoE training choices a config.json does not carry (Mixtral's is
# dropless, without z-loss; its router_jitter_noise must be 0, see _parse_moe).
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "moe_dispatch",
                   "capacity_factor", "router_jitter", "router_z_loss_coef")


def model_config_from_section(fields: dict[str, Any], hf_dir: str,
                              log: Callable[[str], None] = print) -> ModelConfig:
    """The ModelConfig of a run initialised from a Hugging Face directory.

    The architecture comes from the checkpoint's config.json; only the run-time fields
    (dtype, param_dtype, scan_layers, remat, and the MoE choices moe_dispatch,
    capacity_factor, router_jitter, router_z_loss_coef) come from the config's model section.
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
