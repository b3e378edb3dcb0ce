"""The structured-weight protocol and the dispatching ops every weight product goes through.

A param leaf is either a plain array or a *structured weight*: a registered pytree dataclass
(LoRA over a dense base, an NF4-quantized base, ...) that knows how to multiply an input.
The model calls only `linear(x, w)` and `embed(ids, w)`; adding a transform never changes it.
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp


class StructuredWeight(abc.ABC):
    """Protocol for a transformed param leaf.

    Subclasses are registered pytree dataclasses (e.g. with `flax.struct.dataclass`), so that
    scan over stacked layers slices every field along the leading layer axis.
    """

    @abc.abstractmethod
    def matmul(self, x: jax.Array) -> jax.Array:
        """Returns x @ W for x [..., in] and W the logical [in, out] weight."""

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Returns rows W[ids] for an embedding table [vocab, embed]."""
        return jnp.take(self.materialize(), ids, axis=0)

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """The dense weight this leaf stands for (for merge and export)."""

    def trainable_fields(self) -> tuple[str, ...]:
        """Names of the fields that receive gradients."""
        return ()

    def field_axes(self, base_axes: tuple) -> dict[str, tuple]:
        """Logical axes of every array field, derived from the base weight's axes."""
        return {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jax.eval_shape(self.materialize).shape)


def is_structured(w: Any) -> bool:
    return isinstance(w, StructuredWeight)


def linear(x: jax.Array, w: Any, dtype=None) -> jax.Array:
    """x [..., in] times a weight [in, out] (plain array or structured weight)."""
    if isinstance(w, StructuredWeight):
        return w.matmul(x)
    if dtype is not None:
        w = w.astype(dtype)
    return jnp.einsum("...i,io->...o", x, w)


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
