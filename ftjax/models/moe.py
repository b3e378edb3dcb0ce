"""Sparse mixture-of-experts MLP: router, dropless and capacity dispatch, shared experts, losses.

Each token picks `k = cfg.num_experts_per_tok` of `E = cfg.num_experts` expert MLPs; its output
is the router-weighted sum of theirs (plus always-on shared experts). Expert weights are
stacked [E, in, out] and multiplied through `ftjax.peft.core.expert_linear`, so LoRA, DoRA and
quantized bases work on experts exactly as on dense kernels.

Dispatch (see docs/moe.md):
  dropless  the N*k (token, expert) assignments are grouped by expert and multiplied with one
            grouped product per weight; nothing is ever dropped. `moe_grouped_impl` picks the
            product: `jax.lax.ragged_dot` on group sizes, or (CPU default) expert blocks, each
            expert's rows padded to whole blocks and one batched matmul of every block with
            its expert's weight, so the work is ~ the assigned rows, not E times them.
  capacity  every expert has C = ceil(capacity_factor * T * k / E) slots per sequence of T
            tokens (capped at T); first choices claim slots before second choices, each in
            token order, and assignments beyond C are dropped (the token keeps its residual).
            Tokens move with one-hot dispatch/combine einsums (GShard, Lepikhin et al. 2020)
            into [E, B*C, d] buffers, which shard over an "expert" mesh axis.
Padding tokens (segment id 0) get no expert output, take no capacity and are left out of every
loss and metric.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.models.config import ModelConfig
from ftjax.peft.core import ExpertBlocks, expert_linear, linear

Params = dict[str, Any]


class Routing(NamedTuple):
    """Router output for N tokens: chosen experts and weights, and what the losses need."""
    indices: jax.Array  # [N, k] int32, the chosen experts (distinct per token)
    weights: jax.Array  # [N, k] float32, their combination weights
    probs: jax.Array    # [N, E] float32, softmax over all experts
    logits: jax.Array   # [N, E] float32


def route(router_kernel: Any, x: jax.Array, cfg: ModelConfig,
          rng: Optional[jax.Array] = None) -> Routing:
    """Top-k routing of x [N, d], in float32.

    topk_softmax (Mixtral): softmax over the k largest logits. softmax_topk: the k largest of
    the softmax over all E (optionally renormalised to sum to 1). With `rng` and
    cfg.router_jitter = eps > 0 the router input is multiplied by U(1 - eps, 1 + eps) noise
    (Switch Transformer, Fedus et al. 2021); the experts see the clean input.
    """
    x = x.astype(jnp.float32)
    if rng is not None and cfg.router_jitter > 0:
        eps = cfg.router_jitter
        x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    logits = linear(x, router_kernel, jnp.float32).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    k = cfg.num_experts_per_tok
    if cfg.router == "topk_softmax":
        top, indices = jax.lax.top_k(logits, k)
        weights = jax.nn.softmax(top, axis=-1)
    else:
        weights, indices = jax.lax.top_k(probs, k)
        if cfg.router_renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(indices.astype(jnp.int32), weights, probs, logits)


def expert_ffn(p: Params, x: jax.Array, cfg: ModelConfig, group_sizes: Any = None) -> jax.Array:
    """The expert MLPs on x [N, d] sorted by expert (ragged: group sizes [E]; or in expert
    blocks: ExpertBlocks) or [E, C, d] (batched: None)."""
    dt = x.dtype

    def proj(name, h):
        return expert_linear(h, p[name]["kernel"], group_sizes, dt)

    if cfg.mlp == "gated":
        h = layers.activation(proj("gate_proj", x), cfg.activation) * proj("up_proj", x)
    else:
        h = layers.activation(proj("up_proj", x), cfg.activation)
    return proj("down_proj", h)


def grouped_impl(cfg: ModelConfig) -> str:
    """The dropless expert product: cfg.moe_grouped_impl, with "auto" resolved to "blocks" on
    CPU (XLA's generic `ragged_dot` lowering computes all E experts over every row there) and
    to "ragged_dot" on other backends (native grouped GEMMs)."""
    if cfg.moe_grouped_impl != "auto":
        return cfg.moe_grouped_impl
    return "blocks" if jax.default_backend() == "cpu" else "ragged_dot"


def block_size(cfg: ModelConfig, rows: int) -> int:
    """Rows per expert block for `rows` assignments: cfg.moe_block_size, or for small batches
    the power of two >= rows / E (so a decode step does not pad every expert to a full block)."""
    per_expert = -(-rows // cfg.num_experts)
    return max(1, min(cfg.moe_block_size, 1 << (per_expert - 1).bit_length()))


def block_layout(flat: jax.Array, num_experts: int, block: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Places R assignments (expert ids `flat` [R]) in expert blocks of `block` rows.

    Each expert's assignments (in their order in `flat`) fill ceil(count / block) consecutive
    blocks, experts in order, the rest of their last block zero rows. The number of blocks is
    static: ceil(R / block) + E bounds sum_e ceil(count_e / block); unused blocks at the end
    are zero rows too. Returns (position [R] of each assignment's row, source [P] = the
    assignment in each of the P = n_blocks * block rows or R for a zero row, block_expert
    [n_blocks]).
    """
    r = flat.shape[0]
    n_blocks = -(-r // block) + num_experts
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    padded = -(-counts // block) * block
    start = jnp.cumsum(padded) - padded                                  # [E] first padded row
    hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)             # [R, E]
    rank = jnp.sum((jnp.cumsum(hot, axis=0) - 1) * hot, axis=-1)        # index within expert
    position = (start[flat] + rank).astype(jnp.int32)
    source = jnp.full((n_blocks * block,), r, jnp.int32).at[position].set(
        jnp.arange(r, dtype=jnp.int32), unique_indices=True)
    ends = jnp.cumsum(padded)
    block_expert = jnp.searchsorted(ends, jnp.arange(n_blocks, dtype=jnp.int32) * block,
                                    side="right")
    return position, source, jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)


def dropless(p: Params, x: jax.Array, r: Routing, valid: jax.Array,
             cfg: ModelConfig) -> jax.Array:
    """Every assignment computed: x [N, d] -> [N, d], rows grouped by expert for one grouped
    product per weight (`ragged_dot` on group sizes, or expert blocks, see `grouped_impl`)."""
    n, k = r.indices.shape
    flat = r.indices.reshape(-1)
    if grouped_impl(cfg) == "blocks":
        position, source, block_expert = block_layout(flat, cfg.num_experts,
                                                      block_size(cfg, n * k))
        xs = jnp.take(x, source // k, axis=0, mode="fill", fill_value=0)  # zero rows: source R
        ys = expert_ffn(p, xs, cfg, ExpertBlocks(block_expert))
        ys = jnp.take(ys, position, axis=0).reshape(n, k, -1)
    else:
        order = jnp.argsort(flat, stable=True)                  # assignments grouped by expert
        group_sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
        ys = expert_ffn(p, jnp.take(x, order // k, axis=0), cfg, group_sizes)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
        ys = jnp.take(ys, inverse, axis=0).reshape(n, k, -1)    # back to [token, choice]
    w = (r.weights * valid[:, None]).astype(x.dtype)
    return jnp.einsum("nkd,nk->nd", ys, w)


def capacity(cfg: ModelConfig, seq_len: int) -> int:
    """Slots per expert and sequence: ceil(capacity_factor * T * k / E), at most T."""
    c = math.ceil(cfg.capacity_factor * seq_len * cfg.num_experts_per_tok / cfg.num_experts)
    return max(1, min(c, seq_len))


def capacity_dispatch(p: Params, x: jax.Array, r: Routing, valid: jax.Array,
                      cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Fixed-capacity dispatch of x [B, T, d]; returns (output [B, T, d], dropped count)."""
    b, t, d = x.shape
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    c = capacity(cfg, t)
    dt = x.dtype
    idx = r.indices.reshape(b, t, k)
    weights = r.weights.reshape(b, t, k)
    assigned = jax.nn.one_hot(idx, e, dtype=jnp.int32) * valid[:, :, None, None]  # [B,T,k,E]
    # Slot of each assignment in its expert: a running count over the sequence, first
    # choices of all tokens before second choices (GShard's priority), each in token order.
    by_choice = jnp.swapaxes(assigned, 1, 2).reshape(b, k * t, e)
    pos = jnp.swapaxes((jnp.cumsum(by_choice, axis=1) - 1).reshape(b, k, t, e), 1, 2)
    keep = assigned * (pos < c)                                       # [B,T,k,E]
    slot = jnp.sum(pos * keep, axis=-1)                               # [B,T,k]
    slot_hot = jax.nn.one_hot(slot, c, dtype=dt) * jnp.sum(keep, -1)[..., None].astype(dt)
    dispatch = jnp.einsum("btke,btkc->btec", keep.astype(dt), slot_hot)
    combine = jnp.einsum("btke,btkc->btec", keep.astype(dt) * weights[..., None].astype(dt),
                         slot_hot)
    xe = jnp.einsum("btec,btd->ebcd", dispatch, x).reshape(e, b * c, d)
    ye = expert_ffn(p, xe, cfg).reshape(e, b, c, d)
    out = jnp.einsum("btec,ebcd->btd", combine, ye)
    dropped = jnp.sum(assigned) - jnp.sum(keep)
    return out, dropped.astype(jnp.float32)


def routing_stats(r: Routing, valid: jax.Array, cfg: ModelConfig,
                  dropped: jax.Array) -> dict[str, jax.Array]:
    """Losses and metrics over the real (valid) tokens of one layer.

    aux_loss: E * sum_e f_e * P_e (Switch, Fedus et al. 2021, eq. 4; Mixtral's form), f_e the
      fraction of assignments (over all k choices) routed to e, P_e the mean router
      probability of e; 1 at uniform routing, E at full collapse.
    z_loss: mean of logsumexp(logits)^2 (ST-MoE, Zoph et al. 2022, eq. 5).
    load: f [E]; dropped: fraction of assignments dropped; entropy: mean router entropy.
    """
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    v = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    counts = jnp.sum(jax.nn.one_hot(r.indices, e, dtype=jnp.float32) * v[:, None, None],
                     axis=(0, 1))
    load = counts / (n * k)
    mean_prob = jnp.sum(r.probs * v[:, None], axis=0) / n
    log_z = jax.nn.logsumexp(r.logits, axis=-1)
    log_p = r.logits - log_z[:, None]
    entropy = -jnp.sum(r.probs * log_p, axis=-1)
    return {"aux_loss": e * jnp.sum(load * mean_prob),
            "z_loss": jnp.sum(jnp.square(log_z) * v) / n,
            "load": load,
            "dropped": dropped / (n * k),
            "entropy": jnp.sum(entropy * v) / n}


def moe_block(p: Params, x: jax.Array, valid: jax.Array, cfg: ModelConfig,
              rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MoE MLP on x [B, T, d] (valid [B, T]: real tokens); returns (output, layer stats)."""
    b, t, d = x.shape
    valid = valid.astype(jnp.bool_)
    r = route(p["router"]["kernel"], x.reshape(b * t, d), cfg, rng)
    flat_valid = valid.reshape(b * t)
    if cfg.moe_dispatch == "dropless":
        y = dropless(p, x.reshape(b * t, d), r, flat_valid, cfg).reshape(b, t, d)
        dropped = jnp.zeros((), jnp.float32)
    else:
        y, dropped = capacity_dispatch(p, x, r, valid, cfg)
    if "shared" in p:
        y = y + layers.mlp(p["shared"], x, cfg)
    return y, routing_stats(r, flat_valid, cfg, dropped)


MOE_STATS = ("aux_loss", "z_loss", "dropped", "entropy", "load")


def add_moe_losses(objective: jax.Array, stats: dict, aux: Any,
                   model_cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """Adds the MoE router losses to a summed objective and routing metrics to its stats.

    With n = stats["tokens"], the objective gains n * (router_aux_loss_coef * mean_L aux_loss
    + router_z_loss_coef * mean_L z_loss), so dividing by the token count (as the step does)
    adds the coefficient-weighted means. The per-layer stats `moe_<name>` ([L]; `moe_load`
    [L, E]) are scaled by n the same way, so the step's division yields token-weighted means.
    Without aux["moe"] (dense models) both come back unchanged.
    """
    moe_stats = aux.get("moe") if isinstance(aux, dict) else None
    if moe_stats is None:
        return objective, stats
    n = stats["tokens"]
    objective = objective + n * (
        model_cfg.router_aux_loss_coef * jnp.mean(moe_stats["aux_loss"])
        + model_cfg.router_z_loss_coef * jnp.mean(moe_stats["z_loss"]))
    stats = dict(stats)
    for name in MOE_STATS:
        stats[f"moe_{name}"] = n * moe_stats[name].astype(jnp.float32)
    return objective, stats
