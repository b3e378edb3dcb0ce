"""Heads on a decoder's final hidden states: the last real token of each row, and a scalar
`score` head on it (a reward model, or a value model read per token).

The layout is transformers' `*ForSequenceClassification` with one label: `score` is a bias-free
[d, 1] projection of the final (normed) hidden state, read at each row's last real token. The
backbone is the causal LM itself (`models.apply(..., compute_logits=False)`), so any PEFT
method that wraps `apply` fine-tunes it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

SCORE = "score"   # the top-level params key of the scalar head
VALUE = "value"   # PPO's value head on the policy (same layout, read at every token)


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[B] index of each row's last real (segment id != 0) token; 0 for an all-padding row."""
    t = segment_ids.shape[-1]
    real = segment_ids != 0
    last = t - 1 - jnp.argmax(real[:, ::-1], axis=-1)
    return jnp.where(real.any(-1), last, 0)


def init_score(key: jax.Array, hidden_size: int, std: float = 0.02) -> dict:
    """`{"kernel": N(0, std) [d, 1]}` in float32 (transformers initialises `score` the same
    way, with std = initializer_range)."""
    return {"kernel": std * jax.random.normal(key, (hidden_size, 1), jnp.float32)}


def score_head(hidden_size: int, std: float = 0.02) -> Callable[[Any, jax.Array], dict]:
    """`Run.build(add_params=...)`: a fresh `score` head from a key folded off the run's
    transform key."""
    def fn(params, key):
        return {SCORE: init_score(jax.random.fold_in(key, 0x73636F), hidden_size, std)}
    return fn


def value_head(hidden_size: int, std: float = 0.02) -> Callable[[Any, jax.Array], dict]:
    """`Run.build(add_params=...)`: PPO's value head on the policy (read at every token)."""
    def fn(params, key):
        return {VALUE: init_score(jax.random.fold_in(key, 0x76616C), hidden_size, std)}
    return fn


def backbone(params: dict) -> dict:
    """The params without the scalar heads (what `models.apply` takes)."""
    return {k: v for k, v in params.items() if k not in (SCORE, VALUE)}


def token_scores(params: dict, cfg, inputs: jax.Array, segment_ids: jax.Array,
                 positions: Optional[jax.Array] = None, apply_fn=None, **apply_kw
                 ) -> tuple[jax.Array, dict]:
    """([B, T] float32 score of every position, the forward's aux). params holds the backbone
    and `score`; apply_fn is the PEFT method's `models.apply` (or a wrapper of it)."""
    from ftjax.models.transformer import apply
    apply_fn = apply_fn or apply
    _, aux = apply_fn(backbone(params), cfg, inputs, positions=positions,
                      segment_ids=segment_ids, compute_logits=False, **apply_kw)
    h = aux["hidden"].astype(jnp.float32)
    return (h @ params[SCORE]["kernel"].astype(jnp.float32))[..., 0], aux


def sequence_scores(params: dict, cfg, inputs: jax.Array, segment_ids: jax.Array,
                    positions: Optional[jax.Array] = None, apply_fn=None, **apply_kw
                    ) -> tuple[jax.Array, dict]:
    """([B] float32 score at each row's last real token, the forward's aux)."""
    scores, aux = token_scores(params, cfg, inputs, segment_ids, positions, apply_fn,
                               **apply_kw)
    idx = last_token_index(segment_ids)
    return jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0], aux
