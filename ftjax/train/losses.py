"""Token-level losses. Every loss returns *sums* so that callers normalise once, by the number
of label tokens in the whole accumulation window (not per micro-batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
    """Masked next-token cross-entropy sums.

    logits [B, T, V] (any float dtype, computed in float32), targets [B, T] int, mask [B, T].
    Returns sums over masked tokens: "nll" (cross-entropy), "z" (log Z squared, for z-loss,
    PaLM sec. 5), "correct" (argmax hits) and "tokens" (mask sum).
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    nll = log_z - target_logit
    # Target attains the max logit (argmax up to exact ties); reuses the reduction, no argmax.
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return {"nll": jnp.sum(nll * mask), "z": jnp.sum(jnp.square(log_z) * mask),
            "correct": jnp.sum(correct * mask), "tokens": jnp.sum(mask)}
