"""LOMO-style fused update (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language
Models with Limited Resources"): SGD applied to each layer during the backward pass, so the
full gradient tree never exists and there is no optimizer state.

For the ftjax transformer (stacked layers under params["layers"]) with the SFT objective
(mean next-token cross-entropy over the masked tokens, optional z-loss):

  1. forward: embeddings, then a scan over the layers that keeps only each layer's *input*
     [L, B, T, D] (what `remat="full"` keeps), then the final norm;
  2. the head: loss and its gradient w.r.t. (final_norm, head, last hidden); the final norm
     and head are updated at once;
  3. backward: a reverse scan over the layers carrying (the stacked layer params, dh). Step i
     recomputes layer i from its saved input (`jax.vjp`), gets that layer's param gradient
     and dh for the layer below, and writes p_i - lr * g_i into the carried stack in place
     (dynamic_update_slice on the donated buffer). Only one layer's gradient is alive;
  4. the embedding gets its gradient from dh_0 and is updated.

The result equals one plain SGD step on the full gradient (same lr, no clipping): every
gradient is taken at the old params (layer i's gradient depends on the layers above only
through dh, computed with their old values; the gather's gradient does not depend on the
table, so a tied embedding updated twice is updated by the sum). What is fused: the update of
every layer, the final norm and the head; what is not: the embedding table's gradient is one
dense [V, D] buffer (as in the first-order step), and the layer inputs are saved for the
backward like `remat="full"` (each layer is recomputed once). Not supported, refused: MoE
layers, structured weights (full fine-tuning only), gradient clipping (LOMO's clipping needs
a second backward pass) and accumulation. The logged grad_norm is exact, except with tied
embeddings, where the table's head and lookup gradients count as two blocks (the sum is never
formed).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.models.transformer import _block
from ftjax.peft.core import embed, is_structured
from ftjax.train.losses import head_cross_entropy
from ftjax.train.step import head_chunks


def check_supported(params: Any, cfg: ModelConfig) -> None:
    """Raises (naming what to change) for models and params LOMO does not handle."""
    if cfg.num_experts > 0:
        raise ValueError("LOMO: MoE models (model.num_experts > 0) are not supported; use a "
                         "first-order optimizer")
    if any(is_structured(x) for x in jax.tree.leaves(params, is_leaf=is_structured)):
        raise ValueError("LOMO is full fine-tuning of plain params; this tree has structured "
                         "weights (a PEFT transform): use peft.method=full")
    for x in jax.tree.leaves(params["layers"]):
        if x.ndim < 1 or x.shape[0] != cfg.num_layers:
            raise ValueError(f"LOMO needs the layers stacked on a leading axis of "
                             f"{cfg.num_layers}; got a leaf of shape {x.shape}")


def _sgd(p, g, lr):
    return jax.tree.map(lambda x, d: (x - lr * d).astype(x.dtype), p, g)


def _sq(tree):
    return sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)),
               jnp.zeros((), jnp.float32))


def lomo_update(params: dict, batch: dict, cfg: ModelConfig, lr, *, z_loss: float = 0.0):
    """One fused SGD step. Returns (params, metrics with loss, tokens, grad_norm)."""
    check_supported(params, cfg)
    tokens = batch["inputs"]
    b, t = tokens.shape
    dt = jnp.dtype(cfg.dtype)
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    slots = jnp.arange(t, dtype=jnp.int32)
    mask = layers.mask_bias(layers.attention_mask(slots, slots, segment_ids, segment_ids, cfg))
    n_tok = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    # 1. Embeddings (their VJP keeps only the ids) and the forward over the layers.
    emb_keys = ["embed"] + (["pos_embed"] if cfg.position == "learned" else [])

    def embed_fn(ep):
        h = embed(tokens, ep["embed"]["embedding"], dt)
        if cfg.embed_scale:
            h = h * jnp.asarray(cfg.hidden_size ** 0.5, dt)
        if cfg.position == "learned":
            h = h + embed(positions, ep["pos_embed"]["embedding"], dt)
        return h

    h0, embed_vjp = jax.vjp(embed_fn, {k: params[k] for k in emb_keys})

    def block(lp, h):
        return _block(lp, h, positions, mask, cfg, None, 0, segment_ids, None)[0]

    h_last, inputs = jax.lax.scan(lambda h, lp: (block(lp, h), h), h0, params["layers"])

    # 2. The head: loss, its gradient, and the update of the final norm and the head.
    head_key = "embed" if cfg.tie_embeddings else "lm_head"
    head_w = params["embed"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"]

    def head_loss(hp, h):
        x = layers.norm(hp["final_norm"], h, cfg)
        s = head_cross_entropy(x, hp["w"], batch["targets"], batch["loss_mask"],
                               tied=cfg.tie_embeddings, z_loss=z_loss,
                               chunks=head_chunks(x.shape, cfg))
        return s["objective"] / n_tok, s

    hp = {"final_norm": params["final_norm"], "w": head_w}
    (_, stats), (g_head, dh) = jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)(
        hp, h_last)
    sq = _sq(g_head)
    hp = _sgd(hp, g_head, lr)
    out = dict(params, final_norm=hp["final_norm"])
    if cfg.tie_embeddings:
        out["embed"] = {**params["embed"], "embedding": hp["w"]}
    else:
        out[head_key] = {**params[head_key], "kernel": hp["w"]}

    # 3. Backward over the layers, top to bottom, updating each layer in the carried stack.
    def back(carry, i):
        stack, dh, sq = carry
        lp = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stack)
        _, vjp = jax.vjp(block, lp, inputs[i])
        g, dh = vjp(dh)
        new = _sgd(lp, g, lr)
        stack = jax.tree.map(lambda x, n: jax.lax.dynamic_update_index_in_dim(x, n, i, 0),
                             stack, new)
        return (stack, dh, sq + _sq(g)), None

    (stack, dh0, sq), _ = jax.lax.scan(back, (params["layers"], dh, sq),
                                       jnp.arange(cfg.num_layers - 1, -1, -1))
    out["layers"] = stack

    # 4. The embeddings (a tied table already took its head step: gradients add).
    (g_emb,) = embed_vjp(dh0)
    for k in emb_keys:
        out[k] = _sgd(out[k], g_emb[k], lr)
    sq = sq + _sq(g_emb)
    metrics = {"loss": stats["nll"] / n_tok, "tokens": stats["tokens"],
               "grad_norm": jnp.sqrt(sq)}
    return out, metrics


def make_lomo_step(cfg: ModelConfig, *, learning_rate: Optional[float] = None,
                   schedule: Optional[Callable] = None, z_loss: float = 0.0):
    """`(params, batch, step) -> (params, metrics)`, to be jitted with donate_argnums=0."""
    if (learning_rate is None) == (schedule is None):
        raise ValueError("make_lomo_step: give exactly one of learning_rate and schedule")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"LOMO learning_rate={learning_rate} must be > 0")
    sched = schedule or (lambda _: learning_rate)

    def step_fn(params, batch, step):
        lr = sched(step)
        params, m = lomo_update(params, batch, cfg, lr, z_loss=z_loss)
        m["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return params, m

    return step_fn
