"""Pruning as transforms on the param tree: fixed sparsity masks and structured shrinking.

Unstructured and N:M pruning compute a boolean *keep* mask per targeted kernel
(`magnitude_masks`, `wanda_masks`, `nm_masks`, all keyed by param path, masks shaped like the
kernel, stacked layers included) and `apply_masks` wraps each kernel in a `MaskedWeight`
whose product uses base * mask. Only `base` trains and the mask multiplies inside the
product, so the gradient of every pruned entry is exactly zero: a pruned model fine-tunes
with its mask fixed, and `materialize()` (merge, export) writes zeros in place.

Scores are compared **per output**: ftjax kernels are [in, out], so an output's weights are a
column (a row of the paper's W[out, in]), and each column keeps the same number of inputs.
This is Wanda's comparison group (Sun et al. 2023, "A Simple and Effective Pruning Approach
for LLMs", Sec. 3: score |W_ij| * ||X_j||_2, compared per output), used for magnitude too
so the two differ only in the score; `scope="matrix"` compares over each whole matrix (one per
layer for stacked kernels) instead.

Structured pruning (`prune_structured`) removes whole kv-groups of attention heads and whole
MLP neurons, returning a smaller config and smaller arrays; `structured_masks` gives the
equivalent masks (zeroed o_proj / down_proj rows) on the unpruned model.

Not registered as a PEFT method: a mask is data (Wanda's needs calibration activations), and
the checkpoint rule for frozen non-base fields (a function of seed and shapes) does not hold.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft.core import (StructuredWeight, count_params, is_structured, linear, map_weights,
                             materialize, select_targets)

# The seven attention and MLP projections of a dense decoder (LoRA's default targets).
DEFAULT_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel",
                   r"layers/mlp/(gate|up|down)_proj/kernel")
SCOPES = ("output", "matrix")


@flax.struct.dataclass
class MaskedWeight(StructuredWeight):
    """A trainable base [.., in, out] times a fixed boolean keep-mask of the same shape."""
    base: Any
    mask: jax.Array

    def _masked(self):
        w = materialize(self.base)
        return jnp.where(self.mask, w, jnp.zeros((), w.dtype))

    def matmul(self, x):
        # The mask multiplies inside the product: d(x @ (W*M))/dW = (x^T dy) * M, zero where
        # M is, so optimizer updates never revive a pruned weight (AdamW's weight decay still
        # shrinks it, which materialize() hides by masking again).
        return linear(x, self._masked(), x.dtype)

    def materialize(self):
        return self._masked()

    def trainable_fields(self):
        return ("base",)

    def field_axes(self, base_axes):
        base = base_axes
        if is_structured(self.base):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "mask": tuple(base_axes)}

    def num_params(self) -> int:
        return count_params(self.base)  # the mask is how it is stored, not parameters


# ------------------------------------------------------------------------------------------
# Checks and ranking
# ------------------------------------------------------------------------------------------

def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    s = float(sparsity)
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise ValueError(f"{what}={sparsity!r} must be in [0, 1) (the fraction of weights "
                         "removed; 1 would remove everything)")
    return s


def _kernels(params: Any, targets: Sequence[str], name: str) -> dict[str, Any]:
    """path -> dense kernel [.., in, out] for every target (error if none, or not dense)."""
    found: dict[str, Any] = {}

    def make(path, w, k):
        found[path] = w
        return w
    select_targets(params, targets, make, name=name)
    return found


def _keep_smallest_out(scores: jax.Array, k: int, axis: int) -> jax.Array:
    """Keep-mask that drops the k lowest scores along `axis` (ties: lower index dropped)."""
    if k == 0:
        return jnp.ones(scores.shape, bool)
    order = jnp.argsort(scores, axis=axis, stable=True)
    ranks = jnp.argsort(order, axis=axis, stable=True)
    return ranks >= k


def _masks_from_scores(scores: jax.Array, sparsity: float, scope: str) -> jax.Array:
    if scope == "output":  # per output column: compare the `in` weights feeding it
        return _keep_smallest_out(scores, int(sparsity * scores.shape[-2]), axis=-2)
    if scope == "matrix":  # per [in, out] matrix (per layer for stacked kernels)
        flat = scores.reshape(*scores.shape[:-2], -1)
        keep = _keep_smallest_out(flat, int(sparsity * flat.shape[-1]), axis=-1)
        return keep.reshape(scores.shape)
    raise ValueError(f"scope={scope!r} must be one of {SCOPES}")


def _wanda_scores(path: str, w: jax.Array, activation_norms: Mapping[str, Any]) -> jax.Array:
    if path not in activation_norms:
        raise ValueError(f"Wanda: no activation norms for {path!r} (have "
                         f"{sorted(activation_norms)}); calibrate the same targets")
    norms = jnp.asarray(activation_norms[path], jnp.float32)
    if norms.shape != w.shape[:-1]:
        raise ValueError(f"Wanda: activation norms for {path!r} have shape {norms.shape}, "
                         f"expected {w.shape[:-1]} (the kernel's leading dims and its input)")
    # S_ij = |W_ij| * ||X_j||_2 (Sun et al. 2023, Eq. 1); j is the input row of [in, out].
    return jnp.abs(jnp.asarray(w, jnp.float32)) * norms[..., :, None]


# ------------------------------------------------------------------------------------------
# Unstructured and N:M masks
# ------------------------------------------------------------------------------------------

def magnitude_masks(params: Any, sparsity: float, targets: Sequence[str] = DEFAULT_TARGETS, *,
                    scope: str = "output") -> dict[str, jax.Array]:
    """path -> keep mask removing the `sparsity` fraction of smallest |W| per output column
    (scope="output") or per matrix (scope="matrix"); exactly floor(sparsity * group) per group."""
    s = check_sparsity(sparsity)
    return {p: _masks_from_scores(jnp.abs(jnp.asarray(w, jnp.float32)), s, scope)
            for p, w in _kernels(params, targets, "magnitude pruning").items()}


def wanda_masks(params: Any, activation_norms: Mapping[str, Any], sparsity: float,
                targets: Sequence[str] = DEFAULT_TARGETS, *,
                scope: str = "output") -> dict[str, jax.Array]:
    """path -> keep mask by Wanda's score |W_ij| * ||X_j||_2, compared per output column.

    activation_norms: path -> [.., in] L2 norms of each input feature over the calibration
    tokens (`ftjax.train.calibrate.activation_norms`), stacked like the kernel ([L, in])."""
    s = check_sparsity(sparsity)
    return {p: _masks_from_scores(_wanda_scores(p, w, activation_norms), s, scope)
            for p, w in _kernels(params, targets, "Wanda pruning").items()}


def nm_masks(params: Any, targets: Sequence[str] = DEFAULT_TARGETS, *, n: int = 2, m: int = 4,
             activation_norms: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
    """path -> N:M keep mask: in every group of m consecutive inputs of each output, keep
    the n highest scores (|W|, or Wanda's with `activation_norms`). 2:4 is 50% sparse."""
    n, m = int(n), int(m)
    if not 0 < n <= m:
        raise ValueError(f"N:M pruning needs 0 < n <= m, got n={n}, m={m}")
    out = {}
    for p, w in _kernels(params, targets, f"{n}:{m} pruning").items():
        n_in = w.shape[-2]
        if n_in % m:
            raise ValueError(f"{n}:{m} pruning: m={m} does not divide the input dim {n_in} of "
                             f"{p!r} (shape {tuple(w.shape)}); choose m dividing it or narrow "
                             "the targets")
        scores = (jnp.abs(jnp.asarray(w, jnp.float32)) if activation_norms is None
                  else _wanda_scores(p, w, activation_norms))
        g = scores.reshape(*scores.shape[:-2], n_in // m, m, scores.shape[-1])
        out[p] = _keep_smallest_out(g, m - n, axis=-2).reshape(scores.shape)
    return out


def apply_masks(params: Any, masks: Mapping[str, Any]) -> Any:
    """params with every masked path a MaskedWeight(base, mask) (mask shape == kernel's)."""
    unused = set(masks)

    def one(path, w):
        if path not in masks:
            return w
        unused.discard(path)
        mask = jnp.asarray(masks[path], bool)
        shape = tuple(getattr(w, "shape", ()))
        if mask.shape != shape:
            raise ValueError(f"mask for {path!r} has shape {mask.shape}, the weight {shape}")
        return MaskedWeight(base=w, mask=mask)
    out = map_weights(one, params)
    if unused:
        raise ValueError(f"masks for paths not in params: {sorted(unused)}")
    return out


def sparsity_report(params: Any) -> dict[str, dict]:
    """path -> {"shape", "size", "zeros", "sparsity", "per_layer" (stacked kernels)} for every
    weight with >= 2 dims (MaskedWeights by their materialized weight); plus "total" over all
    MaskedWeights (or all reported matrices when none is masked)."""
    rep: dict[str, dict] = {}
    masked: list[str] = []

    def one(path, w):
        if is_structured(w):
            if isinstance(w, MaskedWeight):
                masked.append(path)
            w = w.materialize()
        if getattr(w, "ndim", 0) < 2:
            return w
        z = np.asarray(w) == 0
        r = {"shape": tuple(z.shape), "size": int(z.size), "zeros": int(z.sum()),
             "sparsity": float(z.mean())}
        if path.startswith("layers/") and z.ndim >= 3:
            r["per_layer"] = [float(x) for x in z.reshape(z.shape[0], -1).mean(-1)]
        rep[path] = r
        return w
    map_weights(one, params)
    over = masked or list(rep)
    size = sum(rep[p]["size"] for p in over)
    zeros = sum(rep[p]["zeros"] for p in over)
    rep["total"] = {"size": size, "zeros": zeros, "sparsity": zeros / size if size else 0.0,
                    "over": "masked" if masked else "all matrices"}
    return rep


# ------------------------------------------------------------------------------------------
# Structured pruning: kv-groups of heads and MLP neurons
# ------------------------------------------------------------------------------------------

def _count(fraction: float, total: int, what: str, field: str) -> int:
    """How many of `total` units a fraction removes; error if it removes them all."""
    if isinstance(fraction, int) and not isinstance(fraction, bool) and fraction >= 1:
        k = fraction  # an integer count
    else:
        k = int(round(check_sparsity(fraction, what) * total))
    if k >= total:
        raise ValueError(f"{what}={fraction!r} removes {k} of {total} {field} per layer; at "
                         "least one must stay")
    return k


def structured_keep(cfg: Any, params: Any, *, heads: float = 0.0, neurons: float = 0.0,
                    activation_norms: Optional[Mapping[str, Any]] = None) -> dict[str, np.ndarray]:
    """{"kv_groups": [L, kept] , "neurons": [L, kept]} indices (ascending) each layer keeps.

    Heads are removed as whole kv-groups (a kv head with its num_heads / num_kv_heads query
    heads), so GQA stays consistent and the KV cache shrinks too; with multi-head attention a
    group is one head. A fraction removes round(fraction * count) per layer, the same in
    every layer (stacked layers share shapes); an int >= 1 is a count. Importance per group:
    sum over its o_proj input rows j of ||W_o[j, :]||_2, weighted by ||X_j||_2 (Wanda-style)
    when `activation_norms` has "layers/attn/o_proj/kernel"; per neuron likewise with down_proj
    (times ||W_up[:, j]|| (and ||W_gate[:, j]||) without norms)."""
    if getattr(cfg, "num_experts", 0) > 0:
        raise ValueError("structured pruning supports dense MLPs only (this model has experts)")
    norms = activation_norms or {}
    lay = params["layers"]
    hd, nkv = cfg.dim_per_head, cfg.num_kv_heads
    g = cfg.num_heads // nkv
    keep: dict[str, np.ndarray] = {}

    def rows_score(kernel_path, w):
        sc = np.linalg.norm(np.asarray(materialize(w), np.float32), axis=-1)  # [L, in]
        if kernel_path in norms:
            sc = sc * np.asarray(norms[kernel_path], np.float32)
        return sc

    k_h = _count(heads, nkv, "heads", "kv-groups")
    o = rows_score("layers/attn/o_proj/kernel", lay["attn"]["o_proj"]["kernel"])   # [L, q_size]
    group_score = o.reshape(o.shape[0], nkv, g * hd).sum(-1)                       # [L, nkv]
    keep["kv_groups"] = np.sort(np.argsort(-group_score, axis=-1, kind="stable")[:, :nkv - k_h],
                                axis=-1)
    mlp = lay["mlp"]
    f = cfg.intermediate_size
    k_n = _count(neurons, f, "neurons", "MLP neurons")
    sc = rows_score("layers/mlp/down_proj/kernel", mlp["down_proj"]["kernel"])     # [L, f]
    if "layers/mlp/down_proj/kernel" not in norms:
        for name in ("up_proj", "gate_proj"):
            if name in mlp:
                sc = sc * np.linalg.norm(np.asarray(materialize(mlp[name]["kernel"]),
                                                    np.float32), axis=-2)
    keep["neurons"] = np.sort(np.argsort(-sc, axis=-1, kind="stable")[:, :f - k_n], axis=-1)
    return keep


def _head_columns(groups: np.ndarray, per_group: int, hd: int) -> np.ndarray:
    """[L, kept * per_group * hd] feature indices of kept groups in a [.., n * per_group * hd]
    axis (heads of a group are contiguous; a head's hd features are contiguous)."""
    base = groups[:, :, None] * per_group * hd + np.arange(per_group * hd)[None, None]
    return base.reshape(groups.shape[0], -1)


def _take(x, idx: np.ndarray, axis: int):
    """Per-layer gather: x [L, ..] along `axis` (counted from the end) with idx [L, k]."""
    x = jnp.asarray(materialize(x))
    shape = [1] * x.ndim
    shape[0] = idx.shape[0]
    shape[axis] = idx.shape[1]
    return jnp.take_along_axis(x, jnp.asarray(idx).reshape(shape), axis=axis)


def prune_structured(cfg: Any, params: Any, *, heads: float = 0.0, neurons: float = 0.0,
                     activation_norms: Optional[Mapping[str, Any]] = None,
                     keep: Optional[Mapping[str, np.ndarray]] = None) -> tuple[Any, Any]:
    """(smaller cfg, smaller params): kv-groups of heads and MLP neurons removed per layer
    (see `structured_keep`; pass `keep` to reuse a selection). Structured weights under the
    pruned projections are materialized. The head dim is pinned (`head_dim`), since
    hidden_size / num_heads would otherwise change it."""
    keep = keep or structured_keep(cfg, params, heads=heads, neurons=neurons,
                                   activation_norms=activation_norms)
    hd, g = cfg.dim_per_head, cfg.num_heads // cfg.num_kv_heads
    kv_groups, neur = np.asarray(keep["kv_groups"]), np.asarray(keep["neurons"])
    q_cols, kv_cols = _head_columns(kv_groups, g, hd), _head_columns(kv_groups, 1, hd)
    lay = dict(params["layers"])
    attn = {k: dict(v) if isinstance(v, dict) else v for k, v in lay["attn"].items()}
    for name, cols in (("q_proj", q_cols), ("k_proj", kv_cols), ("v_proj", kv_cols)):
        attn[name]["kernel"] = _take(attn[name]["kernel"], cols, axis=-1)
        if "bias" in attn[name]:
            attn[name]["bias"] = _take(attn[name]["bias"], cols, axis=-1)
    attn["o_proj"]["kernel"] = _take(attn["o_proj"]["kernel"], q_cols, axis=-2)
    mlp = {k: dict(v) for k, v in lay["mlp"].items()}
    for name in ("up_proj", "gate_proj"):
        if name in mlp:
            mlp[name]["kernel"] = _take(mlp[name]["kernel"], neur, axis=-1)
            if "bias" in mlp[name]:
                mlp[name]["bias"] = _take(mlp[name]["bias"], neur, axis=-1)
    mlp["down_proj"]["kernel"] = _take(mlp["down_proj"]["kernel"], neur, axis=-2)
    lay["attn"], lay["mlp"] = attn, mlp
    n_kv = kv_groups.shape[1]
    new_cfg = dataclasses.replace(cfg, num_kv_heads=n_kv, num_heads=n_kv * g, head_dim=hd,
                                  intermediate_size=neur.shape[1])
    return new_cfg, {**params, "layers": lay}


def structured_masks(cfg: Any, params: Any, keep: Mapping[str, np.ndarray]
                     ) -> dict[str, jax.Array]:
    """Masks on the unpruned model equivalent to `prune_structured(.., keep=keep)`: the o_proj
    rows of removed heads and the down_proj rows of removed neurons zeroed (their outputs
    then contribute nothing, which is what removing them does)."""
    hd, g = cfg.dim_per_head, cfg.num_heads // cfg.num_kv_heads
    lay = params["layers"]
    out = {}
    for path, w, idx in (
            ("layers/attn/o_proj/kernel", lay["attn"]["o_proj"]["kernel"],
             _head_columns(np.asarray(keep["kv_groups"]), g, hd)),
            ("layers/mlp/down_proj/kernel", lay["mlp"]["down_proj"]["kernel"],
             np.asarray(keep["neurons"]))):
        n_layers, n_in, n_out = w.shape
        rows = np.zeros((n_layers, n_in), bool)
        np.put_along_axis(rows, idx, True, axis=-1)
        out[path] = jnp.broadcast_to(jnp.asarray(rows)[..., None], (n_layers, n_in, n_out))
    return out
