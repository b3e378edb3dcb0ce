"""The classification objective: a head on the causal LM's last real token, and its losses.

The backbone is the causal LM (`models.apply(..., return_hidden=True)`); a new trainable head
`cls_head/{kernel [d, C], bias [C]}` reads the final hidden state of each row's last real
token. Losses: cross-entropy, class-weighted cross-entropy or focal loss
(`ftjax.train.losses`). Batch layout: `inputs` int32 [B, T] (right-padded), `segment_ids`
int32 [B, T] (1 on real tokens, 0 on padding), `positions` int32 [B, T], `label` int32 [B]
and `label_weight` float32 [B] (0 on padding rows); the last two may arrive as [B, 1] (the
loop's batch sharding needs rank >= 2, see `train.batches.as_rank2`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models
from ftjax.models.config import ModelConfig
from ftjax.models.heads import last_token_index
from ftjax.train.batches import as_rank2
from ftjax.train.losses import classification_cross_entropy, focal_loss
from ftjax.train.step import LossFn

HEAD = "cls_head"
LOSSES = ("ce", "weighted", "focal")


def init_head(key: jax.Array, hidden_size: int, num_classes: int, std: float = 0.02) -> dict:
    """`{"kernel": N(0, std) [d, C], "bias": zeros [C]}` in float32."""
    if num_classes < 2:
        raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
    return {"kernel": std * jax.random.normal(key, (hidden_size, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_params(hidden_size: int, num_classes: int, std: float = 0.02
                ) -> Callable[[Any, jax.Array], dict]:
    """`Run.build(add_params=...)`: a fresh head from a key folded off the run's transform key
    (the PEFT transform itself sees the key unchanged)."""
    def fn(params, key):
        return {HEAD: init_head(jax.random.fold_in(key, 0x636C73), hidden_size, num_classes,
                                std)}
    return fn


def head_logits(head: dict, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, C] float32 logits from the hidden state [B, T, d] at each row's last real token."""
    idx = last_token_index(segment_ids)
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def classify_logits(params: Any, model_cfg: ModelConfig, batch: dict,
                    apply_fn: Optional[Callable] = None) -> jax.Array:
    """Backbone + head: [B, C] logits of a classification batch."""
    apply_fn = apply_fn or models.apply
    backbone = {k: v for k, v in params.items() if k != HEAD}
    _, aux = apply_fn(backbone, model_cfg, batch["inputs"], positions=batch.get("positions"),
                      segment_ids=batch["segment_ids"], return_hidden=True)
    return head_logits(params[HEAD], aux["hidden"], batch["segment_ids"])


def classify_loss(model_cfg: ModelConfig, loss: str = "ce", *,
                  class_weight: Optional[Sequence[float]] = None, gamma: float = 2.0,
                  alpha: Optional[Sequence[float]] = None, apply_fn=None,
                  bind_rng=None) -> LossFn:
    """The trainer's `loss_fn(params, batch, rng) -> (objective_sum, stats)`; stats["tokens"]
    is the number of (weighted) examples, so the step averages per example.

    loss: "ce" (plain), "weighted" (cross-entropy with `class_weight` [C]) or "focal" (gamma,
    optional per-class `alpha`).
    """
    if loss not in LOSSES:
        raise ValueError(f"classify.loss={loss!r} is not known; choose one of {LOSSES}")
    if loss == "weighted" and class_weight is None:
        raise ValueError("classify.loss='weighted' needs class weights")
    cw = None if class_weight is None else np.asarray(class_weight, np.float32)
    al = None if alpha is None else np.asarray(alpha, np.float32)

    def loss_fn(params, batch, rng):
        if bind_rng is not None and rng is not None:
            params = bind_rng(params, rng)
        logits = classify_logits(params, model_cfg, batch, apply_fn)
        labels = batch["label"].reshape(-1)
        w = batch.get("label_weight")
        w = None if w is None else w.reshape(-1)
        if loss == "focal":
            s = focal_loss(logits, labels, w, gamma=gamma, alpha=al)
        else:
            s = classification_cross_entropy(logits, labels, w,
                                             cw if loss == "weighted" else None)
        return s["nll"], s

    return loss_fn


def make_predict(model_cfg: ModelConfig, placement, apply_fn=None):
    """A function `(full_params, batches) -> (probs [N, C], labels [N])` over a list of
    process-local batches, skipping padding rows; outputs are replicated on every process."""
    def fwd(params, batch):
        logits = classify_logits(params, model_cfg, batch, apply_fn)
        return (jax.nn.softmax(logits, -1), batch["label"].reshape(-1),
                batch["label_weight"].reshape(-1))
    fn = jax.jit(fwd, out_shardings=placement.replicated)

    def predict(params, batches: Sequence[dict]):
        probs, labels = [], []
        for b in batches:
            p, y, w = jax.device_get(fn(params, placement.put_batch(as_rank2(b))))
            keep = np.asarray(w) > 0
            probs.append(np.asarray(p)[keep])
            labels.append(np.asarray(y)[keep])
        return np.concatenate(probs), np.concatenate(labels)
    return predict
