"""LoRA (Hu et al. 2021): W x + s * B A x, with the dense W frozen and A, B trained.

Kernels in ftjax are [in, out] (possibly with leading stacked dims such as [layers, in, out]),
so the update is `x @ a @ b` with a [.., in, r] and b [.., r, out]; the merged weight is
W + s * a @ b. The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievic 2023).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft.core import (StructuredWeight, dense, embed, expert_linear, grouped_matmul,
                             linear, map_weights, materialize, select_targets, unwrap, weight_paths)
from ftjax.peft.method import Method, register

RANK_AXIS = "lora_rank"


@flax.struct.dataclass
class LoRAWeight(StructuredWeight):
    """A frozen base weight plus a trainable low-rank update (works for kernels and embeddings).

    For a kernel [.., in, out]: a [.., in, r], b [.., r, out]. For an embedding table
    [vocab, embed] (looked up, not multiplied): a [vocab, r], b [r, embed].
    """
    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    # LoRA dropout on the adapter's input (training only): the rate, and a raw PRNG key per
    # stacked slice [.., 2] bound for one step by `bind_dropout` (None otherwise).
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    dropout_key: Any = None

    def _dropped(self, x):
        """x with LoRA dropout applied (training steps with a bound key), else x."""
        if self.dropout_key is None or self.dropout <= 0:
            return x
        key = self.dropout_key
        if key.ndim > 1:  # stacked expert weights carry one key per expert: one mask suffices
            key = key.reshape(-1, key.shape[-1])[0]
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

    def matmul(self, x):
        dt = x.dtype
        xa = self._dropped(x)
        # Factored (x a) b, never a b; `dense` keeps XLA:CPU's backward fast (see its doc).
        return (linear(x, self.base, dt)
                + self.scale * dense(dense(xa, self.a.astype(dt)), self.b.astype(dt)))

    def expert_matmul(self, x, group_sizes):
        """Per-expert base product plus s * (x a_e) b_e, never materialising a_e b_e."""
        dt = x.dtype
        xa = self._dropped(x)
        a, b = self.a.astype(dt), self.b.astype(dt)
        # x [E, C, in] (batched), or rows sorted by expert (ragged or in expert blocks)
        delta = grouped_matmul(grouped_matmul(xa, a, group_sizes), b, group_sizes)
        return expert_linear(x, self.base, group_sizes, dt) + self.scale * delta

    def lookup(self, ids):
        base = embed(ids, self.base)
        delta = jnp.take(self.a, ids, axis=0) @ self.b
        return base + (self.scale * delta).astype(base.dtype)

    def materialize(self):
        w = materialize(self.base)
        return w + (self.scale * jnp.matmul(self.a, self.b)).astype(w.dtype)

    def trainable_fields(self):
        return ("a", "b")

    def frozen_base(self):
        return unwrap(self.base)

    def lora_factors(self):
        return self.a, self.b, self.scale

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = base_axes[:-2], base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "a": lead + (ax_in, RANK_AXIS), "b": lead + (RANK_AXIS, ax_out),
                "dropout_key": None}


def bind_dropout(params: Any, rng: jax.Array) -> Any:
    """Gives every LoRAWeight with dropout > 0 fresh keys for one training step.

    Keys are stacked like the factors ([layers, 2] for scanned layers), so `lax.scan` hands
    each layer its own key. Called by the loss only when it has an rng (training, not eval).
    """
    counter = [0]

    def one(_, w):
        if not isinstance(w, LoRAWeight) or w.dropout <= 0:
            return w
        counter[0] += 1
        lead = w.a.shape[:-2]
        keys = jax.random.split(jax.random.fold_in(rng, counter[0]), max(int(np.prod(lead)), 1))
        return w.replace(dropout_key=keys.reshape(lead + (2,)) if lead else keys[0])
    return map_weights(one, params)


def bind_dynamic_rank(params: Any, rng: jax.Array) -> Any:
    """DyLoRA (Valipour et al. 2023): one training step at a sampled rank. b = floor(u r) + 1,
    u ~ U[0, 1) drawn once per step (so b ~ U{1..r}, the same fraction of every weight's r),
    and every LoRAWeight uses only its first b rank components: columns > b of a and rows > b
    of b are multiplied by zero, so they get exactly zero gradient this step. The scale stays
    alpha / r, so the trained adapter truncated to any rank (`truncate_rank`) is the model
    that was trained at that rank. Called by the loss only on training steps."""
    u = jax.random.uniform(rng)

    def one(_, w):
        if not isinstance(w, LoRAWeight):
            return w
        r = w.a.shape[-1]
        keep = jnp.arange(r) < jnp.minimum(jnp.floor(u * r).astype(jnp.int32) + 1, r)
        return w.replace(a=w.a * keep.astype(w.a.dtype),
                         b=w.b * keep[:, None].astype(w.b.dtype))
    return map_weights(one, params)


def truncate_rank(params: Any, rank: int) -> Any:
    """Every LoRAWeight cut to its first min(rank, r) components (scale unchanged): a DyLoRA
    adapter evaluated or exported at a smaller rank."""
    if rank < 1:
        raise ValueError(f"truncate_rank: rank={rank} must be >= 1")

    def one(_, w):
        if not isinstance(w, LoRAWeight):
            return w
        return w.replace(a=w.a[..., :rank], b=w.b[..., :rank, :])
    return map_weights(one, params)


def _bind_both(params: Any, rng: jax.Array) -> Any:
    rank_rng, drop_rng = jax.random.split(rng)
    return bind_dropout(bind_dynamic_rank(params, rank_rng), drop_rng)


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# The attention and MLP projections; "lm_head" and "embed" can be added explicitly.
DEFAULT_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel", r"layers/mlp/(gate|up|down)_proj/kernel")
# The stacked expert kernels [L, E, in, out] of MoE models (every expert gets its own factors).
EXPERT_TARGETS = (r"layers/moe/(gate|up|down)_proj/kernel",)


def _rank_for(path: str, rank: int, pattern_values: Sequence[tuple[re.Pattern, Any]]):
    for pat, value in pattern_values:
        if pat.search(path):
            return value
    return rank


def init_factors(key, w: jax.Array, rank: int, scale: float, init: str, is_embedding: bool):
    """(a, b, new base) for one weight [.., in, out] (or an embedding [vocab, embed]).

    default: a ~ Kaiming-uniform over `in` (as torch's nn.Linear, PEFT's default), b = 0, so
      the adapted model starts equal to the base. Embeddings: a = 0, b ~ N(0, 1) (PEFT).
    gaussian: a ~ N(0, 1/r), b = 0.
    pissa: a, b from the top-r SVD of W (Meng et al. 2024), base replaced by W - s*a@b, so the
      model is unchanged at initialisation but the adapter holds W's principal directions.
    """
    *lead, n_in, n_out = w.shape
    ka, kb = jax.random.split(key)
    dtype = jnp.float32
    if init == "pissa":
        u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
        s_r = s[..., :rank] / scale
        a = u[..., :, :rank] * jnp.sqrt(s_r)[..., None, :]
        b = jnp.sqrt(s_r)[..., :, None] * vt[..., :rank, :]
        base = (w.astype(jnp.float32) - scale * a @ b).astype(w.dtype)
        return a, b, base
    if is_embedding:
        a = jnp.zeros((*lead, n_in, rank), dtype)
        b = jax.random.normal(kb, (*lead, rank, n_out), dtype)
        return a, b, w
    if init == "gaussian":
        a = jax.random.normal(ka, (*lead, n_in, rank), dtype) / rank
    elif init == "default":
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=sqrt(5)) on [r, in] == U(-1/sqrt(in), ..)
        a = jax.random.uniform(ka, (*lead, n_in, rank), dtype, -bound, bound)
    else:
        raise ValueError(f"unknown LoRA init {init!r}; choose default, gaussian or pissa")
    return a, jnp.zeros((*lead, rank, n_out), dtype), w


def apply_lora(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
               targets: Sequence[str] = DEFAULT_TARGETS, rslora: bool = False,
               init: str = "default", rank_pattern: Optional[dict] = None,
               alpha_pattern: Optional[dict] = None, dtype=None, dropout: float = 0.0) -> Any:
    """Wraps every weight whose path fully matches a `targets` regex in a LoRAWeight.

    rank_pattern / alpha_pattern: {regex: value} overrides per path (first `re.search` hit
    wins, as PEFT's patterns). Raises if no weight matches, listing the weight paths.
    """
    def make(path, w, r, s, k):
        a, b, base = init_factors(k, w, r, s, init, is_embedding=path.endswith("embedding"))
        adt = dtype or jnp.float32
        return LoRAWeight(base=base, a=a.astype(adt), b=b.astype(adt), scale=s,
                          dropout=float(dropout))

    return wrap_targets(params, key, "LoRA", targets, None, make, rank=rank, alpha=alpha,
                        rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def wrap_targets(params: Any, key: jax.Array, name: str, targets: Sequence[str], check, make, *,
                 rank: int, alpha: float, rslora: bool = False,
                 rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None):
    """`core.select_targets` for the low-rank methods (LoRA, QLoRA, DoRA, LoRA-FA): the i-th
    matching weight is replaced by `make(path, w, rank, scale, fold_in(key, i))`, with the
    rank and alpha of its per-path patterns; warns when a MoE model's experts stay frozen."""
    ranks = [(re.compile(k), v) for k, v in (rank_pattern or {}).items()]
    alphas = [(re.compile(k), v) for k, v in (alpha_pattern or {}).items()]
    hits: list[str] = []

    def one(path, w, k):
        hits.append(path)
        r = int(_rank_for(path, rank, ranks))
        s = lora_scale(r, float(_rank_for(path, alpha, alphas)), rslora)
        return make(path, w, r, s, k)

    out = select_targets(params, targets, one, name=name, key=key, check=check)
    experts = [p for p in weight_paths(params) if re.fullmatch(EXPERT_TARGETS[0], p)]
    if experts and not set(experts) & set(hits):
        warnings.warn(f"{name}: this MoE model's expert kernels ({experts}) are not targeted, so "
                      "its experts stay frozen; add lora.EXPERT_TARGETS to the targets to adapt "
                      "them", stacklevel=3)
    return out


# Every setting of the `lora` method and its default (configs/lora_sft.py overrides some).
DEFAULTS = dict(
    rank=8,                      # r
    alpha=16.0,                  # scale = alpha / r (alpha / sqrt(r) with rslora)
    targets=DEFAULT_TARGETS,     # regexes over weight paths (lora.EXPERT_TARGETS for MoE)
    rslora=False,
    init="default",              # default | gaussian | pissa
    rank_pattern={},             # {regex: rank} per-path overrides (first re.search hit)
    alpha_pattern={},            # {regex: alpha}
    dropout=0.0,                 # LoRA dropout on the adapter's input (training only)
    train_patterns=(),           # plain leaves that train too (e.g. "lm_head/.*")
)


def lowrank_kwargs(s) -> dict:
    """The settings shared by the low-rank methods, from a resolved `peft` section."""
    return dict(rank=int(s.rank), alpha=float(s.alpha), targets=tuple(s.targets),
                rslora=bool(s.rslora), init=str(s.init),
                rank_pattern=dict(s.rank_pattern or {}), alpha_pattern=dict(s.alpha_pattern or {}))


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """LoRA from a resolved `peft` section (see DEFAULTS)."""
    del apply_fn, tokenizer
    dropout = float(s.dropout)
    transform = functools.partial(apply_lora, **lowrank_kwargs(s), dropout=dropout)
    bind = bind_dropout if dropout > 0 else None
    if s.dynamic_rank:  # DyLoRA: a rank sampled per training step
        bind = _bind_both if dropout > 0 else bind_dynamic_rank
    return Method(name="lora", transform=transform, train_patterns=tuple(s.train_patterns),
                  bind_rng=bind)


# Refused before a run builds anything (`trainers/_validate.py`); dora, lora_fa, qlora share them.
CHECKS = dict(rank=">= 1", alpha="> 0", init=("default", "gaussian", "pissa"),
              dropout="in [0, 1)", dynamic_rank=(False, True))

# Settings of `lora` alone, kept out of DEFAULTS, which dora / qlora / lora_fa copy.
LORA_ONLY = dict(
    dynamic_rank=False,          # DyLoRA: train at a rank b ~ U{1..r} per step (bind_dynamic_rank)
)

register("lora", {**DEFAULTS, **LORA_ONLY}, method, CHECKS)
