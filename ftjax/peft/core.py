"""The structured-weight protocol and the dispatching ops every weight product goes through.

A param leaf is either a plain array or a *structured weight*: a registered pytree dataclass
(LoRA over a dense base, an NF4-quantized base, ...) that knows how to multiply an input.
The model calls only `linear(x, w)` and `embed(ids, w)`; adding a transform never changes it.
"""
from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


class StructuredWeight(abc.ABC):
    """Protocol for a transformed param leaf.

    Subclasses are registered pytree dataclasses (e.g. with `flax.struct.dataclass`), so that
    scan over stacked layers slices every field along the leading layer axis.
    """

    @abc.abstractmethod
    def matmul(self, x: jax.Array) -> jax.Array:
        """Returns x @ W for x [..., in] and W the logical [in, out] weight."""

    def expert_matmul(self, x: jax.Array, group_sizes: Any) -> jax.Array:
        """Per-expert product for stacked expert weights [E, in, out] (see `expert_linear`).

        The default multiplies by the dense `materialize()`d weight, so every structured weight
        (quantized bases, DoRA) works on experts; subclasses may avoid materialising."""
        return _dense_expert_linear(x, self.materialize(), group_sizes, x.dtype)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Returns rows W[ids] for an embedding table [vocab, embed]."""
        return jnp.take(self.materialize(), ids, axis=0)

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """The dense weight this leaf stands for (for merge and export)."""

    def trainable_fields(self) -> tuple[str, ...]:
        """Names of the fields that receive gradients."""
        return ()

    def field_axes(self, base_axes: tuple) -> dict[str, Any]:
        """Logical axes of every array field, derived from the base weight's axes.

        `base_axes` are the axes of the dense weight this leaf stands for, e.g.
        ("layers", "embed", "heads"); fields that hold structured weights return their own
        axes tree (see `axes_like`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define field_axes")

    def frozen_base(self) -> Any:
        """The frozen weight this adapter sits on, adapters below it unwrapped recursively: a
        plain array or a non-adapter structured weight (e.g. a quantized NF4Weight, which stays
        quantized). Removing every adapter (the DPO reference without a copy,
        `ftjax.align.reference.strip_adapters`) replaces the leaf by this.

        Adapters return `unwrap(self.base)`; weights that are bases themselves (quantized
        weights) or have no separable base keep this default, which raises."""
        raise ValueError(f"{type(self).__name__} is not an adapter over a frozen base (it defines "
                         "no frozen_base()); it cannot be stripped off the model")

    def lora_factors(self) -> Optional[tuple[jax.Array, jax.Array, float]]:
        """(a [.., in, r], b [.., r, out], scale s) when this weight is its `base` field plus
        s * a @ b (LoRA's layout, whichever of a and b train), else None (the default). PEFT
        export writes such weights as lora_A / lora_B whatever their class."""
        return None

    def frozen_base_exact(self) -> bool:
        """True (default) when `frozen_base()` is exactly the weight the model had before the
        transform, so stripping restores the starting model; False when part of the original
        weight moved into other fields (a serial adapter's folded-in projection bias)."""
        return True

    def array_fields(self) -> tuple[str, ...]:
        """Names of the pytree (array or nested structured) fields."""
        return tuple(f.name for f in dataclasses.fields(self)
                     if f.metadata.get("pytree_node", True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.materialize).shape)

    def num_params(self) -> int:
        """The parameters this leaf counts as in a model's size (`count_params`): the elements
        of its array fields, nested structured weights by their own count. Quantized bases
        count the elements of the dense weight they stand for: packed codes and block scales
        are how it is stored, not how many parameters it has."""
        return sum(count_params(getattr(self, name)) for name in self.array_fields())


def is_structured(w: Any) -> bool:
    return isinstance(w, StructuredWeight)


def is_adapter(w: Any) -> bool:
    """True for structured weights that sit on a frozen base (they define `frozen_base`)."""
    return (isinstance(w, StructuredWeight)
            and type(w).frozen_base is not StructuredWeight.frozen_base)


def unwrap(w: Any) -> Any:
    """`w.frozen_base()` for adapters, `w` itself for plain arrays and bases (the protocol's
    recursion: LoRA over DoRA over NF4 gives the NF4 weight)."""
    return w.frozen_base() if is_adapter(w) else w


def linear(x: jax.Array, w: Any, dtype=None) -> jax.Array:
    """x [..., in] times a weight [in, out] (plain array or structured weight)."""
    if isinstance(w, StructuredWeight):
        return w.matmul(x)
    if dtype is not None:
        w = w.astype(dtype)
    return dense(x, w)


# The name every `dense` product's output carries for remat policies (jax.checkpoint sees a
# custom VJP as one opaque call, not a dot, so the "dots" policies save it by this name).
DENSE_NAME = "dense_out"


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] (`_dense`), its output named DENSE_NAME for remat policies."""
    return checkpoint_name(_dense(x, w), DENSE_NAME)


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out], with the textbook backward: dx = dy w^T, dw = x^T dy.

    The same products autodiff forms; the difference is an optimization barrier on dy. Without
    it, XLA:CPU fuses the elementwise producer of dy (e.g. SiLU's derivative) into the
    transposed copy that feeds dw's product, and that fusion runs several times slower than the
    products themselves (docs/performance.md). When w is not differentiated (a frozen base),
    dw is unused and XLA drops its product.
    """
    return jnp.einsum("...i,io->...o", x, w)


def _dense_fwd(x, w):
    return _dense(x, w), (x, w)


def _dense_bwd(res, dy):
    x, w = res
    dy = jax.lax.optimization_barrier(dy)
    dx = jnp.einsum("...o,io->...i", dy, w)
    dw = jnp.einsum("...i,...o->io", x, dy)
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertBlocks:
    """Rows sorted by expert and zero-padded so that every block of `block` rows belongs to one
    expert: x [n_blocks * block, in], block i of expert `block_expert[i]`. The block size is
    x.shape[0] // n_blocks. Built by `ftjax.models.moe.block_layout`; passed wherever a
    ragged product takes `group_sizes`."""
    block_expert: jax.Array  # [n_blocks] int32


def grouped_matmul(x: jax.Array, w: jax.Array, groups: Any = None) -> jax.Array:
    """The per-expert product with a dense stack w [E, in, out], in one of three layouts.

    groups None: x [E, C, in] -> [E, C, out] (batched, capacity mode).
    groups [E] int32 group sizes: x [N, in] rows sorted by expert -> [N, out], one
      `jax.lax.ragged_dot` (fast where the backend has a native grouped GEMM; XLA's generic
      lowering, used on CPU, computes every expert over every row).
    groups ExpertBlocks: x [n_blocks * block, in] -> [.., out] as a batched product of each
      block with its expert's weight, [n_blocks, block, in] x w[block_expert]: the work is the
      (padded) rows, not E times them.
    Each output row is the same dot product in every layout (float32 round-off apart).
    """
    if groups is None:
        if x.ndim != 3 or x.shape[0] != w.shape[0]:
            raise ValueError(f"batched expert_linear needs x [E={w.shape[0]}, C, in], got "
                             f"{x.shape}")
        return jnp.einsum("eci,eio->eco", x, w)
    if isinstance(groups, ExpertBlocks):
        nb = groups.block_expert.shape[0]
        if x.ndim != 2 or x.shape[0] % nb:
            raise ValueError(f"blocked expert_linear needs x [n_blocks={nb} * block, in], got "
                             f"{x.shape}")
        xb = x.reshape(nb, x.shape[0] // nb, x.shape[1])
        y = _block_matmul(xb, w, groups.block_expert.astype(jnp.int32))
        return y.reshape(x.shape[0], w.shape[-1])
    if x.ndim != 2 or groups.shape != (w.shape[0],):
        raise ValueError(f"ragged expert_linear needs x [N, in] and group_sizes [E={w.shape[0]}],"
                         f" got {x.shape} and {groups.shape}")
    return jax.lax.ragged_dot(x, w, groups.astype(jnp.int32))


@jax.custom_vjp
def _block_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
    """x [nb, block, in] times w[block_expert] [nb, in, out]. The custom VJP keeps x and w (not
    the gathered [nb, in, out] copy, nb / E times the weights' size) for the backward pass,
    and sums the per-block weight gradients per expert."""
    return jnp.einsum("bri,bio->bro", x, jnp.take(w, block_expert, axis=0, mode="clip"))


def _block_matmul_fwd(x, w, block_expert):
    return _block_matmul(x, w, block_expert), (x, w, block_expert)


def _block_matmul_bwd(res, dy):
    x, w, block_expert = res
    dx = jnp.einsum("bro,bio->bri", dy, jnp.take(w, block_expert, axis=0, mode="clip"))
    dw_blocks = jnp.einsum("bri,bro->bio", x, dy, preferred_element_type=jnp.float32)
    dw = jax.ops.segment_sum(dw_blocks, block_expert, num_segments=w.shape[0],
                             indices_are_sorted=True)
    return dx, dw.astype(w.dtype), None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def expert_linear(x: jax.Array, w: Any, group_sizes: Any = None, dtype=None) -> jax.Array:
    """Per-expert product with w [E, in, out] (plain array or structured weight).

    group_sizes None: x [E, C, in] -> [E, C, out] (batched, capacity mode).
    group_sizes [E] int32: x [N, in] rows sorted by expert -> [N, out] (ragged, dropless;
    rows group_sizes[0] .. belong to expert 0, and so on; `jax.lax.ragged_dot`).
    group_sizes ExpertBlocks: x [n_blocks * block, in] in expert blocks (dropless on CPU).
    See `grouped_matmul`; structured weights get the same argument in `expert_matmul`.
    """
    if isinstance(w, StructuredWeight):
        return w.expert_matmul(x, group_sizes)
    return _dense_expert_linear(x, w, group_sizes, dtype)


def _dense_expert_linear(x, w, group_sizes, dtype):
    if w.ndim != 3:
        raise ValueError(f"expert_linear needs stacked expert weights [E, in, out], got shape "
                         f"{w.shape}")
    if dtype is not None:
        w = w.astype(dtype)
    return grouped_matmul(x, w, group_sizes)


def embed(ids: jax.Array, w: Any, dtype=None) -> jax.Array:
    """Rows of an embedding table [vocab, embed] for integer ids."""
    if isinstance(w, StructuredWeight):
        out = w.lookup(ids)
    else:
        out = jnp.take(w, ids, axis=0)
    return out if dtype is None else out.astype(dtype)


def attend(x: jax.Array, w: Any, dtype=None) -> jax.Array:
    """x [..., embed] against an embedding table [vocab, embed] (tied LM head)."""
    if isinstance(w, StructuredWeight):
        w = w.materialize()
    if dtype is not None:
        w = w.astype(dtype)
    return jnp.einsum("...d,vd->...v", x, w)


def materialize(w: Any) -> jax.Array:
    return w.materialize() if isinstance(w, StructuredWeight) else w


# ------------------------------------------------------------------------------------------
# Trees of (possibly structured) params: paths, axes, trainable masks, partition/combine.
# ------------------------------------------------------------------------------------------

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'layers/attn/q_proj/kernel' for a jax key path."""
    return "/".join(_key_name(k) for k in path)


def map_weights(fn: Callable[[str, Any], Any], params: Any) -> Any:
    """Applies fn(path, leaf) to every weight leaf: plain arrays and whole structured weights."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), params,
                                            is_leaf=is_structured)


def axes_like(params: Any, base_axes: Any) -> Any:
    """Logical axes for a transformed params tree, from the untransformed model's axes.

    Structured leaves get a copy of themselves whose fields hold axes tuples, so the result
    has exactly the pytree structure of `params` (with tuples as leaves).
    """
    def one(ax, p):
        if not is_structured(p):
            return ax
        fields = p.field_axes(ax)
        missing = set(p.array_fields()) - set(fields)
        if missing:
            raise ValueError(f"{type(p).__name__}.field_axes misses fields {sorted(missing)}")
        return dataclasses.replace(p, **fields)
    return jax.tree.map(one, base_axes, params, is_leaf=lambda x: isinstance(x, tuple))


def select_targets(params: Any, targets: Sequence[str], make: Callable[..., Any], *,
                   name: str, key: Optional[jax.Array] = None,
                   check: Optional[Callable[[str, Any], None]] = None) -> Any:
    """The target walk every transform shares: replaces each weight whose path fully matches
    a `targets` regex by `make(path, w, k)`.

    Weights are visited in the canonical order of the tree (`map_weights`: sorted dict keys);
    the i-th matching weight (1-based) gets `k = fold_in(key, i)`, or None without a key, so
    a transform (and an export tool re-applying it) builds identical leaves from one key.
    `check(path, w)` raises for a matched weight the method cannot adapt (default: it must be
    a dense matrix, see `require_dense`). Raises if nothing matches, listing the weight paths.
    """
    pats = compile_patterns(targets)
    check = require_dense(name) if check is None else check
    hits: list[str] = []
    paths: list[str] = []

    def one(path, w):
        paths.append(path)
        if not matches(path, pats):
            return w
        check(path, w)
        hits.append(path)
        return make(path, w, None if key is None else jax.random.fold_in(key, len(hits)))

    out = map_weights(one, params)
    if not hits:
        raise ValueError(f"{name} targets {list(targets)} match no weight; weight paths are: "
                         f"{paths}")
    return out


def weight_paths(params: Any) -> list[str]:
    """Paths of every weight leaf (plain arrays and whole structured weights), in walk order."""
    paths: list[str] = []
    map_weights(lambda p, w: paths.append(p), params)
    return paths


def require_dense(name: str, what: str = "the target patterns") -> Callable[[str, Any], None]:
    """A `select_targets` check: the matched weight must be a plain array with >= 2 dims."""
    def check(path: str, w: Any) -> None:
        if isinstance(w, StructuredWeight) or w.ndim < 2:
            raise ValueError(f"{name} target {path!r} is not a dense matrix (shape "
                             f"{getattr(w, 'shape', None)}); narrow {what}")
    return check


def compile_patterns(patterns: Iterable[str]) -> list[re.Pattern]:
    out = []
    for pat in patterns:
        try:
            out.append(re.compile(pat))
        except re.error as e:
            raise ValueError(f"invalid param-path regex {pat!r}: {e}") from None
    return out


def matches(path: str, patterns: Sequence[re.Pattern]) -> bool:
    """True when a regex matches the whole path (`re.fullmatch`)."""
    return any(p.fullmatch(path) for p in patterns)


def trainable_mask(params: Any, train_patterns: Optional[Sequence[str]] = (".*",)) -> Any:
    """Bool tree with the structure of `params`: which leaves receive gradients.

    Plain arrays are trainable when their path fully matches one of `train_patterns` (full or
    partial fine-tuning); fields of structured weights follow their `trainable_fields()`
    (adapters train, bases stay frozen), whatever the patterns say.
    """
    pats = compile_patterns(train_patterns or ())

    def one(path, p):
        if is_structured(p):
            return _structured_mask(p)
        return matches(path, pats)
    return map_weights(one, params)


def _structured_mask(w: StructuredWeight) -> StructuredWeight:
    trainable = set(w.trainable_fields())
    fields = {}
    for name in w.array_fields():
        value = getattr(w, name)
        if is_structured(value):
            fields[name] = jax.tree.map(lambda _: False, value)  # nested bases are frozen
        else:
            fields[name] = jax.tree.map(lambda _: name in trainable, value)
    return dataclasses.replace(w, **fields)


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees of the same structure, None where the other has a leaf."""
    trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def merge(params: Any) -> Any:
    """Every structured weight replaced by its dense weight (for export and fast inference)."""
    return map_weights(lambda _, w: materialize(w) if is_structured(w) else w, params)


def count(tree: Any) -> int:
    """Stored elements of every array leaf (an NF4 base counts its packed uint8 codes and block
    scales). For a model's parameter count use `count_params`."""
    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def count_params(tree: Any) -> int:
    """Logical parameters: plain leaves by size, structured weights by `num_params()`. A model
    with an NF4 base counts what its dense twin counts, so QLoRA's "% of the model" trained is
    LoRA's."""
    leaves = jax.tree.leaves(tree, is_leaf=is_structured)
    return int(sum(x.num_params() if is_structured(x) else getattr(x, "size", 0)
                   for x in leaves))
