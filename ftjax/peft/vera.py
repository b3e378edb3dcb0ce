"""VeRA (Kopiczko et al. 2024): h = W0 x + Λb B Λd A x, with one pair of frozen random matrices
A, B shared by all layers and two trained vectors d [r] and b [out] per adapted matrix.

ftjax kernels are [in, out] and multiply row vectors, so the update is ((x @ A) * d) @ B * b:
ΔW = A diag(d) B diag(b) with A [in, r], B [r, out]. A and B are never stored: they are
regenerated from (seed, shape) wherever they are used, so every layer and every target of the
same shape shares them (as in the paper) at no memory cost, and scan over stacked layers slices
only base, d and b. b starts at zero (the model starts equal to the base), d at `d_init`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.peft.core import StructuredWeight, linear, materialize, select_targets, unwrap
from ftjax.peft.lora import DEFAULT_TARGETS, RANK_AXIS
from ftjax.peft.method import Method, register


def shared_matrices(seed: int, n_in: int, rank: int, n_out: int):
    """The frozen A [in, r] and B [r, out], Kaiming-uniform (bound 1/sqrt(fan_in)) as in the
    paper; A depends on (seed, in, r) only and B on (seed, r, out) only."""
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.uniform(jax.random.fold_in(ka, n_in), (n_in, rank), jnp.float32, -1, 1)
    b = jax.random.uniform(jax.random.fold_in(kb, n_out), (rank, n_out), jnp.float32, -1, 1)
    return a / math.sqrt(n_in), b / math.sqrt(rank)


@flax.struct.dataclass
class VeRAWeight(StructuredWeight):
    """A frozen base [.., in, out] plus the trained scalings d [.., r] and b [.., out]."""
    base: Any
    d: jax.Array
    b: jax.Array
    seed: int = flax.struct.field(pytree_node=False, default=0)

    def _shared(self):
        return shared_matrices(self.seed, self.base.shape[-2], self.d.shape[-1],
                               self.b.shape[-1])

    def matmul(self, x):
        dt = x.dtype
        a_mat, b_mat = self._shared()
        h = jnp.einsum("...i,ir->...r", x, a_mat.astype(dt)) * self.d.astype(dt)
        delta = jnp.einsum("...r,ro->...o", h, b_mat.astype(dt)) * self.b.astype(dt)
        return linear(x, self.base, dt) + delta

    def materialize(self):
        w = materialize(self.base)
        a_mat, b_mat = self._shared()
        delta = ((a_mat * self.d[..., None, :]) @ b_mat) * self.b[..., None, :]
        return w + delta.astype(w.dtype)

    def trainable_fields(self):
        return ("d", "b")

    def frozen_base(self):
        return unwrap(self.base)

    def field_axes(self, base_axes):
        lead, ax_out = base_axes[:-2], base_axes[-1]
        return {"base": base_axes, "d": lead + (RANK_AXIS,), "b": lead + (ax_out,)}


def apply_vera(params: Any, key: jax.Array = None, *, rank: int = 256, d_init: float = 0.1,
               targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> Any:
    """Wraps every dense weight whose path fully matches a `targets` regex in a VeRAWeight.

    `key` is unused: the init is deterministic and A, B come from the static `seed`.
    """
    del key

    def make(path, w, k):
        *lead, _, n_out = w.shape
        return VeRAWeight(base=w, d=jnp.full((*lead, rank), d_init, jnp.float32),
                          b=jnp.zeros((*lead, n_out), jnp.float32), seed=seed)
    return select_targets(params, targets, make, name="VeRA")


DEFAULTS = dict(
    rank=256,                  # r of the shared random matrices
    d_init=0.1,                # initial value of the d scalings (b starts at zero)
    targets=DEFAULT_TARGETS,
    seed=0,                    # the shared A, B are a function of (seed, shapes)
    train_patterns=(),
)
CHECKS = dict(rank=">= 1")     # refused before a run builds anything


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """VeRA from a resolved `peft` section (see DEFAULTS)."""
    del apply_fn, tokenizer
    transform = functools.partial(apply_vera, rank=int(s.rank), d_init=float(s.d_init),
                                  targets=tuple(s.targets), seed=int(s.seed))
    return Method(name="vera", transform=transform, train_patterns=tuple(s.train_patterns))


register("vera", DEFAULTS, method, CHECKS)
