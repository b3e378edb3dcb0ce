"""Building blocks of the decoder: norms, rotary embeddings, masks, attention and MLPs.

All functions are pure: params come in as dicts of arrays (or structured weights), the config
is static. Weight products go through `ftjax.peft.core.linear`, so transforms apply unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import splash
from ftjax.models.config import ModelConfig
from ftjax.peft.core import linear

Params = dict[str, Any]


def norm(p: Params, x: jax.Array, cfg: ModelConfig, eps: Optional[float] = None) -> jax.Array:
    """RMSNorm or LayerNorm, computed in float32, with Gemma's (offset + w) scale if configured."""
    eps = cfg.norm_eps if eps is None else eps
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if cfg.norm == "layer":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    scale = p["scale"].astype(jnp.float32) + cfg.norm_offset
    x = x * scale
    if "bias" in p:
        x = x + p["bias"].astype(jnp.float32)
    return x.astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of RoPE, with linear or llama3 (Llama 3.1 paper, sec. 3) scaling."""
    d = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
        # band in between is interpolated smoothly.
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotates x [B, T, heads, head_dim] by position, in the half-split (GPT-NeoX / HF) layout."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_slots: jax.Array, k_slots: jax.Array, q_seg: jax.Array, k_seg: jax.Array,
                   cfg: ModelConfig) -> jax.Array:
    """Boolean mask [B, 1, T, S]: causal over slots, same segment, within the sliding window.

    Slots are indices in the (cached) sequence; segment ids separate packed documents and mark
    padding (id 0 only matches padding, so real tokens never attend to it). q_slots is [T], or
    [B, T] when each row sits at its own cache offset (a per-row cache index, for continuous
    batching).
    """
    q = q_slots if q_slots.ndim == 2 else q_slots[None]                   # [1 or B, T]
    causal = k_slots[None, None, :] <= q[:, :, None]                      # [1 or B, T, S]
    if cfg.sliding_window is not None:
        causal &= (q[:, :, None] - k_slots[None, None, :]) < cfg.sliding_window
    same_seg = q_seg[:, :, None] == k_seg[:, None, :]                     # [B, T, S]
    return (causal & same_seg)[:, None]


def mask_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask -> additive float32 bias (0 where attending, a large negative elsewhere).

    Built once per forward and added to the scores of every layer (cheaper than a select)."""
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def write_cache(buf: jax.Array, x: jax.Array, index) -> jax.Array:
    """buf [B, S, ...] with x [B, T, ...] written at slot `index`: a scalar (every row at the
    same offset) or [B] (each row at its own offset)."""
    x = x.astype(buf.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buf, x, (0, index) + (0,) * (buf.ndim - 2))
    return jax.vmap(lambda b, v, i: jax.lax.dynamic_update_slice(
        b, v, (i,) + (0,) * (b.ndim - 1)))(buf, x, index)


def attention(p: Params, x: jax.Array, positions: jax.Array, mask: jax.Array,
              cfg: ModelConfig, cache: Optional[dict] = None, cache_index=None,
              segment_ids: Optional[jax.Array] = None):
    """Grouped-query self-attention. Returns (output [B, T, D], updated layer cache or None).

    mask: the boolean or additive [B, 1, T, S] mask (`attention_mask`); segment_ids [B, T]:
    the ids it was built from, needed by the `splash` core (which takes the structure, not
    the mask)."""
    b, t, _ = x.shape
    hd, nh, nkv = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
    dt = x.dtype

    def proj(name, heads):
        y = linear(x, p[name]["kernel"], dt)
        if "bias" in p[name]:
            y = y + p[name]["bias"].astype(dt)
        return y.reshape(b, t, heads, hd)

    q, k, v = proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)
    if cfg.qk_norm:
        q = norm(p["q_norm"], q, cfg)
        k = norm(p["k_norm"], k, cfg)
    if cfg.position == "rope":
        q = apply_rope(q, positions, cfg)
        k = apply_rope(k, positions, cfg)

    new_cache = None
    if cache is not None:
        k_all = write_cache(cache["k"], k, cache_index)
        v_all = write_cache(cache["v"], v, cache_index)
        new_cache = {"k": k_all, "v": v_all}
        k, v = k_all.astype(dt), v_all.astype(dt)

    scale = cfg.attn_scale if cfg.attn_scale is not None else hd ** -0.5
    if mask.dtype == jnp.bool_:
        mask = mask_bias(mask)
    impl = attention_impl(cfg, t, k.shape[1], cached=cache is not None)
    if impl == "splash":
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        out = splash.core(q, k, v, segment_ids, scale, cfg)
    else:
        out = ATTENTION_CORES[impl](q, k, v, mask, scale, cfg)
    out = out.reshape(b, t, nh * hd)
    out = linear(out, p["o_proj"]["kernel"], dt)
    if "bias" in p["o_proj"]:
        out = out + p["o_proj"]["bias"].astype(dt)
    return out, new_cache


# ------------------------------------------------------------------------------------------
# The attention core: softmax(q k^T * scale + bias) v over q [B, T, H, hd], k, v [B, S, K, hd].
# Four implementations of the same function, chosen by `cfg.attention_impl` (docs/performance.md):
#   xla      the reference: full [B, K, G, T, S] scores, one einsum each way.
#   blocked  query blocks of `cfg.attention_block` rows; each attends only to the key range its
#            causal (and sliding-window) mask can reach, so the fully masked blocks above the
#            diagonal are never computed. Head-major layout. Same numbers as xla up to float32
#            round-off; about 2x cheaper forward and backward on CPU at T = 512.
#   cudnn    `jax.nn.dot_product_attention`: cuDNN's fused (flash) kernel on GPU; elsewhere the
#            same call runs JAX's XLA implementation, which is how CPU tests check it agrees.
#   splash   Pallas splash attention (`models/splash.py`): the TPU flash kernel, given the mask's
#            structure (causal / window + segment ids); interpret mode off TPU, for tests.
# "auto" picks splash on TPU and cudnn on GPU for 16-bit compute (where the shapes suit the
# kernel), blocked for self-attention without a cache elsewhere, and xla for cached (decoding)
# steps. A cached step never uses blocked or splash (they assume T == S self-attention).
# ------------------------------------------------------------------------------------------

def attention_impl(cfg: ModelConfig, t: int, s: int, cached: bool) -> str:
    """The core `cfg.attention_impl` resolves to for T queries over S keys."""
    impl = cfg.attention_impl
    if impl != "auto":
        return impl if not (cached and impl in ("blocked", "splash")) else "xla"
    backend, half = jax.default_backend(), jnp.dtype(cfg.dtype).itemsize == 2
    if backend == "tpu" and splash.supported(t, s, cfg.dim_per_head, cached):
        return "splash"
    if backend == "gpu" and half and not cached:
        return "cudnn"
    if cached or t != s or t <= cfg.attention_block:
        return "xla"
    return "blocked"


def _core_xla(q, k, v, bias, scale, cfg):
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, nkv, nh // nkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias[:, :, None], axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def key_spans(t: int, block: int, window: Optional[int]) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) per query block: the keys a causal (windowed) mask
    lets that block see. Self-attention over the same T slots (no cache)."""
    spans = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        k0 = 0 if window is None else max(0, q0 - window + 1)
        spans.append((q0, q1, k0, q1))
    return spans


def _core_blocked(q, k, v, bias, scale, cfg):
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    # Head-major: [B, K, G, T, hd] queries, [B, K, S, hd] keys and values.
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, nkv, nh // nkv, hd)
    qh = qh.transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    outs = []
    for q0, q1, k0, k1 in key_spans(t, cfg.attention_block, cfg.sliding_window):
        scores = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, q0:q1], kh[:, :, k0:k1],
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias[:, :, None, q0:q1, k0:k1], axis=-1)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), vh[:, :, k0:k1]))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4)


def _core_cudnn(q, k, v, bias, scale, cfg):
    on_gpu = jax.default_backend() == "gpu"
    out = jax.nn.dot_product_attention(q, k, v, mask=bias == 0, scale=scale,
                                       implementation="cudnn" if on_gpu else "xla")
    return out


ATTENTION_CORES = {"xla": _core_xla, "blocked": _core_blocked, "cudnn": _core_cudnn}


def activation(x: jax.Array, name: str) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def mlp(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gated (SwiGLU / GeGLU) or plain (GPT-2) feed-forward block."""
    dt = x.dtype

    def proj(name, h):
        y = linear(h, p[name]["kernel"], dt)
        return y + p[name]["bias"].astype(dt) if "bias" in p[name] else y

    if cfg.mlp == "gated":
        h = activation(proj("gate_proj", x), cfg.activation) * proj("up_proj", x)
    else:
        h = activation(proj("up_proj", x), cfg.activation)
    return proj("down_proj", h)
