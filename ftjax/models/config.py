"""ModelConfig: one frozen dataclass whose fields express every supported decoder family.

Families differ only in fields (norm kind, activation, biases, q/k-norm, tied embeddings,
embedding scale, sliding window, positions), never in code paths chosen by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
MLPS = ("gated", "plain")
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = (None, "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
DTYPES = ("float32", "bfloat16")
ROUTERS = ("topk_softmax", "softmax_topk")
MOE_DISPATCHES = ("dropless", "capacity")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "splash")
MOE_GROUPED_IMPLS = ("auto", "ragged_dot", "blocks")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer. Hashable, so it is static under jit."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: Optional[int] = None  # default hidden_size // num_heads
    max_position_embeddings: int = 4096

    # Normalisation.
    norm: str = "rms"              # "rms" | "layer"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0       # Gemma: weights stored as w, applied as (1 + w)
    norm_bias: bool = False        # LayerNorm bias (GPT-2)

    # MLP.
    mlp: str = "gated"             # "gated" (SwiGLU/GeGLU) | "plain" (GPT-2)
    activation: str = "silu"
    mlp_bias: bool = False

    # Sparse mixture of experts (ftjax/models/moe.py, docs/moe.md). num_experts = 0: dense MLP.
    num_experts: int = 0           # > 0: every layer's MLP is a sparse MoE of this many experts
    num_experts_per_tok: int = 2   # top-k experts per token (1..num_experts)
    expert_intermediate_size: Optional[int] = None  # expert MLP width (default intermediate_size)
    num_shared_experts: int = 0    # always-on experts, fused as one MLP of width n * expert width
    router: str = "topk_softmax"   # "topk_softmax" (Mixtral) | "softmax_topk" (softmax over all E)
    router_renormalize: bool = False  # softmax_topk: rescale the k chosen probabilities to sum 1
    router_jitter: float = 0.0     # training-only router-input noise x * U(1-eps, 1+eps) (Switch)
    moe_dispatch: str = "dropless"  # "dropless" (ragged, no drops) | "capacity" (fixed slots)
    capacity_factor: float = 1.25  # capacity: C = ceil(cf * tokens_per_sequence * k / E) slots
    # Dropless expert product: "ragged_dot" (jax.lax.ragged_dot), "blocks" (rows padded to
    # expert blocks of moe_block_size, one batched matmul), "auto" (blocks on CPU, where
    # ragged_dot computes every expert over every row; ragged_dot elsewhere).
    moe_grouped_impl: str = "auto"
    moe_block_size: int = 128      # "blocks": rows per block (smaller for small batches)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in the objective
    router_z_loss_coef: float = 0.0    # weight of the router z-loss

    # Attention.
    qkv_bias: bool = False         # Qwen2, GPT-2
    o_bias: bool = False           # GPT-2
    qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on q and k
    sliding_window: Optional[int] = None  # Mistral: keys within the last W positions
    attn_scale: Optional[float] = None    # default head_dim ** -0.5
    attention_impl: str = "auto"   # the attention core (layers.attention_impl): see ATTENTION_IMPLS
    attention_block: int = 64      # query rows per block of the "blocked" core

    # Positions.
    position: str = "rope"         # "rope" | "learned" (GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: Optional[str] = None  # None | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192

    # Embeddings.
    tie_embeddings: bool = False
    embed_scale: bool = False      # Gemma: multiply embeddings by sqrt(hidden_size)

    # Numerics and execution.
    dtype: str = "float32"         # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True       # lax.scan over stacked layers; False unrolls a Python loop
    remat: str = "none"            # see REMAT_POLICIES
    init_std: float = 0.02

    family: str = "llama"          # informational (used by checkpoint IO)

    def __post_init__(self):
        errors = []

        def check(name, value, allowed):
            if value not in allowed:
                errors.append(f"{name}={value!r} (allowed: {allowed})")

        check("norm", self.norm, NORMS)
        check("activation", self.activation, ACTIVATIONS)
        check("mlp", self.mlp, MLPS)
        check("position", self.position, POSITIONS)
        check("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check("remat", self.remat, REMAT_POLICIES)
        check("dtype", self.dtype, DTYPES)
        check("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if int(self.attention_block) <= 0:
            errors.append(f"attention_block={self.attention_block} must be positive")
        check("param_dtype", self.param_dtype, DTYPES)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % max(self.num_kv_heads, 1):
            errors.append(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                          f"{self.num_kv_heads} (grouped-query attention)")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            errors.append(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                          f"{self.num_heads}; set head_dim explicitly")
        if self.position == "rope" and self.dim_per_head % 2:
            errors.append(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            errors.append(f"sliding_window={self.sliding_window} must be positive or None")
        errors += self._moe_errors()
        if errors:
            raise ValueError("Invalid ModelConfig: " + "; ".join(errors))

    def _moe_errors(self) -> list[str]:
        errors = []
        if self.num_experts < 0:
            errors.append(f"num_experts={self.num_experts} must be >= 0 (0 = dense MLP)")
        if self.router not in ROUTERS:
            errors.append(f"router={self.router!r} (allowed: {ROUTERS})")
        if self.moe_dispatch not in MOE_DISPATCHES:
            errors.append(f"moe_dispatch={self.moe_dispatch!r} (allowed: {MOE_DISPATCHES})")
        if self.moe_grouped_impl not in MOE_GROUPED_IMPLS:
            errors.append(f"moe_grouped_impl={self.moe_grouped_impl!r} (allowed: "
                          f"{MOE_GROUPED_IMPLS})")
        if self.num_experts <= 0:  # the numeric MoE fields are unused by dense models
            return errors
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            errors.append(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                          f"1..num_experts={self.num_experts}")
        if self.expert_intermediate_size is not None and self.expert_intermediate_size <= 0:
            errors.append(f"expert_intermediate_size={self.expert_intermediate_size} must be "
                          "positive or None (= intermediate_size)")
        if self.num_shared_experts < 0:
            errors.append(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.moe_block_size < 1:
            errors.append(f"moe_block_size={self.moe_block_size} must be >= 1")
        if not self.capacity_factor > 0:
            errors.append(f"capacity_factor={self.capacity_factor} must be positive")
        if not 0.0 <= self.router_jitter < 1.0:
            errors.append(f"router_jitter={self.router_jitter} must be in [0, 1)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.mlp_bias:
            errors.append("mlp_bias=True is not supported with num_experts > 0 (experts have "
                          "no biases); set mlp_bias=False")
        return errors

    @property
    def expert_width(self) -> int:
        """Hidden width f of one expert MLP."""
        return self.expert_intermediate_size or self.intermediate_size

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.dim_per_head

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}")
        return cls(**d)


# Family presets: the fields that make a family what it is. Sizes come from the caller.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral", sliding_window=4096),
    "qwen2": dict(family="qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": dict(family="qwen3", qk_norm=True, rope_theta=1e6, norm_eps=1e-6),
    "gemma": dict(family="gemma", norm_offset=1.0, embed_scale=True, activation="gelu_tanh",
                  tie_embeddings=True, norm_eps=1e-6),
    "gpt2": dict(family="gpt2", norm="layer", norm_bias=True, mlp="plain",
                 activation="gelu_tanh", mlp_bias=True, qkv_bias=True, o_bias=True,
                 position="learned", tie_embeddings=True, max_position_embeddings=1024),
    "mixtral": dict(family="mixtral", num_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                    router_aux_loss_coef=0.02),
}

# Named sizes (benchmark presets and the quickstart base model).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4,
                 num_heads=4, num_kv_heads=2),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8,
                  num_heads=8, num_kv_heads=4),
}


def preset(family: str = "llama", size: Optional[str] = None, **overrides) -> ModelConfig:
    """A ModelConfig for `family` (see FAMILIES) at a named `size` (see SIZES), with overrides."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; supported: {sorted(FAMILIES)}")
    fields = dict(FAMILIES[family])
    if size is not None:
        if size not in SIZES:
            raise ValueError(f"Unknown model size {size!r}; supported: {sorted(SIZES)}")
        fields.update(SIZES[size])
    fields.update(overrides)
    return ModelConfig(**fields)
