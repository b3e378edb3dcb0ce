"""Autoregressive generation with a KV cache: greedy, temperature, top-k and nucleus sampling.

`generate` works on token ids: left-padded prompts are prefilled (all slots but the last with one
`apply` call that skips the LM head, then the last slot, whose logits give the first token), then
one token per step is decoded inside a `lax.while_loop` that stops as soon as every row has emitted
eos. Prefill and decode form one jitted function, compiled once per (shapes, cfg,
max_new_tokens, greedy or not); eos/pad ids, temperature, top-k and top-p are traced values, so
changing them does not recompile.

`generate_text` wraps it for strings, padding every batch to one fixed (rows, prompt length)
shape so an eval loop compiles once.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models
from ftjax.data.batching import bos_prefix
from ftjax.models.config import ModelConfig

__all__ = ["generate", "generate_text", "sample_logits", "prompt_layout"]

Params = dict[str, Any]

PROMPT_BUCKET = 16  # generate_text pads prompt length to a multiple of this
UNSTACK_MIN_NEW_TOKENS = 32  # decode with per-layer weights and caches from this many tokens


def prompt_layout(prompt_lengths: jax.Array, prompt_len: int) -> tuple[jax.Array, jax.Array]:
    """Segment ids (1 real, 0 pad) and positions (0.. on real tokens) of left-padded prompts.

    Returns two int32 arrays [B, prompt_len]; padding slots get position 0.
    """
    pad = prompt_len - prompt_lengths.astype(jnp.int32)[:, None]        # [B, 1]
    slot = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]              # [1, P]
    segment_ids = (slot >= pad).astype(jnp.int32)
    positions = jnp.maximum(slot - pad, 0) * segment_ids
    return segment_ids, positions


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Draws one token per row from logits [B, V] with temperature, top-k and top-p filtering.

    top_k <= 0 disables top-k; top_p >= 1 disables nucleus filtering. Nucleus sampling (Holtzman
    et al. 2020) keeps the smallest prefix of the sorted distribution whose mass reaches top_p
    (always at least the most likely token), applied after top-k. All arguments may be traced.
    """
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32) / temperature
    sorted_desc = -jnp.sort(-logits, axis=-1)                                # [B, V]
    rank = jnp.arange(vocab, dtype=jnp.int32)

    # Top-k: only the k best sorted entries survive.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)
    sorted_desc = jnp.where(rank < k, sorted_desc, -jnp.inf)

    # Top-p over the top-k distribution: token i (in sorted order) is kept if the mass strictly
    # before it is below top_p, so the kept prefix is the smallest one reaching top_p.
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p) | (top_p >= 1.0)
    keep = keep & (rank < k)
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    # The smallest kept logit is the threshold (ties with it are all kept).
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)           # [B, 1]
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "apply_fn"))
def _generate_jit(params: Params, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                  eos_id: jax.Array, pad_id: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array, rng: jax.Array, *, cfg: ModelConfig,
                  max_new_tokens: int, greedy: bool, apply_fn=None) -> jax.Array:
    """Prefill + while-loop decode. Returns int32 [B, max_new_tokens] (pad after eos)."""
    b, p = prompt_tokens.shape
    segment_ids, positions = prompt_layout(prompt_lengths, p)
    cache = models.init_cache(cfg, b, p + max_new_tokens)
    if apply_fn is None and max_new_tokens >= UNSTACK_MIN_NEW_TOKENS:
        # Per-layer weights and caches for the decode loop (`models.unstack_layers`): each
        # step then updates every layer's cache in place and reads weights without slicing
        # them out of the stacked arrays. It unrolls the layers in the compiled program, so
        # short generations (whose few steps gain less than the longer compile) keep the scan.
        split = models.unstack_layers(params, cache, cfg)
        if split is not None:
            params, cache = split
    apply_fn = apply_fn or models.apply

    def choose(logits: jax.Array, step: jax.Array) -> jax.Array:
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_logits(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)

    # Prompts are left-padded, so the last slot is every row's last real token. All slots but
    # that one are prefilled without the LM head (only the last slot's logits are needed, and
    # the head over all P slots can cost as much as the rest of the prefill); the last slot
    # then goes through the model alone, as a decode step does.
    if p > 1:
        _, aux = apply_fn(params, cfg, prompt_tokens[:, :-1], positions=positions[:, :-1],
                          segment_ids=segment_ids[:, :-1], cache=cache, compute_logits=False)
        cache = aux["cache"]
    logits, aux = apply_fn(params, cfg, prompt_tokens[:, -1:], positions=positions[:, -1:],
                           segment_ids=segment_ids[:, -1:], cache=cache)
    first = choose(logits[:, -1], jnp.int32(0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = first == eos_id
    lengths = prompt_lengths.astype(jnp.int32)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, out, last, done = state
        # The token emitted at step-1 sits at position len + step - 1 of its row.
        pos = (lengths + step - 1)[:, None]
        logits, aux = apply_fn(params, cfg, last[:, None], positions=pos,
                               segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache)
        tok = choose(logits[:, -1], step)
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_index_in_dim(out, tok, step, axis=1)
        return step + 1, aux["cache"], out, tok, done | (tok == eos_id)

    state = (jnp.int32(1), aux["cache"], out, first, done)
    _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
    return out


def generate(params: Params, cfg: ModelConfig, prompt_tokens, prompt_lengths, *,
             max_new_tokens: int, eos_id: int, pad_id: int = 0, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, rng: Optional[jax.Array] = None,
             apply_fn=None) -> np.ndarray:
    """Continues left-padded prompts; returns int32 [B, max_new_tokens] with pad after eos.

    apply_fn: replaces `models.apply` (same signature, KV cache included), for PEFT methods
    that change what the model sees (prompt / prefix tuning, per-row adapters).

    prompt_tokens: int [B, P], each row's `prompt_lengths[b]` real tokens right-aligned.
    Greedy when temperature == 0; otherwise samples with `rng` (required), after top-k
    (0 = off) and nucleus top-p (1.0 = off) filtering. The eos token itself is emitted.
    """
    prompt_tokens = np.asarray(prompt_tokens)
    prompt_lengths = np.asarray(prompt_lengths)
    if prompt_tokens.ndim != 2:
        raise ValueError("prompt_tokens must be [batch, prompt_len], got shape "
                         f"{prompt_tokens.shape}")
    b, p = prompt_tokens.shape
    if prompt_lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape ({b},), got {prompt_lengths.shape}")
    if b and (prompt_lengths.min() < 1 or prompt_lengths.max() > p):
        raise ValueError(f"prompt_lengths must be in [1, {p}] (every prompt needs at least one "
                         f"token, e.g. bos), got min {prompt_lengths.min()} "
                         f"max {prompt_lengths.max()}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cfg.position == "learned" and p + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt_len {p} + max_new_tokens {max_new_tokens} exceeds the "
                         f"{cfg.max_position_embeddings} learned positions of this model; shorten "
                         "the prompts or max_new_tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng, e.g. "
                         "rng=jax.random.PRNGKey(0)")
    if rng is None:
        rng = jax.random.PRNGKey(0)  # unused by the greedy path; keeps the signature fixed

    out = _generate_jit(params, jnp.asarray(prompt_tokens, jnp.int32),
                        jnp.asarray(prompt_lengths, jnp.int32), jnp.int32(eos_id),
                        jnp.int32(pad_id), jnp.float32(1.0 if greedy else temperature),
                        jnp.int32(top_k), jnp.float32(top_p), rng, cfg=cfg,
                        max_new_tokens=int(max_new_tokens), greedy=greedy, apply_fn=apply_fn)
    return np.asarray(out)


def _rows_for(n: int, batch_size: int) -> int:
    """Rows per batch: batch_size, or the next power of two >= n when fewer prompts than that."""
    if n >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def generate_text(params: Params, cfg: ModelConfig, tokenizer, prompts: Sequence[str], *,
                  max_new_tokens: int, batch_size: int = 64, **sampling) -> list[str]:
    """Generates a completion for each prompt string; returns the decoded text up to eos.

    Each prompt is encoded as `[bos] + encode(prompt + "\\n")`, the training format of the
    synthetic suite. All batches share one shape, so `generate` compiles once per call: rows are
    `batch_size` (or the next power of two above the number of prompts, when smaller) and the
    prompt length is the longest prompt rounded up to a multiple of 16. `sampling` is passed on
    to `generate` (temperature, top_k, top_p, rng); with an rng, batch i uses fold_in(rng, i).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unknown = set(sampling) - {"temperature", "top_k", "top_p", "rng", "apply_fn"}
    if unknown:
        raise ValueError(f"generate_text got unknown sampling options {sorted(unknown)}; "
                         "allowed: temperature, top_k, top_p, rng")
    encoded = [bos_prefix(tokenizer) + list(tokenizer.encode(p + "\n")) for p in prompts]
    return [tokenizer.decode(ids) for ids in
            generate_ids(params, cfg, tokenizer, encoded, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, **sampling)]


def generate_ids(params: Params, cfg: ModelConfig, tokenizer, prompts: Sequence[Sequence[int]],
                 *, max_new_tokens: int, batch_size: int = 64, **sampling) -> list[list[int]]:
    """Generates a continuation of each prompt (token ids, already encoded with whatever
    template the model was trained with); returns the new ids up to (not including) eos.

    Batching as in `generate_text`: one shape per call, rows `batch_size` (or the next power
    of two above the number of prompts), prompt length the longest rounded up to 16.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    encoded = [list(p) for p in prompts]
    longest = max(len(e) for e in encoded)
    prompt_len = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    rows = _rows_for(len(encoded), batch_size)
    pad_id, eos_id = int(tokenizer.pad_id), int(tokenizer.eos_id)
    rng = sampling.pop("rng", None)

    out_ids: list[list[int]] = []
    for batch_index, start in enumerate(range(0, len(encoded), rows)):
        chunk = encoded[start:start + rows]
        tokens = np.full((rows, prompt_len), pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        tokens[:, -1] = (tokenizer.bos_id if tokenizer.bos_id is not None
                         else tokenizer.eos_id)  # filler rows: one token
        for i, ids in enumerate(chunk):
            tokens[i, :] = pad_id
            tokens[i, prompt_len - len(ids):] = ids
            lengths[i] = len(ids)
        batch_rng = None if rng is None else jax.random.fold_in(rng, batch_index)
        out = generate(params, cfg, tokens, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       pad_id=pad_id, rng=batch_rng, **sampling)
        for row in out[:len(chunk)]:
            ids = row.tolist()
            if eos_id in ids:
                ids = ids[:ids.index(eos_id)]
            out_ids.append(ids)
    return out_ids
