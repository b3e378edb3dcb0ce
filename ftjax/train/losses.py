"""Token-level and sequence-classification losses. Every loss returns *sums* so that callers
normalise once, by the number of label tokens (examples) in the whole accumulation window."""
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


# ------------------------------------------------------------------------------------------
# Sequence classification: one label per row. Same convention: sums, plus "tokens" = the
# number (total weight) of examples, so the step normalises by examples.
# ------------------------------------------------------------------------------------------

def _class_stats(logits: jax.Array, labels: jax.Array, example_weight: jax.Array | None):
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    w = (jnp.ones(labels.shape, jnp.float32) if example_weight is None
         else example_weight.astype(jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp_t = jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
    correct = (logp_t >= jnp.max(logp, axis=-1)).astype(jnp.float32)
    return logp_t, w, correct


def classification_cross_entropy(logits: jax.Array, labels: jax.Array,
                                 example_weight: jax.Array | None = None,
                                 class_weight: jax.Array | None = None) -> dict:
    """Class-weighted cross-entropy sums: sum_i m_i w[y_i] (-log p_i[y_i]).

    logits [B, C], labels [B] int, example_weight [B] (0 on padding rows), class_weight [C]
    (None: all 1). Returns "nll" (the weighted sum), "ce" (the unweighted sum), "correct"
    and "tokens" (sum of example weights: the normaliser). With class weights averaging 1 over
    the training data (`ftjax.data.imbalance.class_weights`) the scale matches plain CE.
    """
    logp_t, m, correct = _class_stats(logits, labels, example_weight)
    cw = 1.0 if class_weight is None else jnp.asarray(class_weight, jnp.float32)[labels]
    return {"nll": jnp.sum(-logp_t * cw * m), "ce": jnp.sum(-logp_t * m),
            "correct": jnp.sum(correct * m), "tokens": jnp.sum(m)}


def focal_loss(logits: jax.Array, labels: jax.Array, example_weight: jax.Array | None = None,
               gamma: float = 2.0, alpha: jax.Array | None = None) -> dict:
    """Focal loss sums (Lin et al. 2017, eq. 5): FL = -alpha_t (1 - p_t)^gamma log p_t.

    alpha [C] per-class weights (alpha_t = alpha[y]; None: 1). gamma = 0 with alpha None is
    cross-entropy. Same keys as `classification_cross_entropy` ("nll" is the focal sum).
    """
    logp_t, m, correct = _class_stats(logits, labels, example_weight)
    a = 1.0 if alpha is None else jnp.asarray(alpha, jnp.float32)[labels]
    if gamma == 0:
        mod = 1.0
    else:
        q = -jnp.expm1(logp_t)  # 1 - p_t without cancellation near p_t = 1
        q_safe = jnp.where(q > 0, q, 1.0)  # (1-p)^gamma has an infinite slope at 0 for gamma < 1
        mod = jnp.where(q > 0, q_safe ** gamma, 0.0)
    return {"nll": jnp.sum(-a * mod * logp_t * m), "ce": jnp.sum(-logp_t * m),
            "correct": jnp.sum(correct * m), "tokens": jnp.sum(m)}
