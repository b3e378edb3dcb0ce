"""Memory experts (Lamini memory tuning, "Mixture of Memory Experts"): a large bank of small
LoRA-sized experts at chosen layers, a few of them picked per token by a learned router.

For a frozen kernel W [in, out] and a token x [in], with M experts of rank r:

    y = x W + s * sum_{m in top_k(x R)} g_m(x) * (x A_m) B_m,      s = alpha / r

    R [in, M]       router: one score per expert (x R), the k best are kept
    A [M, in, r]    expert "keys" (Kaiming-uniform like LoRA's A)
    B [M, r, out]   expert "values", zero at init, so the model starts equal to the base
    g               softmax over the k kept scores; with `null_expert`, softmax over the k
                    scores plus a learned per-layer "no memory" logit, of which the k experts
                    get their share: tokens that need no fact can route their mass to nothing

Only the k chosen experts' factors are gathered per token (k r (in + out) multiply-adds per
token, never M); the router costs in * M per token. The bank and router train, the base is
frozen. Stacked layer weights [L, in, out] get stacked fields ([L, M, in, r], ...), since
`lax.scan` slices every field along the layer axis; the per-layer 0/1 `active` [L] turns
the memory on at the chosen `layers` only. Unchosen layers skip the memory product
(`lax.cond`), their bank is zero and receives no gradient, so it never moves. Memory cost,
honestly: the bank and its optimizer state are stored for all L layers (L / len(layers) times
what the chosen layers need), because a scanned field cannot skip layers.

A token-dependent mixture has no single dense weight: `materialize()` (merge, Hugging Face
export) raises.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.peft.core import StructuredWeight, linear, select_targets, unwrap
from ftjax.peft.lora import RANK_AXIS
from ftjax.peft.method import Method, register

EXPERT_AXIS = "expert"  # the bank dim: sharded over the "expert" mesh axis by the ep preset
DEFAULT_TARGETS = (r"layers/mlp/down_proj/kernel",)


@flax.struct.dataclass
class MemoryExpertsWeight(StructuredWeight):
    """A frozen kernel [.., in, out] plus a routed bank of memory experts (see module doc).

    a [.., M, in, r], b [.., M, r, out], router [.., in, M], active [..] (1.0: memory on at
    this layer, 0.0: off; frozen), null_logit [..] (the "no memory" logit; None without a null expert).
    """
    base: Any
    a: jax.Array
    b: jax.Array
    router: jax.Array
    active: jax.Array
    null_logit: Optional[jax.Array] = None
    top_k: int = flax.struct.field(pytree_node=False, default=1)
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def num_experts(self) -> int:
        return self.router.shape[-1]

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(expert ids [..., k] int32, gates [..., k] float32) for tokens x [..., in].

        Scores are x R in float32; top-k keeps the k best; the gates are a softmax over them
        (and over the null logit, whose share goes to no expert, when there is one).
        """
        scores = jnp.einsum("...i,im->...m", x.astype(jnp.float32),
                            self.router.astype(jnp.float32))
        top, ids = jax.lax.top_k(scores, self.top_k)
        if self.null_logit is None:
            return ids, jax.nn.softmax(top, axis=-1)
        null = jnp.broadcast_to(self.null_logit.astype(jnp.float32), top.shape[:-1] + (1,))
        return ids, jax.nn.softmax(jnp.concatenate([top, null], axis=-1), axis=-1)[..., :-1]

    def memory(self, x: jax.Array) -> jax.Array:
        """The routed expert sum s * sum_k g_k (x A_k) B_k for x [..., in] -> [..., out]."""
        dt = x.dtype
        ids, gates = self.route(x)
        a = jnp.take(self.a, ids, axis=0).astype(dt)        # [..., k, in, r]
        b = jnp.take(self.b, ids, axis=0).astype(dt)        # [..., k, r, out]
        h = jnp.einsum("...i,...kir->...kr", x, a) * gates[..., None].astype(dt)
        return self.scale * jnp.einsum("...kr,...kro->...o", h, b)

    def matmul(self, x):
        if self.active.ndim != 0:
            raise ValueError(f"MemoryExpertsWeight.matmul got a stacked weight (active shape "
                             f"{self.active.shape}); the model multiplies one layer's slice "
                             "(scan or x[i]) — slice the layer axis first")
        dt = x.dtype
        y = linear(x, self.base, dt)
        n_out = self.b.shape[-1]
        delta = jax.lax.cond(self.active > 0, self.memory,
                             lambda v: jnp.zeros(v.shape[:-1] + (n_out,), dt), x)
        return y + delta

    def materialize(self):
        raise ValueError(
            "memory experts cannot be merged into a dense weight: each token mixes its own top-"
            f"{self.top_k} of {self.num_experts} experts, so there is no single W' = W + dW. Keep "
            "the params unmerged (leave export.hf_dir empty) and serve the ftjax checkpoint")

    @property
    def shape(self):
        return tuple(self.base.shape)

    def trainable_fields(self):
        return ("a", "b", "router", "null_logit")

    def frozen_base(self):
        return unwrap(self.base)

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = base_axes[:-2], base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "a": lead + (EXPERT_AXIS, ax_in, RANK_AXIS),
                "b": lead + (EXPERT_AXIS, RANK_AXIS, ax_out),
                "router": lead + (ax_in, EXPERT_AXIS), "active": lead,
                "null_logit": None if self.null_logit is None else lead}


def memory_param_count(n_in: int, n_out: int, num_experts: int, rank: int,
                       null_expert: bool = False) -> int:
    """Trainable values of one layer's memory on an [in, out] kernel: bank + router (+ null)."""
    return num_experts * rank * (n_in + n_out) + n_in * num_experts + int(null_expert)


def _layer_mask(lead: Sequence[int], layers: Optional[Sequence[int]], path: str) -> jax.Array:
    """1.0 at the chosen layer indices, 0.0 elsewhere: [L] (a scalar for an unstacked kernel).

    Float rather than bool so that the whole params tree stays differentiable (`jax.grad`).
    """
    if not lead:
        if layers:
            raise ValueError(f"memory target {path!r} is not stacked over layers, so "
                             f"peft.layers={list(layers)} cannot apply; leave layers empty or "
                             "target a weight under layers/")
        return jnp.asarray(1.0, jnp.float32)
    if len(lead) != 1:
        raise ValueError(f"memory target {path!r} has leading dims {tuple(lead)}; only one "
                         "stacked layer axis is supported (not stacked MoE experts)")
    n = lead[0]
    if not layers:
        return jnp.ones((n,), jnp.float32)
    bad = [i for i in layers if not -n <= int(i) < n]
    if bad:
        raise ValueError(f"peft.layers={list(layers)}: {bad} out of range for the {n} stacked "
                         f"layers of {path!r}; use indices in [-{n}, {n})")
    chosen = sorted({int(i) % n for i in layers})
    return jnp.zeros((n,), jnp.float32).at[jnp.asarray(chosen)].set(1.0)


def apply_memory(params: Any, key: jax.Array, *, num_experts: int = 256, top_k: int = 4,
                 rank: int = 4, alpha: float = 8.0,
                 targets: Sequence[str] = DEFAULT_TARGETS,
                 layers: Optional[Sequence[int]] = None, null_expert: bool = True,
                 router_std: float = 1.0) -> Any:
    """Wraps every kernel whose path fully matches a `targets` regex in a MemoryExpertsWeight.

    layers: the stacked layer indices that get memory (None / empty: all). router_std: the
    router is N(0, router_std^2 / in) at chosen layers. Unchosen layers hold an all-zero bank.
    Raises if nothing matches (listing the weight paths) or on impossible sizes.
    """
    num_experts, top_k, rank = int(num_experts), int(top_k), int(rank)
    if rank < 1 or num_experts < 1:
        raise ValueError(f"memory experts need rank >= 1 and num_experts >= 1 (got rank={rank}, "
                         f"num_experts={num_experts})")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"peft.top_k={top_k} must be in [1, num_experts={num_experts}]")
    scale = float(alpha) / rank

    def check(path, w):
        if isinstance(w, StructuredWeight) or w.ndim < 2 or path.endswith("embedding"):
            raise ValueError(f"memory target {path!r} is not a dense kernel (shape "
                             f"{getattr(w, 'shape', None)}); narrow peft.targets")

    def make(path, w, key_i):
        *lead, n_in, n_out = w.shape
        active = _layer_mask(lead, layers, path)
        on = active.reshape(tuple(lead) + (1, 1, 1))
        ka, kr = jax.random.split(key_i)
        bound = 1.0 / math.sqrt(n_in)  # LoRA's A init (torch nn.Linear default)
        a = jax.random.uniform(ka, (*lead, num_experts, n_in, rank), jnp.float32, -bound, bound)
        router = jax.random.normal(kr, (*lead, n_in, num_experts), jnp.float32)
        router = router * (float(router_std) / math.sqrt(n_in))
        return MemoryExpertsWeight(
            base=w, a=a * on, b=jnp.zeros((*lead, num_experts, rank, n_out), jnp.float32),
            router=router * on[..., 0], active=active,
            null_logit=jnp.zeros(tuple(lead), jnp.float32) if null_expert else None,
            top_k=top_k, scale=scale)
    return select_targets(params, targets, make, name="memory", key=key, check=check)


DEFAULTS = dict(
    num_experts=256,           # M memory experts per adapted kernel
    top_k=4,                   # experts mixed per token
    rank=4,                    # r of each expert
    alpha=8.0,                 # scale s = alpha / r
    targets=DEFAULT_TARGETS,   # the MLP down projection
    layers=(),                 # stacked layer indices with memory; empty: all
    null_expert=True,          # a learned "no memory" logit in the gate softmax
    router_std=1.0,            # router ~ N(0, router_std^2 / in)
    train_patterns=(),
)


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """Memory experts from a resolved `peft` section (see configs/memory_tuning.py)."""
    del apply_fn, tokenizer
    transform = functools.partial(
        apply_memory, num_experts=int(s.num_experts), top_k=int(s.top_k), rank=int(s.rank),
        alpha=float(s.alpha), targets=tuple(s.targets),
        layers=tuple(int(i) for i in (s.layers or ())), null_expert=bool(s.null_expert),
        router_std=float(s.router_std))
    return Method(name="memory", transform=transform, train_patterns=tuple(s.train_patterns),
                  mergeable=False)


CHECKS = dict(num_experts=">= 1", top_k=">= 1", rank=">= 1", alpha="> 0", router_std=">= 0")

register("memory", DEFAULTS, method, CHECKS)
