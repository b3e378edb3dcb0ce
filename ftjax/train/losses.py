"""Token-level and sequence-classification losses. Every loss returns *sums* so that callers
normalise once, by the number of label tokens (examples) in the whole accumulation window."""
from __future__ import annotations

import functools

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
# The LM head fused with the cross-entropy. Same sums as `token_cross_entropy(h @ w, ...)`, but
# the gradient is formed while each chunk of logits is hot: the backward keeps d(loss)/dh
# [B, T, D] and d(loss)/dw [D, V] instead of the [B, T, V] float32 logits, and no pass over
# the logits happens after the forward. Chunks run over the time axis, so a batch sharded over
# devices is never re-split.
# ------------------------------------------------------------------------------------------

def _head_chunk(h, w, tied, targets, mask, z_loss, grad):
    dt = h.dtype
    w = w.astype(dt)
    spec = "btd,vd->btv" if tied else "btd,dv->btv"
    logits = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    log_z = (m + jnp.log(s))[..., 0]
    target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    stats = {"nll": jnp.sum((log_z - target_logit) * mask),
             "z": jnp.sum(jnp.square(log_z) * mask),
             "correct": jnp.sum((target_logit >= m[..., 0]).astype(jnp.float32) * mask)}
    if not grad:
        return stats, None
    # d/dlogits of (nll + z_loss * log_z^2), per token: p (1 + 2 z_loss log_z) - onehot(target).
    coef = (1.0 + 2.0 * z_loss * log_z)[..., None]
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None]
    dlogits = ((e / s) * coef - hit.astype(jnp.float32)) * mask[..., None]
    dlogits = dlogits.astype(dt)
    dh = jnp.einsum("btv,vd->btd" if tied else "btv,dv->btd", dlogits, w)
    dw = (jnp.einsum("btv,btd->vd", dlogits, h, preferred_element_type=jnp.float32) if tied
          else jnp.einsum("btd,btv->dv", h, dlogits, preferred_element_type=jnp.float32))
    return stats, (dh, dw)


def _head_ce(h, w, targets, mask, tied, z_loss, chunks, grad_w):
    """Sums over the time axis in `chunks` equal chunks, run one after the other (`lax.scan`,
    so only one chunk's logits is alive at a time); T is zero-padded (mask 0) to a multiple."""
    b, t, d = h.shape
    n = max(1, min(int(chunks), t))
    if n == 1:
        st, g = _head_chunk(h, w, tied, targets, mask, z_loss, grad=grad_w is not None)
        if g is None:
            return st, None
        return st, (g[0], g[1] if grad_w else None)
    c = -(-t // n)
    pad = n * c - t
    if pad:
        h, targets, mask = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                            for x in (h, targets, mask))
    split = lambda x: jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)
    xs = (split(h), split(targets), split(mask))
    zero = {"nll": jnp.zeros((), jnp.float32), "z": jnp.zeros((), jnp.float32),
            "correct": jnp.zeros((), jnp.float32)}
    dw0 = jnp.zeros(w.shape, jnp.float32) if grad_w else None

    def body(carry, x):
        totals, dw = carry
        st, g = _head_chunk(x[0], w, tied, x[1], x[2], z_loss, grad=grad_w is not None)
        totals = {k: totals[k] + st[k] for k in totals}
        if g is None:
            return (totals, dw), None
        return (totals, dw + g[1] if grad_w else dw), g[0]

    (totals, dw), dh = jax.lax.scan(body, (zero, dw0), xs)
    if grad_w is None:
        return totals, None
    dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * c, d)[:, :t]
    return totals, (dh, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(h, w, targets, mask, tied, z_loss, chunks):
    totals, _ = _head_ce(h, w, targets, mask, tied, z_loss, chunks, grad_w=None)
    return totals["nll"] + z_loss * totals["z"], totals


def _fused_fwd(h, w, targets, mask, tied, z_loss, chunks):
    # With symbolic zeros, each primal says whether it is differentiated: a frozen head
    # (LoRA, prompt tuning, ...) gets no [D, V] weight gradient at all.
    totals, (dh, dw) = _head_ce(h.value, w.value, targets.value, mask.value, tied, z_loss,
                                chunks, grad_w=w.perturbed)
    dw = dw.astype(w.value.dtype) if dw is not None else None
    return (totals["nll"] + z_loss * totals["z"], totals), (dh, dw)


def _fused_bwd(tied, z_loss, chunks, res, cts):
    dh, dw = res
    g = cts[0]  # the statistics are not differentiable (stop_gradient semantics)
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros((), jnp.float32)
    gh = (g * dh.astype(jnp.float32)).astype(dh.dtype)
    gw = None if dw is None else (g * dw).astype(dw.dtype)
    return gh, gw, None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def head_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array, *,
                       tied: bool = False, z_loss: float = 0.0, chunks: int = 1) -> dict:
    """LM head and masked next-token cross-entropy in one step: the sums of
    `token_cross_entropy(h @ w, targets, mask)` plus "objective" = nll + z_loss * z, the only
    differentiable entry.

    h [B, T, D] final hidden states (compute dtype), w [D, V] (or the embedding table [V, D]
    with `tied`), plain arrays. Logits are float32 (products accumulate in float32). `chunks`
    splits the time axis: each chunk's [B, T/chunks, V] logits are the largest buffer.
    """
    targets = targets.astype(jnp.int32)
    mask = mask.astype(jnp.float32)
    objective, totals = _fused(h, w, targets, mask, bool(tied), float(z_loss), int(chunks))
    out = {k: jax.lax.stop_gradient(v) for k, v in totals.items()}
    out["objective"] = objective
    out["tokens"] = jnp.sum(mask)
    return out


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
