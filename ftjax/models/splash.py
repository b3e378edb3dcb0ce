"""The TPU attention core: Pallas splash attention over ftjax's mask.

ftjax's attention mask is always "causal over slots (within a sliding window) and same segment
id" (`layers.attention_mask`), which is exactly what splash attention takes as structure: a
causal or local mask built once at trace time plus per-token segment ids. Fully masked key
blocks are skipped by the kernel, forward and backward.

On TPU this runs the compiled Pallas kernel. Elsewhere the same kernel runs in Pallas' interpret
mode (slow; it is how CPU tests check it agrees with the `xla` core). Under a device mesh that
is set during tracing (`jax.sharding.use_abstract_mesh`, which `train.step.jit_train_step`
does), the kernel runs per shard through `jax.shard_map`: batch over the data-parallel axes,
kv-head groups over `tensor`; a Pallas call cannot be partitioned by XLA otherwise.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# Mesh axes that split the batch / the heads (names from sharding.rules.MESH_AXES; models does
# not import sharding, tests/test_attention_impls.py checks they stay in step).
BATCH_AXES = ("data", "fsdp", "expert")
HEAD_AXIS = "tensor"


def block_size(t: int) -> int:
    """Rows per splash block: the largest of 512, 256, 128 dividing T (the kernel works on
    128-lane tiles, also in interpret mode)."""
    for b in (512, 256, 128):
        if t % b == 0:
            return b
    raise ValueError(f"attention_impl='splash' needs a sequence length divisible by 128; got "
                     f"{t}. Pad to a multiple of 128 (train.seq_len) or use "
                     f"attention_impl='blocked' (or 'auto', which falls back by itself).")


def supported(t: int, s: int, head_dim: int, cached: bool) -> bool:
    """Whether `auto` may pick splash on TPU for these shapes."""
    return not cached and t == s and t % 128 == 0 and head_dim % 128 == 0


@functools.lru_cache(maxsize=32)
def _kernel(t: int, groups: int, window: Optional[int], interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    if window is None:
        one = sm.CausalMask((t, t))
    else:  # keys k with q - window < k <= q
        one = sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    blk = block_size(t)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                          block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                          block_q_dq=blk, block_kv_dq=blk)
    mask = sm.MultiHeadMask([one] * groups)
    kern = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
    return kern, sk.SegmentIds


def _local(q, k, v, seg, window):
    """q [B, K, G, T, hd] (scaled), k/v [B, K, T, hd], seg [B, T] -> [B, K, G, T, hd]."""
    _, _, g, t, _ = q.shape
    kern, segment_ids = _kernel(t, g, window, jax.default_backend() != "tpu")

    def one_group(qg, kg, vg, s):          # qg [G, T, hd], kg/vg [T, hd]
        return kern(qg, kg, vg, segment_ids=segment_ids(q=s, kv=s))

    per_kv = jax.vmap(one_group, in_axes=(0, 0, 0, None))       # over kv heads
    return jax.vmap(per_kv, in_axes=(0, 0, 0, 0))(q, k, v, seg)  # over the batch


def _mesh_specs(mesh, b: int, nkv: int):
    """The batch axes and head axis to split over, keeping only what divides the shapes."""
    batch, n = [], 1
    for ax in BATCH_AXES:
        size = mesh.shape.get(ax, 1)
        if size > 1 and b % (n * size) == 0:
            batch.append(ax)
            n *= size
    head = HEAD_AXIS if mesh.shape.get(HEAD_AXIS, 1) > 1 and nkv % mesh.shape[HEAD_AXIS] == 0 \
        else None
    return tuple(batch) or None, head


def core(q, k, v, seg, scale, cfg):
    """softmax(q k^T * scale, causal/window + same segment) v.

    q [B, T, H, hd], k/v [B, T, K, hd], seg [B, T] int -> [B, T, H, hd]."""
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, nkv, nh // nkv, hd)
    qh = qh.transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    seg = seg.astype(jnp.int32)
    fn = functools.partial(_local, window=cfg.sliding_window)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        batch, head = _mesh_specs(mesh, b, nkv)
        fn = jax.shard_map(fn, mesh=mesh,
                           in_specs=(P(batch, head), P(batch, head), P(batch, head), P(batch)),
                           out_specs=P(batch, head), check_vma=False)
    out = fn(qh, kh, vh, seg)
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)
