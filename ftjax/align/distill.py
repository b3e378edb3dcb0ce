"""Knowledge-distillation objectives: token-level divergences between a teacher's and a
student's next-token distributions, as pure functions of logits.

Conventions follow TRL's `GKDTrainer.generalized_jsd_loss` (Agarwal et al. 2024, "On-Policy
Distillation of Language Models", Eq. 1):

  p_T = softmax(teacher_logits / tau),  p_S = softmax(student_logits / tau)
  forward KL   KL(p_T || p_S)            (mode-covering; classic KD, Hinton et al. 2015)
  reverse KL   KL(p_S || p_T)            (mode-seeking; MiniLLM)
  JSD_beta     beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),  M = beta p_T + (1 - beta) p_S

At the end points TRL (and this file) *define* JSD_0 = forward KL and JSD_1 = reverse KL (the
formula itself tends to 0 at both ends; JSD_beta / beta -> forward KL as beta -> 0). The
temperature divides both logits; nothing is multiplied by tau^2 unless `t2_scale=True`
(Hinton et al.'s factor, which keeps gradient sizes comparable across temperatures; TRL does
not apply it). Everything runs in float32 on log-probabilities (log_softmax, logsumexp for the
mixture), so no probability is ever divided or logged directly. The teacher's logits are
always under `stop_gradient`: gradients reach the student only.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from log-probs; terms with p = 0 contribute 0."""
    p = jnp.exp(log_p)
    # Where p = 0 (a -inf logit) the term is 0; the inner where keeps its gradient finite.
    safe = p > 0
    diff = jnp.where(safe, log_p - jnp.where(safe, log_q, 0.0), 0.0)
    return jnp.sum(p * diff, axis=-1)


def token_divergence(student_logits: jax.Array, teacher_logits: jax.Array, *,
                     kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0,
                     t2_scale: bool = False) -> jax.Array:
    """Per-token divergence [B, T] between the student's and the teacher's distributions.

    student_logits, teacher_logits: [B, T, V] (any float dtype; computed in float32).
    kind: "forward_kl" KL(p_T||p_S), "reverse_kl" KL(p_S||p_T) or "jsd" (generalized JSD with
    `beta`; beta=0 is forward KL and beta=1 reverse KL, as TRL defines them).
    t2_scale: multiply by temperature**2 (Hinton et al. 2015); off by default, as in TRL.
    """
    if kind not in KINDS:
        raise ValueError(f"distillation loss kind={kind!r}: choose one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD beta must be in [0, 1], got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                         f"{teacher_logits.shape} differ: student and teacher must share the "
                         "vocabulary (and the batch)")
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        d = _kl(log_t, log_s)
    elif kind == "reverse_kl":
        d = _kl(log_s, log_t)
    else:
        # log M = logsumexp(log p_S + log(1 - beta), log p_T + log beta)
        log_m = jnp.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        d = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return d * (temperature ** 2) if t2_scale else d


def distill_sums(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                 **kw) -> dict:
    """{"distill": sum of the per-token divergence over masked tokens, "tokens": mask sum}:
    sums, as every ftjax step loss returns (the step divides by the token count once)."""
    mask = mask.astype(jnp.float32)
    d = token_divergence(student_logits, teacher_logits, **kw)
    return {"distill": jnp.sum(d * mask), "tokens": jnp.sum(mask)}


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                 mask: Optional[jax.Array] = None, **kw) -> jax.Array:
    """The divergence averaged over masked tokens (all tokens when `mask` is None): TRL's
    `reduction="batchmean"` with labels. Keyword arguments as `token_divergence`."""
    if mask is None:
        mask = jnp.ones(student_logits.shape[:-1], jnp.float32)
    s = distill_sums(student_logits, teacher_logits, mask, **kw)
    return s["distill"] / jnp.maximum(s["tokens"], 1.0)


def forward_kl(student_logits, teacher_logits, mask=None, *, temperature: float = 1.0,
               t2_scale: bool = False) -> jax.Array:
    """Mean over masked tokens of KL(p_T || p_S)."""
    return distill_loss(student_logits, teacher_logits, mask, kind="forward_kl",
                        temperature=temperature, t2_scale=t2_scale)


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature: float = 1.0,
               t2_scale: bool = False) -> jax.Array:
    """Mean over masked tokens of KL(p_S || p_T)."""
    return distill_loss(student_logits, teacher_logits, mask, kind="reverse_kl",
                        temperature=temperature, t2_scale=t2_scale)


def generalized_jsd(student_logits, teacher_logits, mask=None, *, beta: float = 0.5,
                    temperature: float = 1.0, t2_scale: bool = False) -> jax.Array:
    """Mean over masked tokens of the generalized JSD (TRL's `generalized_jsd_loss`)."""
    return distill_loss(student_logits, teacher_logits, mask, kind="jsd", beta=beta,
                        temperature=temperature, t2_scale=t2_scale)
