"""The pure training step: `(state, batch) -> (state, metrics)`, jitted once with shardings.

Trainers (SFT, DPO, reward modelling, ...) differ only in their `loss_fn`:

    loss_fn(params, batch, rng) -> (objective_sum, stats)

`objective_sum` is summed (not averaged) over the micro-batch, and `stats["tokens"]` counts what
it was summed over. The step adds both up over the accumulation window and divides by the total
count once, so accumulation over k micro-batches equals one large batch exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ftjax import models
from ftjax.models.config import ModelConfig
from ftjax.models.moe import MOE_STATS, add_moe_losses  # noqa: F401 (re-exported)
from ftjax.train.losses import head_cross_entropy, token_cross_entropy
from ftjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def sft_loss(model_cfg: ModelConfig, z_loss: float = 0.0, apply_fn=None,
             bind_rng=None, fused_head: bool = True) -> LossFn:
    """Next-token cross-entropy on the masked (completion) tokens, plus optional z-loss.

    apply_fn: replaces `models.apply` (same signature), for PEFT methods that change what the
    model sees (see `ftjax.peft.Method`). bind_rng: `(params, rng) -> params`, applied when
    the loss gets an rng (training steps; evaluation passes None), e.g. LoRA dropout.
    MoE models (num_experts > 0) add the router losses (`add_moe_losses`); the rng reaches
    `apply` (router jitter) only when model_cfg.router_jitter > 0.
    fused_head: with the plain `models.apply` and an unadapted (plain array) LM head, the head
    and the cross-entropy run as one step (`losses.head_cross_entropy`): same sums, no
    [B, T, V] logits kept for the backward. False: logits, then `token_cross_entropy`.
    """
    fused_ok = fused_head and apply_fn in (None, models.apply)
    apply_fn = apply_fn or models.apply
    jitter = model_cfg.num_experts > 0 and model_cfg.router_jitter > 0

    def loss_fn(params, batch, rng):
        if bind_rng is not None and rng is not None:
            params = bind_rng(params, rng)
        kw = {"rng": jax.random.fold_in(rng, 1)} if jitter and rng is not None else {}
        head = _plain_head(params, model_cfg) if fused_ok else None
        if head is not None:
            kw["compute_logits"] = False
        logits, aux = apply_fn(params, model_cfg, batch["inputs"],
                               positions=batch.get("positions"),
                               segment_ids=batch.get("segment_ids"), **kw)
        if head is not None:
            s = head_cross_entropy(aux["hidden"], head, batch["targets"], batch["loss_mask"],
                                   tied=model_cfg.tie_embeddings, z_loss=z_loss,
                                   chunks=head_chunks(aux["hidden"].shape, model_cfg))
            objective = s.pop("objective")
        else:
            s = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
            objective = s["nll"] + z_loss * s["z"]
        return add_moe_losses(objective, s, aux, model_cfg)

    return loss_fn


def _plain_head(params, model_cfg: ModelConfig):
    """The LM head weight when it is a plain array (not adapted or quantized), else None."""
    w = (params["embed"]["embedding"] if model_cfg.tie_embeddings
         else params.get("lm_head", {}).get("kernel"))
    return w if isinstance(w, jax.Array) else None


# The fused head works on [B, T/chunks, V] float32 logits at a time: about this many bytes.
HEAD_CHUNK_BYTES = 64 * 2**20


def head_chunks(hidden_shape, model_cfg: ModelConfig) -> int:
    b, t, _ = hidden_shape
    return max(1, min(t, -(-b * t * model_cfg.vocab_size * 4 // HEAD_CHUNK_BYTES)))


def split_microbatches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum_steps, B / accum_steps, ...], micro-batch a taking rows a, a+k, ...

    Interleaving (rather than contiguous blocks) keeps every micro-batch spread evenly over the
    devices that hold the batch dimension, so no data moves between devices.
    """
    def split(x):
        b = x.shape[0]
        if b % accum_steps:
            raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
        x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _accumulate(loss_fn: LossFn, params, batch: dict, rng, accum_steps: int, frozen=None):
    if frozen is not None:  # differentiate w.r.t. the trainable leaves only
        from ftjax.peft.core import combine
        full_loss = loss_fn
        loss_fn = lambda p, b, r: full_loss(combine(p, frozen), b, r)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        return grad_fn(params, batch, rng)
    micro = split_microbatches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    g_shape, s_shape = jax.eval_shape(grad_fn, params, first, rng)
    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)

    def body(carry, xs):
        mb, i = xs
        g, s = grad_fn(params, mb, jax.random.fold_in(rng, i))
        add = lambda a, b: jax.tree.map(lambda u, v: u + v.astype(jnp.float32), a, b)
        return (add(carry[0], g), add(carry[1], s)), None

    (grads, stats), _ = jax.lax.scan(body, (zeros(g_shape), zeros(s_shape)),
                                     (micro, jnp.arange(accum_steps)))
    return grads, stats


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    accum_steps: int = 1, schedule: Optional[Callable] = None):
    """Builds the pure step. Metrics are per-token means over the whole accumulation window.

    With `optimizer.name="mezo"` (`tx` a `mezo.MeZO`) the step is MeZO's two-forward-pass
    zeroth-order step instead (`ftjax/train/mezo.py`), with the same state and metrics."""
    from ftjax.train import mezo  # lazy: mezo imports this module
    if isinstance(tx, mezo.MeZO):
        return mezo.make_mezo_train_step(loss_fn, tx, accum_steps=accum_steps, schedule=schedule)

    def train_step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        grads, stats = _accumulate(loss_fn, state.params, batch, step_rng, accum_steps,
                                   state.frozen)
        denom = jnp.maximum(stats["tokens"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / denom for k, v in stats.items() if k != "tokens"}
        metrics["loss"] = metrics.pop("nll")
        metrics["tokens"] = stats["tokens"]
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn):
    """(params, batch) -> summed stats (normalise after summing over the eval set)."""

    def eval_step(params, batch):  # params: the full tree (TrainState.full_params())
        _, stats = loss_fn(params, batch, None)  # no rng: no dropout
        return stats

    return eval_step


def jit_train_step(train_step, state_sharding, batch_sharding):
    """Jits the step once with explicit in/out shardings; the old state's buffers are donated."""
    mesh = batch_sharding.mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def traced_under_mesh(state, batch):
        # Kernels that cannot be partitioned by XLA (the splash attention core) read the mesh
        # to run per shard (models/splash.py).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch)

    return jax.jit(traced_under_mesh, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))
