"""The decoder-only transformer: `init`, `apply`, `param_axes`, `init_cache`.

Params are a plain nested dict. Layer weights are stacked on a leading "layers" axis and run
with `lax.scan` (or a Python loop when `cfg.scan_layers` is False; both read the same params).
Shapes, logical axes and initialisers all come from one table, `param_specs`, so they cannot
drift apart.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from ftjax.models import layers, moe
from ftjax.models.config import ModelConfig
from ftjax.peft.core import DENSE_NAME, attend, embed, linear

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Shape, logical axes and initialiser of one param leaf."""
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    init: str  # "normal" | "zeros" | "ones"


def param_specs(cfg: ModelConfig) -> dict:
    """The param tree as Specs. Layer leaves carry the leading (num_layers, "layers") dim."""
    d, L = cfg.hidden_size, cfg.num_layers
    norm_init = "zeros" if cfg.norm_offset else "ones"

    def norm_spec(width, axis, stacked=True):
        lead, lead_ax = ((L,), ("layers",)) if stacked else ((), ())
        s = {"scale": Spec(lead + (width,), lead_ax + (axis,), norm_init)}
        if cfg.norm_bias:
            s["bias"] = Spec(lead + (width,), lead_ax + (axis,), "zeros")
        return s

    def dense(n_in, n_out, ax_in, ax_out, bias):
        s = {"kernel": Spec((L, n_in, n_out), ("layers", ax_in, ax_out), "normal")}
        if bias:
            s["bias"] = Spec((L, n_out), ("layers", ax_out), "zeros")
        return s

    attn = {
        "q_proj": dense(d, cfg.q_size, "embed", "heads", cfg.qkv_bias),
        "k_proj": dense(d, cfg.kv_size, "embed", "kv_heads", cfg.qkv_bias),
        "v_proj": dense(d, cfg.kv_size, "embed", "kv_heads", cfg.qkv_bias),
        "o_proj": dense(cfg.q_size, d, "heads", "embed", cfg.o_bias),
    }
    if cfg.qk_norm:
        attn["q_norm"] = norm_spec(cfg.dim_per_head, None)
        attn["k_norm"] = norm_spec(cfg.dim_per_head, None)
    def mlp_specs(width):
        m = {"up_proj": dense(d, width, "embed", "mlp", cfg.mlp_bias),
             "down_proj": dense(width, d, "mlp", "embed", cfg.mlp_bias)}
        if cfg.mlp == "gated":
            m["gate_proj"] = dense(d, width, "embed", "mlp", cfg.mlp_bias)
        return m

    block = {"attn_norm": norm_spec(d, "embed"), "attn": attn, "mlp_norm": norm_spec(d, "embed")}
    if cfg.num_experts > 0:
        block["moe"] = moe_specs(cfg, mlp_specs)
    else:
        block["mlp"] = mlp_specs(cfg.intermediate_size)

    specs = {
        "embed": {"embedding": Spec((cfg.vocab_size, d), ("vocab", "embed"), "normal")},
        "layers": block,
        "final_norm": norm_spec(d, "embed", stacked=False),
    }
    if cfg.position == "learned":
        specs["pos_embed"] = {"embedding": Spec((cfg.max_position_embeddings, d),
                                                (None, "embed"), "normal")}
    if not cfg.tie_embeddings:
        specs["lm_head"] = {"kernel": Spec((d, cfg.vocab_size), ("embed", "vocab"), "normal")}
    return specs


def moe_specs(cfg: ModelConfig, mlp_specs) -> dict:
    """The `layers/moe` subtree: router [L, d, E], stacked experts [L, E, in, out], and the
    shared experts as one dense MLP of width num_shared_experts * expert width."""
    d, L, E, f = cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.expert_width

    def expert(n_in, n_out, ax_in, ax_out):
        return {"kernel": Spec((L, E, n_in, n_out), ("layers", "expert", ax_in, ax_out), "normal")}

    s = {"router": {"kernel": Spec((L, d, E), ("layers", "embed", None), "normal")},
         "up_proj": expert(d, f, "embed", "mlp"),
         "down_proj": expert(f, d, "mlp", "embed")}
    if cfg.mlp == "gated":
        s["gate_proj"] = expert(d, f, "embed", "mlp")
    if cfg.num_shared_experts > 0:
        s["shared"] = mlp_specs(cfg.num_shared_experts * f)
    return s


def _is_spec(x) -> bool:
    return isinstance(x, Spec)


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every param leaf (same tree structure as `init`)."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict:
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg),
                        is_leaf=_is_spec)


def init(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random initial params: N(0, init_std) matrices, zero biases, unit norm scales."""
    return _init_jit(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(cfg: ModelConfig, key: jax.Array) -> Params:
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)

    def make(spec: Spec, k):
        if spec.init == "normal":
            return (cfg.init_std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        fill = jnp.zeros if spec.init == "zeros" else jnp.ones
        return fill(spec.shape, dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def count_params(params: Params) -> int:
    from ftjax.peft.core import materialize, is_structured
    leaves = jax.tree.leaves(params, is_leaf=is_structured)
    return int(sum(materialize(x).size if is_structured(x) else x.size for x in leaves))


def unstack_layers(params: Params, cache: Optional[dict], cfg: ModelConfig
                   ) -> Optional[tuple[Params, Optional[dict]]]:
    """(params, cache) with the stacked layers split into per-layer lists, which `apply`
    runs one after another; None when some leaf under "layers" is not stacked over layers.
    Used by decoding: done once before the decode loop, it costs one copy of the weights."""
    leaves = jax.tree.leaves(params["layers"])
    if not leaves or any(getattr(x, "ndim", 0) < 1 or x.shape[0] != cfg.num_layers
                         for x in leaves):
        return None
    n = cfg.num_layers
    split = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n)]
    out_cache = None
    if cache is not None:
        out_cache = {**cache, "k": [cache["k"][i] for i in range(n)],
                     "v": [cache["v"][i] for i in range(n)]}
    return {**params, "layers": split}, out_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, *,
               per_row: bool = False) -> dict:
    """An empty KV cache for `max_len` slots: per-layer k/v, slot segment ids, fill index.

    per_row: the fill index is [batch] (each row writes at its own offset, as a continuous
    batcher's decode slots do) instead of one scalar for all rows."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((batch,) if per_row else (), jnp.int32)}


_CP = jax.checkpoint_policies
_DENSE = _CP.save_only_these_names(DENSE_NAME)  # peft.core.dense products (custom VJPs)
_REMAT = {
    "full": _CP.nothing_saveable,
    "dots": _CP.save_from_both_policies(_CP.checkpoint_dots, _DENSE),
    "dots_no_batch": _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable, _DENSE),
    "save_attn_out": _CP.save_only_these_names("attn_out"),
}


def _block(lp: Params, h: jax.Array, positions, mask, cfg: ModelConfig, layer_cache, index,
           segment_ids, rng):
    """One pre-norm decoder block; returns (h, (new layer cache, MoE layer stats or None))."""
    valid = segment_ids != 0
    a, new_cache = layers.attention(lp["attn"], layers.norm(lp["attn_norm"], h, cfg), positions,
                                    mask, cfg, layer_cache, index, segment_ids=segment_ids)
    a = checkpoint_name(a, "attn_out")
    h = h + a
    x = layers.norm(lp["mlp_norm"], h, cfg)
    if cfg.num_experts > 0:
        y, stats = moe.moe_block(lp["moe"], x, valid, cfg, rng)
    else:
        y, stats = layers.mlp(lp["mlp"], x, cfg), None
    return h + y, (new_cache, stats)


def apply(params: Params, cfg: ModelConfig, tokens: jax.Array, *,
          positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
          cache: Optional[dict] = None, return_hidden: bool = False,
          rng: Optional[jax.Array] = None, compute_logits: bool = True):
    """Forward pass. tokens [B, T] int -> (logits [B, T, V] float32, aux).

    positions: [B, T] position of each token (defaults to 0..T-1, offset by the cache fill).
    segment_ids: [B, T]; tokens attend only within their segment; 0 marks padding.
    cache: from `init_cache`; the new tokens are written at `cache["index"]` (a scalar, or [B]:
      row b at its own offset) and the updated cache is returned in aux["cache"].
    aux also carries "hidden" (final normed hidden states) when `return_hidden`.
    compute_logits=False skips the LM head (logits None): for losses that fuse it
      (`train.losses.head_cross_entropy`), which then read aux["hidden"].
    rng: used only for MoE router jitter (cfg.router_jitter > 0); no jitter without it.
    With cfg.num_experts > 0, aux["moe"] holds per-layer routing losses and metrics over the
    real (segment id != 0) tokens: "aux_loss", "z_loss", "dropped", "entropy" [L] and
    "load" [L, E] (see `moe.routing_stats`).
    """
    b, t = tokens.shape
    dt = jnp.dtype(cfg.dtype)
    offset = cache["index"] if cache is not None else 0
    # A per-row index [B] puts row b's new tokens at its own offset (continuous batching).
    row_offset = offset[:, None] if jnp.ndim(offset) == 1 else offset
    if positions is None:
        positions = jnp.broadcast_to(row_offset + jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)

    if cache is not None and not isinstance(offset, jax.core.Tracer):
        filled = int(np.max(np.asarray(offset)))   # numpy: jnp would trace under an outer jit
        if filled + t > cache["segment_ids"].shape[1]:
            raise ValueError(f"KV cache overflow: {filled} filled + {t} new "
                             f"tokens > {cache['segment_ids'].shape[1]} slots; make the cache "
                             "larger (init_cache)")
    q_slots = row_offset + jnp.arange(t, dtype=jnp.int32)                 # [T] or [B, T]
    if cache is not None:
        k_seg = layers.write_cache(cache["segment_ids"], segment_ids.astype(jnp.int32), offset)
        k_slots = jnp.arange(k_seg.shape[1], dtype=jnp.int32)
    else:
        k_seg, k_slots = segment_ids, q_slots
    mask = layers.mask_bias(layers.attention_mask(q_slots, k_slots, segment_ids, k_seg, cfg))

    h = embed(tokens, params["embed"]["embedding"], dt)
    if cfg.embed_scale:
        h = h * jnp.asarray(cfg.hidden_size ** 0.5, dt)
    if cfg.position == "learned":
        h = h + embed(positions, params["pos_embed"]["embedding"], dt)

    def body(h, xs):
        lp, layer_cache, layer_rng = xs
        return _block(lp, h, positions, mask, cfg, layer_cache, offset, segment_ids, layer_rng)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)

    layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    use_rng = rng is not None and cfg.num_experts > 0 and cfg.router_jitter > 0
    layer_rngs = jax.random.split(rng, cfg.num_layers) if use_rng else None
    if isinstance(params["layers"], (list, tuple)):
        # Per-layer params and caches (`unstack_layers`, for decoding): each layer's weights
        # and KV cache are their own arrays, so a decode loop updates each cache in place and
        # reads weights without slicing them out of the stacked arrays every step.
        outs = []
        for i, lp in enumerate(params["layers"]):
            lc = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
            lr = None if layer_rngs is None else layer_rngs[i]
            h, c = body(h, (lp, lc, lr))
            outs.append(c)
        caches, stats = zip(*outs)
        new_kv = None if cache is None else {"k": [c["k"] for c in caches],
                                             "v": [c["v"] for c in caches]}
        moe_stats = None if stats[0] is None else jax.tree.map(lambda *x: jnp.stack(x), *stats)
    elif cfg.scan_layers:
        h, (new_kv, moe_stats) = jax.lax.scan(body, h, (params["layers"], layer_caches,
                                                        layer_rngs))
    else:
        outs = []
        for i in range(cfg.num_layers):
            xs = jax.tree.map(lambda x: x[i], (params["layers"], layer_caches, layer_rngs))
            h, c = body(h, xs)
            outs.append(c)
        new_kv, moe_stats = jax.tree.map(lambda *x: jnp.stack(x), *outs)

    h = layers.norm(params["final_norm"], h, cfg)
    logits = logits_from_hidden(params, cfg, h) if compute_logits else None
    aux: dict[str, Any] = {}
    if cache is not None:
        aux["cache"] = {"k": new_kv["k"], "v": new_kv["v"], "segment_ids": k_seg,
                        "index": offset + t}
    if return_hidden or not compute_logits:
        aux["hidden"] = h
    if moe_stats is not None:
        aux["moe"] = moe_stats
    return logits, aux


def logits_from_hidden(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """The LM head: final normed hidden states [.., D] -> float32 logits [.., V]
    (aux["hidden"] of `apply`, e.g. for the last prompt token only)."""
    dt = jnp.dtype(cfg.dtype)
    if cfg.tie_embeddings:
        logits = attend(h, params["embed"]["embedding"], dt)
    else:
        logits = linear(h, params["lm_head"]["kernel"], dt)
    return logits.astype(jnp.float32)
