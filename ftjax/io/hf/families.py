"""One table per Hugging Face family: architecture, config.json fields, tensor names.

`HF_FAMILIES[family]` is read by both directions: `config.py` (config.json <-> ModelConfig),
`layout.py` (which HF tensor fills which ftjax leaf), hence `load_pretrained` and
`save_pretrained`. What makes a family what it is on the ftjax side (Gemma's norm offset,
Qwen3's qk-norm, GPT-2's learned positions, ...) is not restated here: `HFFamily.fixed` names
the ModelConfig fields the transformers class hard-wires, and their values are read from the
`ftjax.models.config.FAMILIES` presets (ModelConfig defaults where a preset is silent).
A new family is one entry here (plus its ModelConfig preset).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ftjax.models.config import FAMILIES, ModelConfig

__all__ = ["HFCheckpointError", "HFFamily", "HF_FAMILIES", "SUPPORTED_ARCHITECTURES",
           "EXPERTS", "family_of", "fail"]

#: Marks where a layer's router and experts go in `HFFamily.layer_tensors` (see layout.py).
EXPERTS = "<experts>"

# A tensor row: (HF name under the base-model prefix, conversion kind, ftjax leaf path(s)).
# Kinds are those of `layout.Entry`: "copy", "T" (Linear [out, in] <-> kernel [in, out]),
# "split" (one HF tensor, several leaves on the last axis).
Tensor = tuple[str, str, tuple[str, ...]]

_DECODER_LAYER: tuple[Tensor, ...] = (
    ("input_layernorm.weight", "copy", ("layers/attn_norm/scale",)),
    *[row for n in "qkvo" for row in (
        (f"self_attn.{n}_proj.weight", "T", (f"layers/attn/{n}_proj/kernel",)),
        (f"self_attn.{n}_proj.bias", "copy", (f"layers/attn/{n}_proj/bias",)))],
    *[(f"self_attn.{n}_norm.weight", "copy", (f"layers/attn/{n}_norm/scale",)) for n in "qk"],
    ("post_attention_layernorm.weight", "copy", ("layers/mlp_norm/scale",)),
    (EXPERTS, "", ()),
    *[row for n in ("gate", "up", "down") for row in (
        (f"mlp.{n}_proj.weight", "T", (f"layers/mlp/{n}_proj/kernel",)),
        (f"mlp.{n}_proj.bias", "copy", (f"layers/mlp/{n}_proj/bias",)))],
)
_GPT2_LAYER: tuple[Tensor, ...] = (
    *[row for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")) for row in (
        (f"{hf}.weight", "copy", (f"layers/{ours}/scale",)),
        (f"{hf}.bias", "copy", (f"layers/{ours}/bias",)))],
    *[row for kind, leaf in (("weight", "kernel"), ("bias", "bias")) for row in (
        # Conv1D weights are already [in, out]; c_attn fuses q|k|v on the output axis.
        (f"attn.c_attn.{kind}", "split", tuple(f"layers/attn/{n}_proj/{leaf}" for n in "qkv")),
        (f"attn.c_proj.{kind}", "copy", (f"layers/attn/o_proj/{leaf}",)),
        (f"mlp.c_fc.{kind}", "copy", (f"layers/mlp/up_proj/{leaf}",)),
        (f"mlp.c_proj.{kind}", "copy", (f"layers/mlp/down_proj/{leaf}",)))],
)

# ModelConfig field -> config.json key, for the fields every family stores one to one.
_DECODER_KEYS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                     intermediate_size="intermediate_size", num_layers="num_hidden_layers",
                     num_heads="num_attention_heads",
                     max_position_embeddings="max_position_embeddings",
                     norm_eps="rms_norm_eps", tie_embeddings="tie_word_embeddings")
_GPT2_KEYS = dict(vocab_size="vocab_size", hidden_size="n_embd", intermediate_size="n_inner",
                  num_layers="n_layer", num_heads="n_head", max_position_embeddings="n_positions",
                  norm_eps="layer_norm_epsilon", tie_embeddings="tie_word_embeddings")
# The fields every transformers class of a style fixes (values from the ftjax presets).
_DECODER_FIXED = ("position", "norm", "norm_bias", "mlp", "qk_norm", "norm_offset",
                  "embed_scale")
_GPT2_FIXED = _DECODER_FIXED + ("qkv_bias", "o_bias", "mlp_bias", "sliding_window",
                                "num_experts")


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """How transformers stores one ftjax family.

    style: "decoder" (Llama-like config keys, `nn.Linear` [out, in] weights) or "gpt2"
    (n_embd-style keys, Conv1D [in, out] weights).
    keys: ModelConfig field -> config.json key for one-to-one fields; aliases: other
    config.json spellings of those keys (GPT-2 also accepts hidden_size for n_embd, ...).
    defaults: the transformers config class defaults for keys a config.json may omit.
    fixed: ModelConfig fields the transformers class hard-wires (values: `fixed_fields`).
    attention_bias: one config.json `attention_bias` flag sets qkv_bias and o_bias;
    mlp_bias: config.json has an `mlp_bias` flag.
    window: how config.json holds a sliding window: "none", "all" (`sliding_window` for every
    layer, Mistral) or "qwen" (`use_sliding_window` + `max_window_layers` / `layer_types`).
    prefix / head / layer / tail: tensor names (base-model prefix; tensors before, in and
    after the layer stack; `layer_prefix` + index + "." starts a layer's names).
    ignored: regex of buffers a checkpoint may carry that hold no parameters.
    activation_keys: the config.json key(s) of the activation, read in order, all written.
    """
    family: str
    architecture: str
    model_type: str
    style: str
    keys: dict[str, str]
    defaults: dict[str, Any]
    fixed: tuple[str, ...]
    prefix: str
    head: tuple[Tensor, ...]
    layer_prefix: str
    layer: tuple[Tensor, ...]
    tail: tuple[Tensor, ...]
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    default_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    window: str = "none"
    moe: bool = False
    ignored: Optional[str] = None
    activation_keys: tuple[str, ...] = ("hidden_act",)
    gelu_is_tanh: bool = False  # transformers reads this family's "gelu" as the tanh form

    @property
    def fixed_fields(self) -> dict[str, Any]:
        """{field: value} the transformers class requires, from the ftjax preset."""
        preset = FAMILIES[self.family]
        return {k: preset.get(k, _FIELD_DEFAULTS[k]) for k in self.fixed}


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _decoder(family: str, architecture: str, defaults: dict, fixed: tuple[str, ...] = (),
             **kw) -> HFFamily:
    return HFFamily(family=family, architecture=architecture, model_type=family,
                    style="decoder", keys=_DECODER_KEYS, defaults=defaults,
                    fixed=_DECODER_FIXED + fixed, prefix="model.",
                    head=(("embed_tokens.weight", "copy", ("embed/embedding",)),),
                    layer_prefix="layers.", layer=_DECODER_LAYER,
                    tail=(("norm.weight", "copy", ("final_norm/scale",)),), **kw)


# transformers v5 class defaults for keys a config.json may omit (HF applies the same ones).
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                       head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                       mlp_bias=False)
_MISTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=None, hidden_act="silu", max_position_embeddings=4096 * 32,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096)
_QWEN_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28)
_GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                       head_dim=256, hidden_act="gelu_pytorch_tanh",
                       max_position_embeddings=8192, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, attention_bias=False)
_MIXTRAL_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=None, hidden_act="silu", max_position_embeddings=4096 * 32,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                         num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                         router_jitter_noise=0.0)
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
_DENSE = ("num_experts", "mlp_bias")

HF_FAMILIES: dict[str, HFFamily] = {f.family: f for f in (
    _decoder("llama", "LlamaForCausalLM", _LLAMA_DEFAULTS, ("num_experts", "sliding_window"),
             attention_bias=True, mlp_bias=True),
    _decoder("mistral", "MistralForCausalLM", _MISTRAL_DEFAULTS,
             _DENSE + ("qkv_bias", "o_bias"), window="all"),
    _decoder("qwen2", "Qwen2ForCausalLM", dict(_QWEN_DEFAULTS, head_dim=None),
             _DENSE + ("qkv_bias", "o_bias"), window="qwen"),
    _decoder("qwen3", "Qwen3ForCausalLM", dict(_QWEN_DEFAULTS, head_dim=128,
                                               attention_bias=False),
             _DENSE, attention_bias=True, window="qwen"),
    _decoder("gemma", "GemmaForCausalLM", _GEMMA_DEFAULTS, _DENSE + ("sliding_window",),
             attention_bias=True, activation_keys=("hidden_activation", "hidden_act"),
             gelu_is_tanh=True),
    HFFamily(family="gpt2", architecture="GPT2LMHeadModel", model_type="gpt2", style="gpt2",
             keys=_GPT2_KEYS, defaults=_GPT2_DEFAULTS, fixed=_GPT2_FIXED,
             aliases={"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                      "num_attention_heads": "n_head",
                      "max_position_embeddings": "n_positions"},
             prefix="transformer.",
             head=(("wte.weight", "copy", ("embed/embedding",)),
                   ("wpe.weight", "copy", ("pos_embed/embedding",))),
             layer_prefix="h.", layer=_GPT2_LAYER,
             tail=(("ln_f.weight", "copy", ("final_norm/scale",)),
                   ("ln_f.bias", "copy", ("final_norm/bias",))),
             # the causal-mask buffers of old GPT-2 checkpoints
             ignored=r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",
             activation_keys=("activation_function",)),
    # transformers' MixtralConfig overrides default_theta (1e6).
    _decoder("mixtral", "MixtralForCausalLM", _MIXTRAL_DEFAULTS,
             ("mlp_bias", "qkv_bias", "o_bias"), default_theta=1e6, window="all", moe=True),
)}

# family -> (architecture class, model_type)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    f: (h.architecture, h.model_type) for f, h in HF_FAMILIES.items()}
# architecture or model_type -> why it cannot be read yet (none at the moment).
NOT_YET: dict[str, str] = {}
_SUPPORTED_TEXT = ", ".join(f"{a} ({f})" for f, (a, _) in SUPPORTED_ARCHITECTURES.items())


class HFCheckpointError(ValueError):
    """A Hugging Face directory or config that ftjax cannot read or write; lists every problem."""


def fail(what: str, problems: list[str]) -> HFCheckpointError:
    """One HFCheckpointError listing every problem and the supported architectures."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return HFCheckpointError(f"{what}: {len(problems)} problem(s):\n{lines}\n"
                             f"Supported architectures: {_SUPPORTED_TEXT}.")


def family_of(c: dict) -> tuple[Optional[str], Optional[str]]:
    """(family, None) or (None, reason) from `architectures`, falling back to `model_type`."""
    archs = c.get("architectures") or []
    by_arch = {h.architecture: f for f, h in HF_FAMILIES.items()}
    for a in archs:
        if a in by_arch:
            return by_arch[a], None
    for a in archs:
        if a in NOT_YET:
            return None, f"{a} is not supported yet: {NOT_YET[a]}"
    mt = c.get("model_type")
    by_type = {h.model_type: f for f, h in HF_FAMILIES.items()}
    if mt in by_type and not archs:
        return by_type[mt], None
    if mt in NOT_YET:
        return None, f"model_type {mt!r} is not supported yet: {NOT_YET[mt]}"
    if mt in by_type:  # e.g. LlamaModel or LlamaForSequenceClassification: no causal LM head
        return None, (f"architectures {archs} (model_type {mt!r}) is not a causal LM class ftjax "
                      f"reads; expected {HF_FAMILIES[by_type[mt]].architecture}")
    return None, f"unsupported architecture: architectures={archs}, model_type={mt!r}"
