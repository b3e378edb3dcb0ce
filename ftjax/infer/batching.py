"""Continuous batching: a fixed set of decode slots that requests join and leave at any step.

The engine holds one KV cache of `slots` rows x `max_len` positions (memory bounded by those
two settings: `cache_bytes()`), with a per-row fill index, so each slot decodes at its own
position. A request is prefilled alone (its prompt right-padded to one of a few bucket
lengths, so prefill compiles once per bucket), its keys and values are copied into a free
slot, and from then on it advances one token per decode step together with every other
active slot. Decoding runs `chunk` steps per compiled call (one program for every mix of
requests); the host then hands each request its new tokens, and frees the slots of requests
that ended (an eos id, `max_tokens`, the end of the slot, or the request's own callback
saying stop, e.g. on a stop string), so a queued request can take the slot at the next call.

Each row samples with its own temperature / top-k / top-p and its own key
`fold_in(PRNGKey(seed), token index)`, so a request's output does not depend on which other
requests share its batch; greedy rows (temperature 0) take the argmax. With an
`AdapterBank`, every row also selects its own LoRA adapter (`ftjax.peft.multi`).

    engine = BatchEngine(params, cfg, eos_ids=[tok.eos_id], slots=8, max_len=256)
    engine.submit(Request(prompt_ids, SamplingParams(max_tokens=32), on_tokens=callback))
    engine.run_until_idle()          # or engine.start() for a background thread

The engine thread is the only one touching device state; `submit` and `cancel` are safe from
any thread.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models
from ftjax.infer.generate import sample_logits
from ftjax.models.config import ModelConfig

__all__ = ["SamplingParams", "Request", "BatchEngine", "prefill_buckets"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


# on_tokens(new_ids, finish_reason) -> keep going? finish_reason is None while running, else
# "stop" (an eos id), "length" (max_tokens), "cancelled" (cancel(), or the callback said stop
# or raised) or "error" (a failed engine step; `engine.last_error` says why).
TokenCallback = Callable[[list, Optional[str]], bool]


@dataclasses.dataclass
class Request:
    """A prompt (token ids) to continue. `adapter` is an AdapterBank index (-1: the base)."""
    prompt: Sequence[int]
    sampling: SamplingParams
    on_tokens: TokenCallback
    adapter: int = -1
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False


def prefill_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to max_len (max_len itself last)."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


@dataclasses.dataclass
class _Slot:
    request: Request
    generated: int = 0


class BatchEngine:
    """Continuous batching over `slots` decode rows (see the module docstring).

    params: placed params (any sharding: the compiled steps follow it), or a tree with
      `MultiLoRAWeight`s when `adapters` (an `AdapterBank`) is given.
    eos_ids: the ids that end a request. max_len: positions per slot (prompt + output).
    chunk: decode steps per compiled call. cache_sharding: optional sharding for the
      [layers, slots, max_len, kv_heads, head_dim] cache arrays (e.g. kv heads over "tensor").
    """

    def __init__(self, params: Any, cfg: ModelConfig, *, eos_ids: Sequence[int], pad_id: int = 0,
                 slots: int = 8, max_len: int = 256, chunk: int = 4, adapters: Any = None,
                 cache_dtype: Any = None, cache_sharding: Any = None,
                 on_step: Optional[Callable[[int, int, float], None]] = None):
        if slots < 1 or max_len < 2 or chunk < 1:
            raise ValueError(f"need slots >= 1, max_len >= 2, chunk >= 1; got slots={slots}, "
                             f"max_len={max_len}, chunk={chunk}")
        if cfg.position == "learned" and max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's "
                             f"{cfg.max_position_embeddings} learned positions; lower max_len")
        if not eos_ids:
            raise ValueError("eos_ids is empty: the engine needs at least one id that ends a "
                             "request")
        self.cfg, self.params, self.adapters = cfg, params, adapters
        self.slots, self.max_len, self.chunk = slots, max_len, chunk
        self.eos_ids, self.pad_id = frozenset(int(i) for i in eos_ids), int(pad_id)
        self.buckets = prefill_buckets(max_len)
        self.on_step = on_step
        self._apply = _adapter_apply if adapters is not None else _plain_apply
        cache = models.init_cache(cfg, slots, max_len, cache_dtype, per_row=True)
        if cache_sharding is not None:
            cache = {**cache, "k": jax.device_put(cache["k"], cache_sharding),
                     "v": jax.device_put(cache["v"], cache_sharding)}
        # Per-layer weights and caches (`models.unstack_layers`): each decode step updates
        # every layer's cache in place instead of re-stacking the whole cache (about 1.5x
        # faster decoding on the `tiny` model; one copy of the weights).
        split = models.unstack_layers(params, cache, cfg)
        self._unstacked = split is not None
        if split is not None:
            params, cache = split
        self.params = params
        self._cache = cache
        z = functools.partial(np.zeros, slots)
        # Host mirrors of the per-slot decode state (uploaded each call; tiny).
        self._last, self._pos = z(dtype=np.int32), z(dtype=np.int32)
        self._active, self._adapter = z(dtype=bool), np.full(slots, -1, np.int32)
        self._temp, self._top_p = z(dtype=np.float32), np.ones(slots, np.float32)
        self._top_k, self._seed, self._count = z(dtype=np.int32), z(dtype=np.uint32), \
            z(dtype=np.int32)
        self._slot: list[Optional[_Slot]] = [None] * slots
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self.stats = collections.Counter()
        self.last_error: Optional[str] = None

    # ---- public, thread-safe ----------------------------------------------------------

    def cache_bytes(self) -> int:
        """Bytes of the KV cache (the engine's bounded decode memory)."""
        return int(sum(x.nbytes for x in jax.tree.leaves(
            (self._cache["k"], self._cache["v"], self._cache["segment_ids"]))))

    def check(self, prompt_len: int, sampling: SamplingParams) -> None:
        """Raises ValueError when a request cannot be served (before it is queued)."""
        sampling.check()
        if prompt_len < 1:
            raise ValueError("the prompt encodes to no tokens")
        if prompt_len + sampling.max_tokens > self.max_len:
            raise ValueError(f"this server's context is {self.max_len} tokens per request; the "
                             f"prompt has {prompt_len} and max_tokens asks for "
                             f"{sampling.max_tokens} more: shorten the prompt or lower "
                             "max_tokens")

    def submit(self, request: Request) -> Request:
        self.check(len(request.prompt), request.sampling)
        if self.adapters is None and request.adapter != -1:
            raise ValueError("this engine serves no adapters; request.adapter must be -1")
        with self._lock:
            self._queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Ends the request at the next step (its callback then gets "cancelled")."""
        request.cancelled = True
        with self._lock:
            self._lock.notify_all()

    def active(self) -> int:
        return int(self._active.sum())

    def adapters_in_use(self) -> set[int]:
        """Adapter indices of the requests decoding now (an AdapterBank must not reuse them)."""
        return {int(a) for a, on in zip(self._adapter, self._active) if on and a >= 0}

    def queued(self) -> int:
        return len(self._queue)

    def warmup(self) -> float:
        """Compiles every decode program (one per power-of-two slot prefix) and every prefill
        bucket before requests arrive; returns the seconds it took. Call it while no request
        is running (the server does, at start)."""
        if self._active.any():
            raise RuntimeError("warmup() while requests are running")
        t0 = time.perf_counter()
        # Two passes: the first call of each program sees the freshly made cache, later
        # calls the cache as the programs return it (placed like the params), which is a
        # different input sharding on a mesh and so a different compiled program.
        for _ in range(2):
            rows = 1
            while True:
                rows = min(rows, self.slots)
                cut = slice(0, rows)
                self._cache, toks = _decode_jit(
                    self.params, self._cache, jnp.asarray(self._last[cut]),
                    jnp.asarray(self._pos[cut]), jnp.asarray(self._active[cut]),
                    jnp.asarray(self._adapter[cut]), jnp.asarray(self._temp[cut]),
                    jnp.asarray(self._top_k[cut]), jnp.asarray(self._top_p[cut]),
                    jnp.asarray(self._seed[cut]), jnp.asarray(self._count[cut]), cfg=self.cfg,
                    chunk=self.chunk, apply=self._apply)
                np.asarray(toks)
                if rows == self.slots:
                    break
                rows *= 2
            for bucket in self.buckets:    # every prefill length, into the free slot 0
                self._cache, first = _prefill_jit(
                    self.params, self._cache, jnp.full((1, bucket), self.pad_id, jnp.int32),
                    jnp.int32(1), jnp.int32(0), jnp.int32(-1), jnp.float32(0.0), jnp.int32(0),
                    jnp.float32(1.0), jnp.uint32(0), cfg=self.cfg, apply=self._apply)
                int(first)
        return time.perf_counter() - t0

    def start(self) -> None:
        """Runs the engine loop in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ftjax-batch-engine",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def run_until_idle(self) -> None:
        """Runs steps in the calling thread until no request is queued or active."""
        while self._queue or self._active.any():
            self.step()

    def set_params(self, params: Any) -> None:
        """Swaps the params (same structure and shapes: no recompile), e.g. after an adapter
        was written into the bank. Safe while the engine runs: a step reads them once."""
        if self._unstacked:
            split = models.unstack_layers(params, None, self.cfg)
            if split is None:
                raise ValueError("set_params: the new params' layers are not stacked like "
                                 "the engine's")
            params = split[0]
        self.params = params

    # ---- the engine loop --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._queue and not self._active.any():
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not stop the engine
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        """Ends every running and queued request with "error" (the engine keeps serving)."""
        self.stats["failed_steps"] += 1
        self.last_error = f"{type(error).__name__}: {error}"
        for i, s in enumerate(self._slot):
            if s is not None:
                self._finish(i, [], "error")
        with self._lock:
            gone, self._queue = list(self._queue), collections.deque()
        for r in gone:
            _call(r, [], "error")

    def step(self) -> None:
        """Admits queued requests into free slots, then runs one decode call."""
        self._drop_cancelled()
        self._admit()
        if not self._active.any():
            return
        t0 = time.perf_counter()
        n_active = int(self._active.sum())
        out = self._decode()
        dt = time.perf_counter() - t0
        self.stats["decode_calls"] += 1
        if self.on_step is not None:
            self.on_step(n_active, self.slots, dt)
        self._dispatch(out)

    def _drop_cancelled(self) -> None:
        with self._lock:
            keep = [r for r in self._queue if not r.cancelled]
            gone = [r for r in self._queue if r.cancelled]
            self._queue = collections.deque(keep)
        for r in gone:
            _call(r, [], "cancelled")
        for i, s in enumerate(self._slot):
            if s is not None and s.request.cancelled:
                self._finish(i, [], "cancelled")

    def _admit(self) -> None:
        while True:
            free = [i for i in range(self.slots) if self._slot[i] is None]
            with self._lock:
                if not free or not self._queue:
                    return
                req = self._queue.popleft()
            self._prefill(free[0], req)

    def _prefill(self, i: int, req: Request) -> None:
        n = len(req.prompt)
        bucket = next(b for b in self.buckets if b >= n)
        tokens = np.full((1, bucket), self.pad_id, np.int32)
        tokens[0, :n] = req.prompt
        sp = req.sampling
        self._cache, first = _prefill_jit(
            self.params, self._cache, jnp.asarray(tokens), jnp.int32(n), jnp.int32(i),
            jnp.int32(req.adapter), jnp.float32(sp.temperature), jnp.int32(sp.top_k),
            jnp.float32(sp.top_p), jnp.uint32(sp.seed & 0xFFFFFFFF), cfg=self.cfg,
            apply=self._apply)
        self.stats["prefills"] += 1
        self._slot[i] = _Slot(req)
        self._pos[i], self._active[i], self._adapter[i] = n, True, req.adapter
        self._temp[i], self._top_k[i], self._top_p[i] = sp.temperature, sp.top_k, sp.top_p
        self._seed[i], self._count[i] = sp.seed & 0xFFFFFFFF, 1
        self._emit(i, [int(first)])

    def _decode(self) -> np.ndarray:
        # Decode only the first `rows` slots: the smallest power of two (or all slots) that
        # covers every active one. Requests take the lowest free slot, so a light load runs
        # a small batch: at most log2(slots) + 1 decode programs.
        hi = int(np.flatnonzero(self._active).max()) + 1
        rows = min(1 << (hi - 1).bit_length(), self.slots)
        cut = slice(0, rows)
        self._cache, toks = _decode_jit(
            self.params, self._cache, jnp.asarray(self._last[cut]), jnp.asarray(self._pos[cut]),
            jnp.asarray(self._active[cut]), jnp.asarray(self._adapter[cut]),
            jnp.asarray(self._temp[cut]), jnp.asarray(self._top_k[cut]),
            jnp.asarray(self._top_p[cut]), jnp.asarray(self._seed[cut]),
            jnp.asarray(self._count[cut]), cfg=self.cfg, chunk=self.chunk, apply=self._apply)
        return np.asarray(toks)                                            # [chunk, rows]

    def _dispatch(self, toks: np.ndarray) -> None:
        for i in range(toks.shape[1]):
            if not self._active[i]:
                continue
            self._pos[i] += self.chunk
            self._count[i] += self.chunk
            self._emit(i, [int(t) for t in toks[:, i]])

    def _emit(self, i: int, new: list) -> None:
        """Hands slot i's new tokens to its request, cut at an eos id or max_tokens; frees the
        slot when the request ends (`check` keeps prompt + max_tokens within the slot)."""
        s = self._slot[i]
        room = s.request.sampling.max_tokens - s.generated
        out, reason = [], None
        for t in new:
            out.append(t)
            if t in self.eos_ids:
                reason = "stop"
                break
            if len(out) >= room:
                reason = "length"
                break
        s.generated += len(out)
        self._last[i] = out[-1]
        if reason is not None:
            self._finish(i, out, reason)
        elif not _call(s.request, out, None):
            self._finish(i, [], "cancelled")

    def _finish(self, i: int, out: list, reason: str) -> None:
        req = self._slot[i].request
        self._slot[i] = None
        self._active[i] = False
        self._adapter[i] = -1
        self.stats["finished"] += 1
        _call(req, out, reason)


def _call(req: Request, new: list, reason: Optional[str]) -> bool:
    """The request's callback; one that raises ends its own request ("error" on the next
    step), never the engine."""
    try:
        return bool(req.on_tokens(new, reason))
    except Exception:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        req.cancelled = True
        return False


# ------------------------------------------------------------------------------------------
# The compiled steps (module level, so every engine over the same shapes shares them)
# ------------------------------------------------------------------------------------------

def _plain_apply(params, cfg, tokens, adapter_ids, **kw):
    del adapter_ids
    return models.apply(params, cfg, tokens, **kw)


def _adapter_apply(params, cfg, tokens, adapter_ids, **kw):
    from ftjax.peft.multi import multi_apply
    return multi_apply(params, cfg, tokens, base_apply=models.apply, adapter_ids=adapter_ids,
                       **kw)


def _choose(logits: jax.Array, temp, top_k, top_p, seed, count) -> jax.Array:
    """One token per row: argmax where temp == 0, else a sample with the row's own key."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(lg, t, k, p, s, c):
        key = jax.random.fold_in(jax.random.PRNGKey(s), c)
        return sample_logits(lg[None], key, jnp.maximum(t, 1e-6), k, p)[0]
    def sample(_):
        sampled = jax.vmap(one)(logits, temp, top_k, top_p, seed, count)
        return jnp.where(temp > 0, sampled, greedy)
    # All-greedy batches skip the per-row sort over the vocabulary that sampling needs.
    return jax.lax.cond(jnp.any(temp > 0), sample, lambda _: greedy, None)


@functools.partial(jax.jit, static_argnames=("cfg", "apply"), donate_argnums=(1,))
def _prefill_jit(params, cache, tokens, length, slot, adapter, temp, top_k, top_p, seed, *,
                 cfg, apply):
    """Runs one right-padded prompt [1, P] and copies its keys/values into row `slot`;
    returns (cache, the first new token)."""
    p = tokens.shape[1]
    seg = (jnp.arange(p, dtype=jnp.int32) < length).astype(jnp.int32)[None]
    row = models.init_cache(cfg, 1, p, jax.tree.leaves(cache["k"])[0].dtype)
    _, aux = apply(params, cfg, tokens, jnp.reshape(adapter, (1,)), positions=None,
                   segment_ids=seg, cache=row, compute_logits=False)
    # The logits of the last real token only (the head over all P slots would cost more).
    last = jax.lax.dynamic_slice_in_dim(aux["hidden"], length - 1, 1, axis=1)    # [1, 1, D]
    logits = models.logits_from_hidden(params, cfg, last)[:, 0]                  # [1, V]
    first = _choose(logits, temp[None], top_k[None], top_p[None], seed[None],
                    jnp.zeros((1,), jnp.int32))[0]
    zero = jnp.int32(0)

    def put(big, row):   # row [(L,) 1, P, K, hd] into big [(L,) slots, len, K, hd] at `slot`
        if isinstance(big, list):
            return [put(b, r) for b, r in zip(big, row)]
        start = (zero,) * (big.ndim - 4) + (slot, zero, zero, zero)
        return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), start)
    k, v = put(cache["k"], aux["cache"]["k"]), put(cache["v"], aux["cache"]["v"])
    seg_row = jnp.zeros((1, cache["segment_ids"].shape[1]), jnp.int32)
    seg_row = jax.lax.dynamic_update_slice(seg_row, seg, (zero, zero))
    segs = jax.lax.dynamic_update_slice(cache["segment_ids"], seg_row, (slot, zero))
    index = cache["index"].at[slot].set(length)
    return {"k": k, "v": v, "segment_ids": segs, "index": index}, first


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "apply"), donate_argnums=(1,))
def _decode_jit(params, cache, last, pos, active, adapter, temp, top_k, top_p, seed, count, *,
                cfg, chunk, apply):
    """`chunk` decode steps over the first `rows = len(last)` slots; returns (cache, tokens
    [chunk, rows]). Inactive slots among them compute too (fixed shapes) but write with
    segment id 0 and never move; the slots past `rows` are not touched."""
    rows = last.shape[0]
    full = cache
    cache = jax.tree.map(lambda x: x[:rows], cache)
    seg = active.astype(jnp.int32)[:, None]
    step_pos = jnp.where(active, 1, 0).astype(jnp.int32)
    limit = cache["segment_ids"].shape[1] - 1

    def body(carry, j):
        cache, last, pos = carry
        write = jnp.minimum(pos, limit)            # a finished-but-unread row never overflows
        logits, aux = apply(params, cfg, last[:, None], adapter, positions=write[:, None],
                            segment_ids=seg, cache={**cache, "index": write})
        tok = _choose(logits[:, -1], temp, top_k, top_p, seed, count + j)
        return (aux["cache"], tok, pos + step_pos), tok

    (cache, _, _), toks = jax.lax.scan(body, (cache, last, pos), jnp.arange(chunk))
    if rows == full["segment_ids"].shape[0]:
        return cache, toks
    zero = jnp.int32(0)
    return jax.tree.map(lambda big, new: jax.lax.dynamic_update_slice(
        big, new, (zero,) * big.ndim), full, cache), toks
