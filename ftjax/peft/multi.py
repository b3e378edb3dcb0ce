"""Several LoRA adapters over one base: per-row selection in one batch, and combination.

Serving: `stack_adapters([lora_params_0, .., lora_params_{N-1}])` turns every adapted weight into
a `MultiLoRAWeight(base, a [.., N, in, r], b [.., N, r, out], scales)`. The adapter axis N sits
right after the base's leading (stacked-layer) dims, so `lax.scan` over layers slices the layer
axis as for any other weight. `multi_apply(params, cfg, tokens, adapter_ids=[B], base_apply=...)`
binds the per-row adapter ids into the weights (an `ids` field broadcast over the layer dims, so
scan slices it too) and runs the model's apply function it wraps (`base_apply`); each weight then gathers its rows' factors and applies
them with a per-row batched einsum. Id -1 selects no adapter (the base). Adapters may differ in
rank (zero-padded to the largest, which leaves their products unchanged), scale and targets (a
weight one adapter does not adapt gets zero factors there).

Combination into one LoRA (`combine_adapters`), for a weighted sum  sum_i w_i s_i A_i B_i:
  "cat"     concatenation: a = [A_1 .. A_N], b = [w_1 s_1 B_1; ..], rank r_1+..+r_N, exact.
  "linear"  the weighted sum re-factored by SVD at rank `rank` (default r_1+..+r_N, where the
            product equals the weighted sum exactly; smaller ranks truncate).
  "svd"     the same SVD, truncated to a target `rank` (default max r_i).
The SVD works on the factors (QR of the concatenated A's and B's, then an SVD of an R x R core),
never on a dense [in, out] matrix. Each call also returns, per weight, the relative Frobenius
error ||dW - dW_k|| / ||dW|| of the truncation (0 for exact combinations).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft.core import StructuredWeight, embed, linear, map_weights, unwrap
from ftjax.peft.lora import RANK_AXIS, LoRAWeight

ModelConfig = Any  # ftjax.models.ModelConfig (peft does not import the model)

COMBINATIONS = ("linear", "cat", "svd")


@flax.struct.dataclass
class MultiLoRAWeight(StructuredWeight):
    """N LoRA adapters over one frozen base; `ids` selects one per batch row (see module doc).

    a [*lead, N, in, r], b [*lead, N, r, out]; ids [*lead, B] int (None until bound);
    scales: one LoRA scale per adapter.
    """
    base: Any
    a: jax.Array
    b: jax.Array
    ids: Optional[jax.Array] = None
    scales: tuple = flax.struct.field(pytree_node=False, default=())

    @property
    def num_adapters(self) -> int:
        return int(self.a.shape[-3])

    @property
    def shape(self):
        return tuple(self.base.shape)

    def _rows(self):
        """(a [B, in, r], b [B, r, out], scale [B]) of each row's adapter."""
        if self.ids is None:
            raise ValueError("MultiLoRAWeight has no adapter ids bound: run the model through "
                             "ftjax.peft.multi.multi_apply(..., adapter_ids=[B])")
        if self.a.ndim != 3 or self.ids.ndim != 1:
            raise ValueError(f"MultiLoRAWeight used with leading dims still attached (a "
                             f"{self.a.shape}, ids {self.ids.shape}); slice the layer axis first")
        idx = jnp.clip(self.ids, 0, self.num_adapters - 1)
        scale = jnp.asarray(self.scales, jnp.float32)[idx] * (self.ids >= 0)
        return jnp.take(self.a, idx, axis=0), jnp.take(self.b, idx, axis=0), scale

    def matmul(self, x):
        dt = x.dtype
        a, b, scale = self._rows()
        if x.shape[0] != a.shape[0]:
            raise ValueError(f"input has {x.shape[0]} rows but {a.shape[0]} adapter ids are bound")
        h = jnp.einsum("b...i,bir->b...r", x, a.astype(dt))
        delta = jnp.einsum("b...r,bro->b...o", h, b.astype(dt))
        scale = scale.reshape((-1,) + (1,) * (delta.ndim - 1)).astype(dt)
        return linear(x, self.base, dt) + scale * delta

    def lookup(self, ids):
        out = embed(ids, self.base)
        if self.ids is None or self.ids.ndim != 1:
            self._rows()  # raises with the explanation
        idx = jnp.clip(self.ids, 0, self.num_adapters - 1)
        rows = self.a[idx[:, None], ids]                                   # [B, T, r]
        scale = jnp.asarray(self.scales, jnp.float32)[idx] * (self.ids >= 0)
        delta = jnp.einsum("btr,brd->btd", rows, jnp.take(self.b, idx, axis=0))
        return out + (scale[:, None, None] * delta).astype(out.dtype)

    def materialize(self):
        raise ValueError("a MultiLoRAWeight holds several adapters; pick one with "
                         "select_adapter(params, i) or merge them with combine_adapters")

    def trainable_fields(self):
        return ("a", "b")

    def frozen_base(self):
        return unwrap(self.base)

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = base_axes[:-2], base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "a": lead + (None, ax_in, RANK_AXIS),
                "b": lead + (None, RANK_AXIS, ax_out),
                "ids": None if self.ids is None else lead + (None,)}


# ------------------------------------------------------------------------------------------
# Walking several adapter trees in step
# ------------------------------------------------------------------------------------------

def _flat(tree) -> dict[str, Any]:
    out = {}
    map_weights(lambda p, w: out.__setitem__(p, w), tree)
    return out


def _rebuild(template, values: dict[str, Any]):
    return map_weights(lambda p, _: values[p], template)


def _as_template(tree):
    """The tree with every LoRAWeight replaced by its base (a leaf per weight path)."""
    return map_weights(lambda _, w: w.base if isinstance(w, LoRAWeight) else w, tree)


def _check_same_paths(adapters: Sequence[Any]) -> list[dict[str, Any]]:
    if not adapters:
        raise ValueError("need at least one adapter")
    flats = [_flat(t) for t in adapters]
    paths = set(flats[0])
    for i, f in enumerate(flats[1:], 1):
        if set(f) != paths:
            raise ValueError(f"adapter {i} has weight paths {sorted(set(f) ^ paths)} that "
                             "adapter 0 lacks (or vice versa); all must share one base model")
    return flats


def _base_of(path: str, leaves: Sequence[Any]):
    bases = [w.base if isinstance(w, LoRAWeight) else w for w in leaves]
    for i, b in enumerate(bases[1:], 1):
        if tuple(b.shape) != tuple(bases[0].shape):
            raise ValueError(f"{path}: adapter {i}'s base has shape {tuple(b.shape)}, adapter "
                             f"0's {tuple(bases[0].shape)}; adapters must share one base")
    return bases[0]


def _pad_rank(x: jax.Array, r: int, axis: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, r - x.shape[axis])
    return jnp.pad(x, pad)


def _factors(w, base) -> tuple[jax.Array, jax.Array, float]:
    """(a, b, scale) of a LoRAWeight, or rank-0 factors for an un-adapted weight."""
    if isinstance(w, LoRAWeight):
        return w.a, w.b, float(w.scale)
    *lead, n_in, n_out = base.shape
    return (jnp.zeros((*lead, n_in, 0), jnp.float32), jnp.zeros((*lead, 0, n_out), jnp.float32),
            0.0)


# ------------------------------------------------------------------------------------------
# Serving several adapters at once
# ------------------------------------------------------------------------------------------

def stack_adapters(adapters: Sequence[Any]) -> Any:
    """LoRA param trees over one base -> one tree of MultiLoRAWeights (adapter i = index i)."""
    flats = _check_same_paths(adapters)
    values = {}
    for path in flats[0]:
        leaves = [f[path] for f in flats]
        if not any(isinstance(w, LoRAWeight) for w in leaves):
            values[path] = leaves[0]
            continue
        base = _base_of(path, leaves)
        facs = [_factors(w, base) for w in leaves]
        r = max(max(a.shape[-1] for a, _, _ in facs), 1)
        a = jnp.stack([_pad_rank(a, r, -1) for a, _, _ in facs], axis=-3)
        b = jnp.stack([_pad_rank(b, r, -2) for _, b, _ in facs], axis=-3)
        values[path] = MultiLoRAWeight(base=base, a=a, b=b, ids=None,
                                       scales=tuple(s for _, _, s in facs))
    return _rebuild(_as_template(adapters[0]), values)


def bind_adapters(params: Any, adapter_ids: jax.Array) -> Any:
    """Every MultiLoRAWeight with `ids` = adapter_ids [B], broadcast over its leading dims."""
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    if adapter_ids.ndim != 1:
        raise ValueError(f"adapter_ids must be [batch], got shape {adapter_ids.shape}")

    def one(_, w):
        if not isinstance(w, MultiLoRAWeight):
            return w
        lead = w.a.shape[:-3]
        return w.replace(ids=jnp.broadcast_to(adapter_ids, lead + adapter_ids.shape))
    return map_weights(one, params)


def multi_apply(params: Any, cfg: ModelConfig, tokens: jax.Array, *,
                base_apply: Callable[..., Any], adapter_ids: Optional[jax.Array] = None, **kw):
    """`base_apply` (the model's apply, e.g. `ftjax.models.apply`) where row b uses adapter
    adapter_ids[b] (-1: the base alone). Bind base_apply (and adapter_ids) with
    `functools.partial` to get an apply function for generation."""
    if adapter_ids is None:
        raise ValueError("multi_apply needs adapter_ids [batch] (one adapter index per row)")
    if jnp.shape(adapter_ids) != tokens.shape[:1]:
        raise ValueError(f"adapter_ids has shape {jnp.shape(adapter_ids)}, tokens "
                         f"{tokens.shape}: one adapter id per row")
    return base_apply(bind_adapters(params, adapter_ids), cfg, tokens, **kw)


def select_adapter(params: Any, index: int) -> Any:
    """The plain LoRA tree of adapter `index` from a stacked tree."""
    def one(_, w):
        if not isinstance(w, MultiLoRAWeight):
            return w
        return LoRAWeight(base=w.base, a=w.a[..., index, :, :], b=w.b[..., index, :, :],
                          scale=w.scales[index])
    return map_weights(one, params)


# ------------------------------------------------------------------------------------------
# Combining several adapters into one
# ------------------------------------------------------------------------------------------

def _svd_factors(a: jax.Array, b: jax.Array, rank: int):
    """Top-`rank` SVD factors of a @ b (a [.., in, R], b [.., R, out]) without forming it.

    a = Qa Ra, b^T = Qb Rb  =>  a b = Qa (Ra Rb^T) Qb^T;  Ra Rb^T = U S V^T (small).
    Returns (a_k, b_k, squared singular values [.., k_all]).
    """
    qa, ra = jnp.linalg.qr(a.astype(jnp.float32))
    qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2).astype(jnp.float32))
    u, s, vt = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2), full_matrices=False)
    k = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    a_k = (qa @ u[..., :, :k]) * root[..., None, :]
    b_k = root[..., :, None] * (vt[..., :k, :] @ jnp.swapaxes(qb, -1, -2))
    if k < rank:  # keep the requested rank (zero directions) so every weight has one shape
        a_k, b_k = _pad_rank(a_k, rank, -1), _pad_rank(b_k, rank, -2)
    return a_k, b_k, s * s


def combine_adapters(adapters: Sequence[Any], weights: Optional[Sequence[float]] = None, *,
                     how: str = "linear", rank: Optional[int] = None
                     ) -> tuple[Any, dict[str, float]]:
    """One LoRA tree (scale 1) for sum_i weights[i] * dW_i, and {path: relative error}.

    how: "cat", "linear" or "svd" (see module doc); rank: the new rank for "linear"/"svd".
    """
    if how not in COMBINATIONS:
        raise ValueError(f"unknown combination {how!r}; choose one of {COMBINATIONS}")
    flats = _check_same_paths(adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    values, errors = {}, {}
    for path in flats[0]:
        leaves = [f[path] for f in flats]
        if not any(isinstance(w, LoRAWeight) for w in leaves):
            values[path] = leaves[0]
            continue
        if any(isinstance(w, LoRAWeight) and path.endswith("embedding") for w in leaves):
            raise ValueError(f"{path}: combining embedding adapters is not supported")
        base = _base_of(path, leaves)
        facs = [_factors(w, base) for w in leaves]
        a_cat = jnp.concatenate([a.astype(jnp.float32) for a, _, _ in facs], axis=-1)
        b_cat = jnp.concatenate([(wt * s) * b.astype(jnp.float32)
                                 for (_, b, s), wt in zip(facs, weights)], axis=-2)
        if how == "cat":
            a_new, b_new, err = a_cat, b_cat, 0.0
        else:
            total = a_cat.shape[-1]
            default = total if how == "linear" else max(a.shape[-1] for a, _, _ in facs)
            r = int(rank or default)
            a_new, b_new, s2 = _svd_factors(a_cat, b_cat, r)
            kept = float(jnp.sum(s2[..., :r]))
            whole = float(jnp.sum(s2))
            err = float(np.sqrt(max(whole - kept, 0.0) / whole)) if whole > 0 else 0.0
        values[path] = LoRAWeight(base=base, a=a_new, b=b_new, scale=1.0)
        errors[path] = err
    return _rebuild(_as_template(adapters[0]), values), errors
