"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021), without model changes.

Prompt tuning trains n virtual-token embeddings prepended to every sequence. `models.apply`
takes token ids, so the vocabulary is extended instead: `embed/embedding` becomes a
`PromptTable(base [V, D], prompt [n, D])` whose `lookup` returns prompt rows for ids >= V, and
whose `materialize()` is the base (a tied LM head keeps V outputs). `prompt_apply` prepends ids
V..V+n-1, runs the wrapped apply function (`models.apply`) and drops the first n logits.
  Positions: the virtual tokens take positions 0..n-1 and real tokens continue after them
  (given positions + n), as in PEFT, where the prompt is concatenated to the input embeddings.
  Segments: the prompt gets the segment id of each row's first real (non-zero) token. A
  packed row with several documents needs `segments=K`: the prompt is then repeated K times
  with segment ids first, first+1, .., first+K-1 (packed documents numbered consecutively), at
  a cost of K*n extra tokens; with segments=1 only the first document of a row sees it.

Prefix tuning trains per-layer key/value prefixes of n slots. `prefix_apply` builds a KV cache
whose first n slots hold the prefix k/v (segment ids as above, index = n) and calls
`models.apply` with it, so every token attends to the prefix; real tokens keep positions 0...
RoPE is not applied to the prefix keys: they are used as given, as PEFT passes them as
`past_key_values`, which the model treats as already rotated. Optionally the prefix is
re-parameterised through an MLP (PEFT's `prefix_projection`): emb [n, d] -> Linear(d, h) ->
tanh -> Linear(h, 2*L*kv_dim).

Where the prefix lives: a `PrefixKV` structured weight on `layers/attn/k_proj/kernel` (the
projection whose keys it extends) holds the base kernel plus the prefix fields. A new
top-level `prefix/` subtree would be simpler, but the trainer derives sharding axes from the
model's own param tree (`core.axes_like`), which has no place for extra keys. `prefix_apply`
strips the prefix off before calling `models.apply`; calling `models.apply` directly on
prefix-tuned params raises.

Trainable counts: prompt tuning n*D; prefix tuning n*L*2*kv_dim (kv_dim = kv_heads*head_dim),
or with the projection n*d + d*h + h + h*2*L*kv_dim + 2*L*kv_dim (d = token_dim, default
kv_dim as PEFT does for GQA models).

Generation: both apply functions understand a KV cache. Given a fresh cache (from
`init_cache`) they grow it by the n (or K*n) prefix slots, write the prompt/prefix, and mark the
returned cache (key `peft_prefix_slots`), so later decode calls only shift positions; pass
the method's apply_fn to `ftjax.infer.generate.generate(..., apply_fn=...)`.

Neither function imports the model: each takes the apply function it wraps (`base_apply`, the
model's `apply`), and `method()` binds the one given to `get_method` into `Method.apply_fn`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft.core import StructuredWeight, embed, linear, materialize, unwrap
from ftjax.peft.method import Method, register, require_apply_fn

ModelConfig = Any  # ftjax.models.ModelConfig (peft does not import the model)
ApplyFn = Callable[..., Any]  # the signature of ftjax.models.apply

CACHE_MARK = "peft_prefix_slots"  # cache key: number of prefix slots already written
PROMPT_INITS = ("random", "text", "vocab")


# ------------------------------------------------------------------------------------------
# Shared: the segment ids and cache layout of a prefix
# ------------------------------------------------------------------------------------------

def prefix_segment_ids(segment_ids: jax.Array, n: int, segments: int = 1) -> jax.Array:
    """[B, segments*n] segment ids of the prefix slots of each row.

    Copy j of the prefix gets (the row's first non-zero segment id) + j; rows of padding only
    get 0 (they attend to nothing real either way).
    """
    seg = segment_ids.astype(jnp.int32)
    first = jnp.take_along_axis(seg, jnp.argmax(seg != 0, axis=1)[:, None], axis=1)  # [B, 1]
    copies = jnp.where(first > 0, first + jnp.arange(segments, dtype=jnp.int32)[None], 0)
    return jnp.repeat(copies, n, axis=1)


def _check_fresh(cache: dict) -> None:
    idx = cache["index"]
    if not isinstance(idx, jax.core.Tracer) and int(idx) != 0:
        raise ValueError(f"prompt/prefix tuning got a cache filled to {int(idx)} slots without "
                         f"its prefix (no {CACHE_MARK!r} key); start from an empty init_cache")


def _grow(cache: dict, slots: int) -> dict:
    """The cache with `slots` empty slots appended."""
    pad = lambda x, axis: jnp.concatenate(
        [x, jnp.zeros(x.shape[:axis] + (slots,) + x.shape[axis + 1:], x.dtype)], axis=axis)
    return {"k": pad(cache["k"], 2), "v": pad(cache["v"], 2),
            "segment_ids": pad(cache["segment_ids"], 1), "index": cache["index"]}


def _strip_mark(cache: dict) -> dict:
    return {k: v for k, v in cache.items() if k != CACHE_MARK}


# ------------------------------------------------------------------------------------------
# Prompt tuning
# ------------------------------------------------------------------------------------------

@flax.struct.dataclass
class PromptTable(StructuredWeight):
    """The embedding table extended by n trainable virtual-token rows (ids V..V+n-1).

    base: [V, D] (plain or structured, e.g. LoRA on the embedding); prompt: [n, D].
    """
    base: Any
    prompt: jax.Array

    @property
    def vocab(self) -> int:
        return int(self.base.shape[0])

    @property
    def shape(self):
        return tuple(self.base.shape)

    def lookup(self, ids):
        v, n = self.vocab, self.prompt.shape[0]
        virtual = ids >= v
        rows = embed(jnp.where(virtual, 0, ids), self.base)
        prompt = jnp.take(self.prompt, jnp.clip(ids - v, 0, n - 1), axis=0).astype(rows.dtype)
        return jnp.where(virtual[..., None], prompt, rows)

    def matmul(self, x):
        return linear(x, self.base, x.dtype)

    def materialize(self):
        return materialize(self.base)

    def trainable_fields(self):
        return ("prompt",)

    def frozen_base(self):
        return unwrap(self.base)

    def field_axes(self, base_axes):
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "prompt": (None, base_axes[-1])}


def _prompt_table(params: Any) -> PromptTable:
    table = params["embed"]["embedding"]
    if not isinstance(table, PromptTable):
        raise ValueError("prompt_apply needs params from apply_prompt_tuning (embed/embedding "
                         f"is a {type(table).__name__}, not a PromptTable)")
    return table


def apply_prompt_tuning(params: Any, key: jax.Array, *, num_virtual_tokens: int = 20,
                        init: str = "random", init_token_ids: Optional[Sequence[int]] = None,
                        init_std: Optional[float] = None, dtype=None) -> Any:
    """Replaces `embed/embedding` by a PromptTable with n trainable virtual-token rows.

    init: "random": N(0, init_std), init_std defaulting to the std of the base embedding table
      (PEFT's RANDOM uses torch's N(0, 1), far off the scale of trained embeddings);
      "text": the embeddings of `init_token_ids`, repeated or cut to n (PEFT's TEXT);
      "vocab": embeddings of n ids drawn uniformly from the vocabulary (PEFT's SAMPLE_VOCAB;
      Lester et al. sample from the 5,000 most frequent tokens).
    """
    n = int(num_virtual_tokens)
    if n < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    if init not in PROMPT_INITS:
        raise ValueError(f"unknown prompt init {init!r}; choose one of {PROMPT_INITS}")
    base = params["embed"]["embedding"]
    if isinstance(base, PromptTable):
        raise ValueError("embed/embedding already holds a prompt; apply prompt tuning once")
    dense = materialize(base)
    vocab, width = dense.shape
    dt = dtype or jnp.float32
    if init == "random":
        std = jnp.std(dense.astype(jnp.float32)) if init_std is None else init_std
        prompt = std * jax.random.normal(key, (n, width), jnp.float32)
    else:
        if init == "text":
            if not init_token_ids:
                raise ValueError("prompt init='text' needs init_token_ids (or peft.init_text)")
            ids = list(init_token_ids) * math.ceil(n / len(init_token_ids))
            ids = np.asarray(ids[:n], np.int32)
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"init_token_ids must lie in [0, {vocab}), got {ids.min()}.."
                                 f"{ids.max()}")
        else:
            ids = jax.random.randint(key, (n,), 0, vocab)
        prompt = embed(jnp.asarray(ids), base).astype(jnp.float32)
    out = dict(params)
    out["embed"] = dict(params["embed"])
    out["embed"]["embedding"] = PromptTable(base=base, prompt=prompt.astype(dt))
    return out


def prompt_apply(params: Any, cfg: ModelConfig, tokens: jax.Array, *, base_apply: ApplyFn,
                 positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
                 cache: Optional[dict] = None, segments: int = 1, **kw):
    """`base_apply` (the model's apply) with the trained prompt prepended to every row (see
    module doc). Bind base_apply with `functools.partial` to get an apply function.

    Returns logits [B, T, V] for the real tokens only, and aux (with the cache, marked with
    the prompt's slots, when a cache was given).
    """
    table = _prompt_table(params)
    n, v, k = table.prompt.shape[0], table.vocab, int(segments)
    b, t = tokens.shape
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    if cache is not None and CACHE_MARK in cache:  # decoding after the prompt was written
        slots = cache[CACHE_MARK]
        if positions is None:
            positions = jnp.broadcast_to(cache["index"] - slots + jnp.arange(t), (b, t))
        logits, aux = base_apply(params, cfg, tokens, positions=positions + n,
                                 segment_ids=seg, cache=_strip_mark(cache), **kw)
        aux["cache"][CACHE_MARK] = slots
        return logits, aux

    start = 0
    if cache is not None:
        _check_fresh(cache)
        start = cache["index"]
    if positions is None:
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    virt_ids = v + jnp.tile(jnp.arange(n, dtype=jnp.int32), k)
    virt_pos = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)
    all_tokens = jnp.concatenate([jnp.broadcast_to(virt_ids, (b, k * n)),
                                  tokens.astype(jnp.int32)], axis=1)
    all_pos = jnp.concatenate([jnp.broadcast_to(virt_pos, (b, k * n)),
                               positions.astype(jnp.int32) + n], axis=1)
    all_seg = jnp.concatenate([prefix_segment_ids(seg, n, k), seg], axis=1)
    grown = None if cache is None else _grow(cache, k * n)
    logits, aux = base_apply(params, cfg, all_tokens, positions=all_pos, segment_ids=all_seg,
                             cache=grown, **kw)
    if "hidden" in aux:
        aux["hidden"] = aux["hidden"][:, k * n:]
    if cache is not None:
        aux["cache"][CACHE_MARK] = jnp.asarray(k * n, jnp.int32)
    return (None if logits is None else logits[:, k * n:]), aux  # None: compute_logits=False


# ------------------------------------------------------------------------------------------
# Prefix tuning
# ------------------------------------------------------------------------------------------

class _Prefix(StructuredWeight):
    """Common part of the prefix weights: the base k_proj kernel is used unchanged."""

    def prefix_kv(self) -> tuple[jax.Array, jax.Array]:
        """(k, v), each [L, n, kv_dim]."""
        raise NotImplementedError

    def matmul(self, x):
        raise ValueError("prefix-tuned params must run through ftjax.peft.prompt.prefix_apply "
                         "(the method's apply_fn), not models.apply: the prefix would be ignored")

    def materialize(self):
        raise ValueError("a prefix-tuned model has no dense equivalent (the prefix is extra "
                         "key/value slots, not a weight change); keep the params unmerged")

    @property
    def shape(self):
        return tuple(self.base.shape)

    def frozen_base(self):
        return unwrap(self.base)

    def _base_axes(self, base_axes):
        if isinstance(self.base, StructuredWeight):
            return dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return base_axes


@flax.struct.dataclass
class PrefixKV(_Prefix):
    """Directly trained prefix: k, v [L, n, kv_dim] next to the k_proj kernel [L, D, kv_dim]."""
    base: Any
    k: jax.Array
    v: jax.Array

    def prefix_kv(self):
        return self.k, self.v

    def trainable_fields(self):
        return ("k", "v")

    def field_axes(self, base_axes):
        lead, ax_kv = base_axes[:-2], base_axes[-1]
        return {"base": self._base_axes(base_axes), "k": lead + (None, ax_kv),
                "v": lead + (None, ax_kv)}


@flax.struct.dataclass
class PrefixMLP(_Prefix):
    """Re-parameterised prefix (PEFT's prefix_projection): emb [n, d] -> w1 [d, h], b1 [h] ->
    tanh -> w2 [h, L*2*kv_dim], b2 [L*2*kv_dim], laid out as [n, L, (k, v), kv_dim]."""
    base: Any
    emb: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def prefix_kv(self):
        num_layers, kv_dim = self.base.shape[0], self.base.shape[-1]
        h = jnp.tanh(self.emb @ self.w1 + self.b1)
        out = (h @ self.w2 + self.b2).reshape(self.emb.shape[0], num_layers, 2, kv_dim)
        out = jnp.transpose(out, (2, 1, 0, 3))  # [2, L, n, kv_dim]
        return out[0], out[1]

    def trainable_fields(self):
        return ("emb", "w1", "b1", "w2", "b2")

    def field_axes(self, base_axes):
        return {"base": self._base_axes(base_axes), "emb": (None, None), "w1": (None, None),
                "b1": (None,), "w2": (None, None), "b2": (None,)}


PREFIX_PATH = ("layers", "attn", "k_proj", "kernel")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def apply_prefix_tuning(params: Any, key: jax.Array, *, num_virtual_tokens: int = 20,
                        projection: bool = False, projection_hidden: Optional[int] = None,
                        token_dim: Optional[int] = None, init_std: float = 1.0,
                        dtype=None) -> Any:
    """Adds a trainable key/value prefix of n slots to every layer (see module doc).

    Direct: k, v ~ N(0, init_std) (PEFT's nn.Embedding default is N(0, 1)); see
    `prefix_from_tokens` for an initialisation from real activations (Li & Liang sec. 5).
    projection: the MLP re-parameterisation, hidden size `projection_hidden` (default
    token_dim), with torch nn.Linear's default init and emb ~ N(0, init_std).
    """
    n = int(num_virtual_tokens)
    if n < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    base = _get(params, PREFIX_PATH)
    if isinstance(base, _Prefix):
        raise ValueError("layers/attn/k_proj/kernel already holds a prefix; apply it once")
    if len(base.shape) != 3:
        raise ValueError(f"prefix tuning expects stacked layers (k_proj kernel [L, D, kv_dim]), "
                         f"got shape {base.shape}")
    num_layers, _, kv_dim = base.shape
    dt = dtype or jnp.float32
    kk, kv, k1, k2, kb1, kb2 = jax.random.split(key, 6)
    if not projection:
        shape = (num_layers, n, kv_dim)
        w = PrefixKV(base=base,
                     k=(init_std * jax.random.normal(kk, shape, jnp.float32)).astype(dt),
                     v=(init_std * jax.random.normal(kv, shape, jnp.float32)).astype(dt))
    else:
        d = int(token_dim or kv_dim)
        h = int(projection_hidden or d)
        out_dim = num_layers * 2 * kv_dim
        uni = lambda k, shape, fan_in: jax.random.uniform(
            k, shape, jnp.float32, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in)).astype(dt)
        w = PrefixMLP(base=base,
                      emb=(init_std * jax.random.normal(kk, (n, d), jnp.float32)).astype(dt),
                      w1=uni(k1, (d, h), d), b1=uni(kb1, (h,), d),
                      w2=uni(k2, (h, out_dim), h), b2=uni(kb2, (out_dim,), h))
    return _set(params, PREFIX_PATH, w)


def prefix_param_count(cfg: ModelConfig, n: int, projection: bool = False,
                       token_dim: Optional[int] = None, hidden: Optional[int] = None) -> int:
    """Trainable parameters of prefix tuning (the formulas of the module doc)."""
    kv, num_layers = cfg.kv_size, cfg.num_layers
    if not projection:
        return n * num_layers * 2 * kv
    d = token_dim or kv
    h = hidden or d
    return n * d + d * h + h + h * 2 * num_layers * kv + 2 * num_layers * kv


def split_prefix(params: Any) -> tuple[Any, jax.Array, jax.Array]:
    """(params with the plain k_proj kernel back, k [L, n, kv_dim], v [L, n, kv_dim])."""
    w = _get(params, PREFIX_PATH)
    if not isinstance(w, _Prefix):
        raise ValueError("prefix_apply needs params from apply_prefix_tuning "
                         f"(layers/attn/k_proj/kernel is a {type(w).__name__})")
    k, v = w.prefix_kv()
    return _set(params, PREFIX_PATH, w.base), k, v


def _empty_cache(cfg: ModelConfig, batch: int, slots: int, dtype) -> dict:
    """An empty KV cache of `slots` slots, laid out as `ftjax.models.init_cache` makes it
    (k, v [L, B, slots, kv_heads, head_dim]; segment ids [B, slots]; fill index)."""
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, slots), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def prefix_from_tokens(params: Any, cfg: ModelConfig, token_ids: Sequence[int], *,
                       base_apply: ApplyFn) -> Any:
    """Sets a direct prefix to the keys/values the base model computes for `token_ids` (one
    slot per id, positions 0..n-1, RoPE already applied), i.e. the KV cache of a real prefill
    (Li & Liang's initialisation from real words; PEFT's Cartridge)."""
    base_params, k0, _ = split_prefix(params)
    w = _get(params, PREFIX_PATH)
    if not isinstance(w, PrefixKV):
        raise ValueError("prefix_from_tokens sets a direct prefix (projection=False)")
    ids = jnp.asarray(token_ids, jnp.int32)[None]
    n = ids.shape[1]
    if n != k0.shape[1]:
        raise ValueError(f"got {n} token ids for a prefix of {k0.shape[1]} slots")
    cache = _empty_cache(cfg, 1, n, jnp.dtype(cfg.dtype))
    _, aux = base_apply(base_params, cfg, ids, cache=cache)
    flat = lambda x: x[:, 0].reshape(cfg.num_layers, n, cfg.kv_size).astype(w.k.dtype)
    return _set(params, PREFIX_PATH, w.replace(k=flat(aux["cache"]["k"]),
                                               v=flat(aux["cache"]["v"])))


def prefix_apply(params: Any, cfg: ModelConfig, tokens: jax.Array, *, base_apply: ApplyFn,
                 positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
                 cache: Optional[dict] = None, segments: int = 1, **kw):
    """`base_apply` (the model's apply) with every layer's keys/values preceded by the
    trained prefix. Bind base_apply with `functools.partial` to get an apply function.

    Real tokens keep positions 0.. (the prefix takes cache slots, not positions).
    """
    base_params, pk, pv = split_prefix(params)
    n, kc = pk.shape[1], int(segments)
    b, t = tokens.shape
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    dtype = jnp.dtype(cfg.dtype) if cache is None else cache["k"].dtype

    if cache is not None and CACHE_MARK in cache:  # decoding after the prefix was written
        slots = cache[CACHE_MARK]
        if positions is None:
            positions = jnp.broadcast_to(cache["index"] - slots + jnp.arange(t), (b, t))
        logits, aux = base_apply(base_params, cfg, tokens, positions=positions,
                                 segment_ids=seg, cache=_strip_mark(cache), **kw)
        aux["cache"][CACHE_MARK] = slots
        return logits, aux

    def slots_of(x):  # [L, n, kv_dim] -> [L, B, kc*n, Kv, hd]
        x = x.reshape(cfg.num_layers, n, cfg.num_kv_heads, cfg.dim_per_head).astype(dtype)
        x = jnp.tile(x, (1, kc, 1, 1))
        return jnp.broadcast_to(x[:, None], (cfg.num_layers, b) + x.shape[1:])

    pseg = prefix_segment_ids(seg, n, kc)
    if cache is None:
        empty = _empty_cache(cfg, b, t, dtype)
        start = 0
    else:
        _check_fresh(cache)
        empty, start = cache, cache["index"]
    if positions is None:
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    full = {"k": jnp.concatenate([slots_of(pk), empty["k"]], axis=2),
            "v": jnp.concatenate([slots_of(pv), empty["v"]], axis=2),
            "segment_ids": jnp.concatenate([pseg, empty["segment_ids"]], axis=1),
            "index": start + kc * n}
    logits, aux = base_apply(base_params, cfg, tokens, positions=positions, segment_ids=seg,
                             cache=full, **kw)
    if cache is None:
        aux.pop("cache")
    else:
        aux["cache"][CACHE_MARK] = jnp.asarray(kc * n, jnp.int32)
    return logits, aux


# ------------------------------------------------------------------------------------------
# Config entry points
# ------------------------------------------------------------------------------------------

PROMPT_DEFAULTS = dict(
    num_virtual_tokens=20,     # n virtual tokens
    init="random",             # random | text | vocab (see apply_prompt_tuning)
    init_std=0.0,              # random: N(0, init_std); 0: the embedding table's std
    init_text="",              # text: tokenized with the run's tokenizer (get_method's) ...
    init_token_ids=(),         # ... or explicit ids instead
    segments=1,                # prompt copies per packed row (see module doc)
    train_patterns=(),
)
PREFIX_DEFAULTS = dict(
    num_virtual_tokens=20,     # n prefix slots per layer
    projection=False,          # re-parameterise through an MLP (PEFT's prefix_projection)
    projection_hidden=0,       # its hidden size; 0: token_dim
    token_dim=0,               # its embedding width; 0: kv_dim
    init_std=1.0,              # k, v (or emb) ~ N(0, init_std)
    segments=1,                # prefix copies per packed row (see module doc)
    train_patterns=(),
)


def _init_token_ids(s, tokenizer) -> Optional[list[int]]:
    """The ids a text init starts from: init_token_ids, else init_text tokenized."""
    if s.init_token_ids:
        return [int(i) for i in s.init_token_ids]
    if s.init != "text":
        return None
    if not s.init_text:
        raise ValueError("peft.init='text' needs peft.init_text (or peft.init_token_ids)")
    if tokenizer is None:
        raise ValueError("peft.init='text' tokenizes peft.init_text with the run's tokenizer: "
                         "call ftjax.peft.get_method(pcfg, apply_fn=..., tokenizer=tok) (or "
                         "give peft.init_token_ids)")
    return list(tokenizer.encode(str(s.init_text)))


def prompt_method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """prompt_tuning from a resolved `peft` section (configs/prompt_sft.py)."""
    base_apply = require_apply_fn("prompt_tuning", apply_fn)
    init_std = float(s.init_std) or None  # 0: the embedding table's std
    transform = functools.partial(
        apply_prompt_tuning, num_virtual_tokens=int(s.num_virtual_tokens), init=str(s.init),
        init_token_ids=_init_token_ids(s, tokenizer), init_std=init_std)
    fn = functools.partial(prompt_apply, base_apply=base_apply, segments=int(s.segments))
    return Method(name="prompt_tuning", transform=transform,
                  train_patterns=tuple(s.train_patterns), apply_fn=fn)


def prefix_method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """prefix_tuning from a resolved `peft` section (configs/prefix_sft.py)."""
    del tokenizer
    base_apply = require_apply_fn("prefix_tuning", apply_fn)
    transform = functools.partial(
        apply_prefix_tuning, num_virtual_tokens=int(s.num_virtual_tokens),
        projection=bool(s.projection), projection_hidden=int(s.projection_hidden) or None,
        token_dim=int(s.token_dim) or None, init_std=float(s.init_std))
    fn = functools.partial(prefix_apply, base_apply=base_apply, segments=int(s.segments))
    return Method(name="prefix_tuning", transform=transform,
                  train_patterns=tuple(s.train_patterns), apply_fn=fn)


register("prompt_tuning", PROMPT_DEFAULTS, prompt_method,
         dict(num_virtual_tokens=">= 1", init=PROMPT_INITS, init_std=">= 0", segments=">= 1"))
register("prefix_tuning", PREFIX_DEFAULTS, prefix_method,
         dict(num_virtual_tokens=">= 1", projection_hidden=">= 0", token_dim=">= 0",
              init_std=">= 0", segments=">= 1"))
