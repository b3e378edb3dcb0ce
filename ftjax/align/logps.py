"""Per-sequence log-probabilities of the completion tokens: the quantity every preference loss
compares. Computed in float32 from logits of any dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target_t | prefix) for every position: logits [B, T, V], targets [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    return target_logit - log_z


def sequence_logps(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict:
    """Summed log-probs and counts of the masked (completion) tokens of every row.

    mask [B, T] is 1 on trained targets and 0 on prompt and padding positions, which then add
    nothing. Returns {"logps": [B] sum of log p, "counts": [B] number of masked tokens}.
    """
    if logits.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"sequence_logps: logits {logits.shape}, targets {targets.shape} and "
                         f"mask {mask.shape} must agree on [B, T]")
    mask = mask.astype(jnp.float32)
    lp = token_logps(logits, targets)
    return {"logps": jnp.sum(jnp.where(mask > 0, lp, 0.0) * mask, axis=-1),
            "counts": jnp.sum(mask, axis=-1)}


def mean_logps(logps: jax.Array, counts: jax.Array) -> jax.Array:
    """Length-normalised log-probs (sum / count; 0 for rows without completion tokens)."""
    return logps / jnp.maximum(counts, 1.0)
