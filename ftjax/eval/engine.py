"""Sharded inference for evaluation: log-likelihoods of continuations and batched generation.

The `Engine` runs on params as they are placed for training (or placed by
`ftjax.evaluate`): jitted functions follow the params' shardings, batches go over the
mesh's batch axes, and every result comes back replicated, so nothing gathers the params to
a host and every process of a multi-host run reads the same numbers.

Requests are sorted by length and cut into batches of a fixed number of rows, each padded to
one of a few bucketed lengths, so an evaluation compiles a handful of programs however many
examples it scores. Rows past the end of the requests are empty (segment id 0) and dropped.

    engine = Engine(params, cfg, tokenizer, placement=placement)
    scores = engine.loglik([(context_ids, continuation_ids), ...])   # [LoglikResult]
    texts  = engine.generate([prompt_ids, ...], max_new_tokens=32)   # [Generation]

Log-likelihoods follow lm-evaluation-harness's `loglikelihood`: the row is
`(context + continuation)[-(max_len + 1):][:-1]`, the continuation's tokens are scored by the
logits before them, and `is_greedy` says whether each of them is the argmax.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models
from ftjax.models.config import ModelConfig
from ftjax.sharding.rules import spec_axes

__all__ = ["Engine", "LoglikResult", "Generation", "put_global", "host_value"]

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoglikResult:
    """One (context, continuation) request scored: the summed log-prob of the continuation
    (nats), whether greedy decoding would produce it, its token count, and the per-token
    log-probs (for uncertainty measures)."""
    loglik: float
    is_greedy: bool
    n_tokens: int
    token_logps: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated continuation: its token ids up to (not including) the first eos id."""
    ids: tuple[int, ...]
    finished: bool        # an eos id ended it (rather than max_new_tokens)


def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array every process holds in full, as one global array with `sharding`
    (each device gets its slice; works for one process and for many)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated global array's value on this host (any process of a multi-host run)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(x.addressable_data(0))


_COMPILED: dict[tuple, Callable] = {}


def _compiled(key: tuple, make: Callable[[], Callable]) -> Callable:
    """One jitted function per (kind, model config, forward, output sharding, ...), shared by
    every Engine, so evaluations repeated during training compile once."""
    if key not in _COMPILED:
        _COMPILED[key] = make()
    return _COMPILED[key]


def _bucket_len(n: int, bucket: int, limit: int) -> int:
    """The padded length for a row of `n` tokens: the next power of two up to `bucket`, then
    the next multiple of `bucket`; never above `limit`."""
    if n <= bucket:
        out = 1 << max(n - 1, 0).bit_length()
    else:
        out = -(-n // bucket) * bucket
    return min(max(out, 1), limit)


def _loglik_fn(params: Params, inputs: jax.Array, targets: jax.Array, score_mask: jax.Array,
               segment_ids: jax.Array, positions: jax.Array, *, cfg: ModelConfig,
               apply_fn: Callable) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs of `targets` [B, T] and whether each is the argmax (both masked
    by `score_mask`)."""
    logits, _ = apply_fn(params, cfg, inputs, positions=positions, segment_ids=segment_ids)
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    mask = score_mask > 0
    return jnp.where(mask, tok_logp, 0.0), greedy | ~mask


class Engine:
    """Batched, bucketed, sharded scoring and generation for one model.

    params: host arrays or arrays already placed on `placement.mesh` (a training state's
      params); host arrays are placed with `placement.params` when `placement` is given.
    placement: a `ftjax.train.placement.Placement` (mesh, param and batch shardings); None
      runs on the default device.
    apply_fn: the forward pass (`models.apply`, or a PEFT method's wrapper for prompt /
      prefix tuning).
    batch_size: rows per compiled batch; rounded up to a multiple of the mesh's batch
      (data-parallel) size.
    max_len: longest row scored (default: the model's max_position_embeddings).
    """

    def __init__(self, params: Params, cfg: ModelConfig, tokenizer: Any, *,
                 placement: Any = None, apply_fn: Optional[Callable] = None,
                 batch_size: int = 16, max_len: Optional[int] = None, bucket: int = 64):
        self.cfg, self.tokenizer, self.placement = cfg, tokenizer, placement
        self.apply_fn = apply_fn or models.apply
        self._gen_apply = apply_fn   # None: plain decoding (per-layer weights and caches)
        self.max_len = int(max_len or cfg.max_position_embeddings)
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(f"eval max_len {self.max_len} exceeds the model's "
                             f"{cfg.max_position_embeddings} positions; lower it")
        self.bucket = int(bucket)
        if placement is not None:
            dp = math.prod(placement.mesh.shape[a] for a in spec_axes(placement.batch.spec[0]))
            on_host = any(not isinstance(x, jax.Array)
                          for x in jax.tree.leaves(params))
            if on_host:
                params = placement.put_params(params)
            self.batch_sharding = placement.batch
            self.replicated = placement.replicated
        else:
            dp = 1
            params = jax.tree.map(jnp.asarray, params)
            self.batch_sharding = self.replicated = None
        self.dp = dp
        self.batch_size = -(-int(batch_size) // dp) * dp
        self.params = params
        self._loglik = _compiled(("loglik", cfg, self.apply_fn, self.replicated),
                                 lambda: jax.jit(functools.partial(_loglik_fn, cfg=cfg,
                                                                   apply_fn=self.apply_fn),
                                                 out_shardings=self.replicated))

    # -- placement -------------------------------------------------------------------------

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.batch_sharding is None:
            return jnp.asarray(x)
        from ftjax.sharding.shardings import _for_rank
        return put_global(x, _for_rank(self.batch_sharding, x.ndim))

    # -- log-likelihood ----------------------------------------------------------------------

    def loglik(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
               ) -> list[LoglikResult]:
        """Scores each (context ids, continuation ids) request; results in request order.

        The context must hold at least one token (e.g. bos) when the continuation starts the
        row; rows longer than max_len keep their last max_len + 1 tokens (the context is cut
        on the left, as lm-evaluation-harness does). A continuation longer than max_len is an
        error: split it (perplexity tasks do, with rolling windows)."""
        rows = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not cont:
                raise ValueError(f"loglik request {i}: empty continuation (nothing to score)")
            if not ctx:
                raise ValueError(f"loglik request {i}: empty context; give at least one token "
                                 "(the tokenizer's bos, as ftjax's tasks do)")
            if len(cont) > self.max_len:
                raise ValueError(f"loglik request {i}: continuation of {len(cont)} tokens is "
                                 f"longer than max_len {self.max_len}; split it into windows")
            whole = (ctx + cont)[-(self.max_len + 1):]
            rows.append((i, whole[:-1], whole[1:], len(cont)))
        out: list[Optional[LoglikResult]] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
        b = self.batch_size
        for lo in range(0, len(order), b):
            chunk = [rows[r] for r in order[lo:lo + b]]
            t = _bucket_len(max(len(c[1]) for c in chunk), self.bucket, self.max_len)
            arrays = {k: np.zeros((b, t), np.int32) for k in
                      ("inputs", "targets", "score", "segment_ids", "positions")}
            for j, (_, inp, tgt, n_cont) in enumerate(chunk):
                n = len(inp)
                arrays["inputs"][j, :n] = inp
                arrays["targets"][j, :n] = tgt
                arrays["score"][j, n - n_cont:n] = 1
                arrays["segment_ids"][j, :n] = 1
                arrays["positions"][j, :n] = np.arange(n)
            logps, greedy = self._loglik(self.params, *(self._put(arrays[k]) for k in (
                "inputs", "targets", "score", "segment_ids", "positions")))
            logps, greedy = host_value(logps), host_value(greedy)
            for j, (idx, inp, _, n_cont) in enumerate(chunk):
                n = len(inp)
                lp = logps[j, n - n_cont:n].astype(np.float64)
                out[idx] = LoglikResult(loglik=float(lp.sum()),
                                        is_greedy=bool(greedy[j, n - n_cont:n].all()),
                                        n_tokens=n_cont, token_logps=tuple(float(x) for x in lp))
        return out  # type: ignore[return-value]

    # -- generation ------------------------------------------------------------------------

    def _gen_fn(self, max_new_tokens: int, greedy: bool) -> Callable:
        from ftjax.infer.generate import _generate_jit
        cfg, apply_fn = self.cfg, self._gen_apply

        def fn(params, tokens, lengths, eos, pad, temperature, top_k, top_p, rng):
            return _generate_jit(params, tokens, lengths, eos, pad, temperature, top_k,
                                 top_p, rng, cfg=cfg, max_new_tokens=max_new_tokens,
                                 greedy=greedy, apply_fn=apply_fn)
        return _compiled(("generate", cfg, apply_fn, self.replicated, max_new_tokens, greedy),
                         lambda: jax.jit(fn, out_shardings=self.replicated))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, eos_ids: Optional[Sequence[int]] = None) -> list[Generation]:
        """Continues each prompt (token ids, e.g. `[bos] + encode(text)`); results in prompt
        order. Greedy when temperature is 0; otherwise sampled, each batch with its own key
        folded from `seed`. Generation stops at the first of `eos_ids` (default: the
        tokenizer's); stop strings are applied to the decoded text by the caller."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tok = self.tokenizer
        eos = list(eos_ids) if eos_ids is not None else (
            list(getattr(tok, "eos_ids", ()) or ()) or [int(tok.eos_id)])
        pad_id = int(getattr(tok, "pad_id", 0) or 0)
        limit = self.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generation prompt {i} has no tokens")
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"generation prompt {i} has {len(p)} tokens; with "
                                 f"max_new_tokens={max_new_tokens} that exceeds the model's "
                                 f"{limit} positions; shorten the prompt or max_new_tokens")
        greedy = temperature == 0.0
        fn = self._gen_fn(int(max_new_tokens), greedy)
        out: list[Optional[Generation]] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda r: -len(prompts[r]))
        b = self.batch_size
        base_rng = jax.random.PRNGKey(int(seed))
        for n_batch, lo in enumerate(range(0, len(order), b)):
            idx = order[lo:lo + b]
            width = _bucket_len(max(len(prompts[r]) for r in idx), self.bucket,
                                limit - max_new_tokens)
            tokens = np.full((b, width), pad_id, np.int32)
            lengths = np.ones((b,), np.int32)
            tokens[:, -1] = prompts[idx[0]][-1]   # empty rows: one real token, output dropped
            for j, r in enumerate(idx):
                p = list(prompts[r])
                tokens[j, width - len(p):] = p
                lengths[j] = len(p)
            rng = jax.random.fold_in(base_rng, n_batch)
            res = fn(self.params, self._put(tokens), self._put(lengths),
                     jnp.int32(eos[0]), jnp.int32(pad_id),
                     jnp.float32(1.0 if greedy else temperature), jnp.int32(top_k),
                     jnp.float32(top_p), rng)
            res = host_value(res)
            for j, r in enumerate(idx):
                row = res[j].tolist()
                cut = next((n for n, t in enumerate(row) if t in eos), None)
                out[r] = Generation(ids=tuple(row[:cut] if cut is not None else row),
                                    finished=cut is not None)
        return out  # type: ignore[return-value]
