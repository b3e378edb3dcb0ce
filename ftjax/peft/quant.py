"""Quantized frozen bases as structured weights: NF4 (QLoRA) and per-channel int8.

NF4 (Dettmers et al. 2023, "QLoRA"), as bitsandbytes stores it:
  * blocks of 64 weights, each scaled by its absmax and rounded to the nearest of the 16
    NormalFloat levels (`NF4_CODEBOOK`, bitsandbytes' table), packed two codes per uint8 with
    the first element in the high nibble;
  * double quantization of the absmax values (the per-tensor mean subtracted, then 8-bit
    codes of bitsandbytes' signed dynamic map over blocks of 256 absmax values, each block
    with a float32 absmax), i.e. 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.

Layout. ftjax kernels are [in, out], the transpose of torch's [out, in]; bitsandbytes' blocks
run along the flattened torch weight, i.e. along `in` for each output. We keep exactly those
blocks: `codes` is [.., in/2, out] (pairs along `in`), the block absmax [.., in/64, out], and
the 256-blocks of the double quantization follow bitsandbytes' order (per output, its `in`
blocks). So when `in % 64 == 0`, `codes` transposed to [out, in/2] is bitsandbytes' packed
byte stream and the absmax blocks coincide (not checked bit-for-bit against bitsandbytes,
which needs a GPU). When `in % 64 != 0` each column is zero-padded to whole blocks
(bitsandbytes lets blocks run across rows instead). Leading stacked dims ([layers, ...]) are
kept, so lax.scan slices every field per layer; the per-tensor mean is per [in, out] matrix.

Int8: per-output-channel absmax (LLM.int8's vector-wise weight quantization without the
outlier decomposition): codes int8 [.., in, out], one float32 scale per output.

`matmul` dequantizes inside the traced product (the dense block is an XLA temporary, never a
param); `materialize` returns the dequantized dense weight. Nothing here trains.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft.core import StructuredWeight, expert_linear, select_targets

# The 16 NormalFloat-4 levels, verbatim from bitsandbytes (`get_4bit_type("nf4")`, the table in
# csrc/kernels.cu): quantiles of N(0, 1) (create_normal_map(offset=0.9677083)) scaled to
# [-1, 1], asymmetric (8 positive levels, 7 negative) so that 0 is exact.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' `create_dynamic_map`: the 256-value dynamic-tree 8-bit code (Dettmers 2015,
    "8-bit approximations for parallelism"), sorted; used for the double quantization."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = np.linspace(0.1, 1, n, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = np.linspace(0.1, 1, additional_items + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2 ** total_bits
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), dtype=np.float32)


DYNAMIC_MAP = dynamic_map()


def _midpoints(code: np.ndarray) -> np.ndarray:
    return ((code[:-1].astype(np.float64) + code[1:]) / 2).astype(np.float32)


def nearest_code(x: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest value of a sorted code for every x (ties go to the lower value,
    as bitsandbytes' `x > midpoint` decision tree does)."""
    return jnp.searchsorted(jnp.asarray(_midpoints(code)), x, side="left")


def _product(x: jax.Array, w: StructuredWeight, group_sizes, experts: bool) -> jax.Array:
    """x @ deq(w), dequantizing inside the traced product: the dense weight of one matrix (one
    layer's slice under lax.scan) is an XLA temporary of this op, never a param or a residual.
    experts False: x [.., in] times [in, out]; True: `expert_linear` over [E, in, out]
    (group_sizes None: batched x [E, C, in]; [E] int32: ragged rows x [N, in])."""
    if experts:
        return expert_linear(x, w.dequantize(x.dtype), group_sizes, x.dtype)
    if isinstance(w, Int8Weight):
        return w._matmul(x)
    return jnp.einsum("...i,io->...o", x, w.dequantize(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _quantized_product(x, w, group_sizes, experts):
    return _product(x, w, group_sizes, experts)


def _quantized_product_fwd(x, w, group_sizes, experts):
    # Residuals: the quantized fields as stored (codes and block scales), not x (the product
    # is linear in x) and never the dequantized weight.
    return _product(x, w, group_sizes, experts), (w, group_sizes)


def _quantized_product_bwd(experts, res, g):
    # The frozen base needs no gradient, so the backward only dequantizes again and multiplies:
    # dx is the transpose of the forward product in x (what autodiff of dequantize-then-matmul
    # gives for x); the quantized fields get zero cotangents, and no [in, out] weight-gradient
    # product is formed even when the base is differentiated. (bitsandbytes' MatMul4Bit does
    # the same.) x's shape: g's with the last axis the weight's `in`; its dtype is g's.
    w, group_sizes = res
    x_aval = jax.ShapeDtypeStruct(g.shape[:-1] + (w.shape[-2],), g.dtype)
    product = lambda x: _product(x, w, group_sizes, experts)
    if not experts:
        (dx,) = jax.linear_transpose(product, x_aval)(g)
    else:  # grouped products may carry their own custom VJP (no transpose rule): the VJP at
        # x = 0 (the product is linear in x); its unused forward and the weight cotangent it
        # may compute are dead code that XLA removes under jit
        dx = jax.vjp(product, jnp.zeros(x_aval.shape, x_aval.dtype))[1](g)[0]
    return dx, None, None


_quantized_product.defvjp(_quantized_product_fwd, _quantized_product_bwd)


def _dequant_matmul(x: jax.Array, w: StructuredWeight) -> jax.Array:
    """x [.., in] @ deq(w) [in, out]; the backward dequantizes again (`_quantized_product_bwd`),
    so under lax.scan no dense copy of any layer is kept for the backward pass."""
    return _quantized_product(x, w, None, False)


def _dequant_expert_matmul(x: jax.Array, w: StructuredWeight, group_sizes) -> jax.Array:
    """Per-expert product with dequantized stacked experts [E, in, out] (`expert_linear`),
    with the same backward as `_dequant_matmul`."""
    return _quantized_product(x, w, group_sizes, True)


def _safe(s: jax.Array) -> jax.Array:
    return jnp.where(s == 0, jnp.ones_like(s), s)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------
# NF4
# ------------------------------------------------------------------------------------------

@flax.struct.dataclass
class NF4Weight(StructuredWeight):
    """A frozen [.., in, out] weight in 4-bit NormalFloat with double-quantized block scales.

    codes:         uint8 [.., in_pad/2, out], two NF4 indices per byte (first in high nibble)
    absmax:        uint8 [.., in_pad/64, out] dynamic-map codes of (block absmax - offset)
                   with double quantization, else float32 block absmax
    absmax_scale:  float32 [.., ceil(n_blocks/256)] absmax of each 256-block of centred
                   absmax values (None without double quantization)
    absmax_offset: float32 [..] the mean block absmax of each matrix (None without)
    """
    codes: jax.Array
    absmax: jax.Array
    absmax_scale: Optional[jax.Array] = None
    absmax_offset: Optional[jax.Array] = None
    n_in: int = flax.struct.field(pytree_node=False, default=0)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    block_size: int = flax.struct.field(pytree_node=False, default=64)
    block_size2: int = flax.struct.field(pytree_node=False, default=256)

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every 64-block, [.., in_pad/64, out]."""
        if not self.double_quant:
            return self.absmax.astype(jnp.float32)
        q = self.absmax
        *lead, nb, n_out = q.shape
        n = nb * n_out
        flat = jnp.swapaxes(q, -1, -2).reshape(*lead, n)  # bitsandbytes' block order
        ng = self.absmax_scale.shape[-1]
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, ng * self.block_size2 - n)])
        vals = jnp.asarray(DYNAMIC_MAP)[flat.reshape(*lead, ng, self.block_size2)]
        vals = (vals * self.absmax_scale[..., None]).reshape(*lead, ng * self.block_size2)
        vals = jnp.swapaxes(vals[..., :n].reshape(*lead, n_out, nb), -1, -2)
        return vals + self.absmax_offset[..., None, None]

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense [.., in, out] weight (computed in float32, cast to `dtype`)."""
        return _dequantize_nf4(self, jnp.dtype(dtype or self.dtype).name)

    def _dequantize(self, dtype: str) -> jax.Array:
        *lead, half, n_out = self.codes.shape
        hi = (self.codes >> 4).astype(jnp.int32)
        lo = (self.codes & 0xF).astype(jnp.int32)
        idx = jnp.stack([hi, lo], axis=-2).reshape(*lead, 2 * half, n_out)
        vals = jnp.asarray(NF4_CODEBOOK)[idx]
        nb = 2 * half // self.block_size
        w = vals.reshape(*lead, nb, self.block_size, n_out) * self.block_absmax()[..., None, :]
        w = w.reshape(*lead, 2 * half, n_out)[..., :self.n_in, :]
        return w.astype(dtype)

    def matmul(self, x):
        return _dequant_matmul(x, self)

    def expert_matmul(self, x, group_sizes):
        return _dequant_expert_matmul(x, self, group_sizes)

    def lookup(self, ids):
        """Rows of an (unstacked) [vocab, embed] table, dequantizing only the rows looked up."""
        if self.codes.ndim != 2:
            return super().lookup(ids)
        byte = jnp.take(self.codes, ids // 2, axis=0)
        idx = jnp.where((ids % 2 == 0)[..., None], byte >> 4, byte & 0xF).astype(jnp.int32)
        scale = jnp.take(self.block_absmax(), ids // self.block_size, axis=0)
        return (jnp.asarray(NF4_CODEBOOK)[idx] * scale).astype(self.dtype)

    def materialize(self):
        return self.dequantize()

    def num_params(self) -> int:
        if self.codes is None:  # the trainable half of a partition: nothing here trains
            return 0
        *lead, _, n_out = self.codes.shape
        return int(np.prod(lead, dtype=np.int64)) * self.n_in * n_out

    def field_axes(self, base_axes):
        # Codes shard like the dense weight (the packed `in` dim is `in`/2 contiguous pairs);
        # block scales shard on the output axis only (in/64 rarely divides an fsdp mesh),
        # and the tiny double-quantization statistics are replicated.
        lead, ax_in, ax_out = tuple(base_axes[:-2]), base_axes[-2], base_axes[-1]
        return {"codes": lead + (ax_in, ax_out), "absmax": lead + (None, ax_out),
                "absmax_scale": None if self.absmax_scale is None else lead + (None,),
                "absmax_offset": None if self.absmax_offset is None else lead}


_dequantize_nf4 = jax.jit(NF4Weight._dequantize, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant", "block_size2"))
def quantize_nf4(w: jax.Array, *, block_size: int = 64, double_quant: bool = True,
                 block_size2: int = 256) -> NF4Weight:
    """NF4-quantizes a dense [.., in, out] weight (jitted; see the module docstring)."""
    if w.ndim < 2:
        raise ValueError(f"NF4 quantizes matrices [.., in, out]; got shape {w.shape}")
    if block_size % 2:
        raise ValueError(f"block_size must be even (two codes per byte), got {block_size}")
    *lead, n_in, n_out = w.shape
    nb = _ceil_div(n_in, block_size)
    pad = [(0, 0)] * len(lead)
    w32 = jnp.pad(w.astype(jnp.float32), pad + [(0, nb * block_size - n_in), (0, 0)])
    blocks = w32.reshape(*lead, nb, block_size, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)                               # [.., nb, out]
    idx = nearest_code(blocks / _safe(absmax)[..., None, :], NF4_CODEBOOK).astype(jnp.uint8)
    idx = idx.reshape(*lead, nb * block_size // 2, 2, n_out)
    codes = (idx[..., 0, :] << 4) | idx[..., 1, :]
    kw = dict(n_in=n_in, dtype=jnp.dtype(w.dtype).name, block_size=block_size,
              block_size2=block_size2)
    if not double_quant:
        return NF4Weight(codes=codes, absmax=absmax, **kw)
    # Double quantization (QLoRA §3, bitsandbytes `compress_statistics`): subtract the mean
    # absmax of the tensor, then 8-bit blockwise quantization of the centred values.
    offset = jnp.mean(absmax, axis=(-2, -1))
    n = nb * n_out
    ng = _ceil_div(n, block_size2)
    flat = jnp.swapaxes(absmax - offset[..., None, None], -1, -2).reshape(*lead, n)
    groups = jnp.pad(flat, pad + [(0, ng * block_size2 - n)]).reshape(*lead, ng, block_size2)
    scale2 = jnp.max(jnp.abs(groups), axis=-1)                               # [.., ng]
    q = nearest_code(groups / _safe(scale2)[..., None], DYNAMIC_MAP).astype(jnp.uint8)
    q = jnp.swapaxes(q.reshape(*lead, ng * block_size2)[..., :n].reshape(*lead, n_out, nb),
                     -1, -2)
    return NF4Weight(codes=codes, absmax=q, absmax_scale=scale2, absmax_offset=offset, **kw)


# ------------------------------------------------------------------------------------------
# Int8
# ------------------------------------------------------------------------------------------

@flax.struct.dataclass
class Int8Weight(StructuredWeight):
    """A frozen [.., in, out] weight as int8 codes with one float32 absmax/127 per output."""
    codes: jax.Array
    scale: jax.Array
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def dequantize(self, dtype=None) -> jax.Array:
        return _dequantize_int8(self, jnp.dtype(dtype or self.dtype).name)

    def _dequantize(self, dtype: str) -> jax.Array:
        return (self.codes.astype(jnp.float32) * self.scale[..., None, :]).astype(dtype)

    def matmul(self, x):
        return _dequant_matmul(x, self)

    def expert_matmul(self, x, group_sizes):
        return _dequant_expert_matmul(x, self, group_sizes)

    def _matmul(self, x):
        dt = x.dtype  # integer codes are exact in bf16/f16; scale the product, not the weight
        return jnp.einsum("...i,io->...o", x, self.codes.astype(dt)) * self.scale.astype(dt)

    def lookup(self, ids):
        if self.codes.ndim != 2:
            return super().lookup(ids)
        return (jnp.take(self.codes, ids, axis=0).astype(jnp.float32) * self.scale
                ).astype(self.dtype)

    def materialize(self):
        return self.dequantize()

    def num_params(self) -> int:
        return 0 if self.codes is None else int(self.codes.size)  # the scales are storage

    def field_axes(self, base_axes):
        return {"codes": tuple(base_axes), "scale": tuple(base_axes[:-2]) + (base_axes[-1],)}


_dequantize_int8 = jax.jit(Int8Weight._dequantize, static_argnums=1)


@jax.jit
def quantize_int8(w: jax.Array) -> Int8Weight:
    """Symmetric per-output-channel int8: q = round(127 w / absmax_col)."""
    if w.ndim < 2:
        raise ValueError(f"int8 quantizes matrices [.., in, out]; got shape {w.shape}")
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=-2) / 127.0
    codes = jnp.clip(jnp.round(w32 / _safe(scale)[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Weight(codes=codes, scale=scale, dtype=jnp.dtype(w.dtype).name)


# ------------------------------------------------------------------------------------------
# Transforms and reports
# ------------------------------------------------------------------------------------------

QUANTIZED = (NF4Weight, Int8Weight)
KINDS = ("nf4", "int8")
# Every attention and MLP projection (QLoRA quantizes all linear layers; embeddings and the
# head stay in the compute dtype).
DEFAULT_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel", r"layers/mlp/(gate|up|down)_proj/kernel")


def quantize(w: jax.Array, kind: str = "nf4", **kw) -> StructuredWeight:
    """One dense weight to an NF4Weight (`block_size`, `double_quant`) or an Int8Weight."""
    if kind == "nf4":
        return quantize_nf4(w, **kw)
    if kind == "int8":
        if kw:
            raise ValueError(f"int8 quantization takes no options, got {sorted(kw)}")
        return quantize_int8(w)
    raise ValueError(f"unknown quantization kind {kind!r}; choose one of {KINDS}")


def quantize_params(params: Any, targets: Sequence[str] = DEFAULT_TARGETS, kind: str = "nf4",
                    **kw) -> Any:
    """Replaces every dense weight whose path fully matches a `targets` regex by its
    quantized form. Raises if nothing matches (listing the weight paths)."""
    return select_targets(params, targets, lambda path, w, k: quantize(w, kind, **kw),
                          name="quantization")


def _quantized_leaves(params: Any) -> list:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QUANTIZED))
    return [x for x in leaves if isinstance(x, QUANTIZED)]


def _dense_size(w: StructuredWeight) -> int:
    if isinstance(w, NF4Weight):
        *lead, _, n_out = w.codes.shape
        return math.prod(lead) * w.n_in * n_out
    return int(np.prod(w.codes.shape))


def bits_per_param(params: Any) -> float:
    """Storage of the quantized base weights (codes + all scales, in bits) per original
    parameter, over every NF4Weight/Int8Weight in the tree (also nested under adapters).
    NF4 with double quantization: 4 + 8/64 + 32/(64*256) = 4.127 (plus 32 bits per matrix for
    the offset); without it 4.5; int8: 8 + 32/in."""
    leaves = _quantized_leaves(params)
    if not leaves:
        raise ValueError("no quantized weights in the tree (run quantize_params first)")
    nbytes = sum(x.size * jnp.dtype(x.dtype).itemsize for w in leaves
                 for x in jax.tree.leaves(w))
    return 8.0 * nbytes / sum(_dense_size(w) for w in leaves)


def relative_rms_error(w: jax.Array, q: StructuredWeight) -> float:
    """||W - deq(Q)||_F / ||W||_F."""
    w = w.astype(jnp.float32)
    return float(jnp.linalg.norm(w - q.materialize().astype(jnp.float32)) / jnp.linalg.norm(w))

