"""VeRA (Kopiczko et al. 2024): h = W0 x + Λb B Λd A x, with one pair of frozen random matrices
A, B shared by all layers and two trained vectors d [r] and b [out] per adapted matrix.

ftjax kernels are [in, out] and multiply row vectors, so the update is ((x @ A) * d) @ B * b:
ΔW = A diag(d) B diag(b) with A [in, r], B [r, out]. A and B are never stored: they are
regenerated from (seed, shape) wherever they are used, so every layer and every target of the
same shape shares them (as in the paper) at no memory cost, and scan over stacked layers slices
only base, d and b. b starts at zero (the model starts equal to the base), d at `d_init`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.peft.core import StructuredWeight, compile_patterns, linear, map_weights, materialize
from ftjax.peft.lora import DEFAULT_TARGETS, RANK_AXIS


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

    def field_axes(self, base_axes):
        lead, ax_out = base_axes[:-2], base_axes[-1]
        return {"base": base_axes, "d": lead + (RANK_AXIS,), "b": lead + (ax_out,)}


def apply_vera(params: Any, key: jax.Array = None, *, rank: int = 256, d_init: float = 0.1,
               targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> Any:
    """Wraps every dense weight whose path fully matches a `targets` regex in a VeRAWeight.

    `key` is unused: the init is deterministic and A, B come from the static `seed`.
    """
    del key
    pats = compile_patterns(targets)
    hits: list[str] = []
    paths: list[str] = []

    def one(path, w):
        paths.append(path)
        if not any(p.fullmatch(path) for p in pats):
            return w
        if isinstance(w, StructuredWeight) or w.ndim < 2:
            raise ValueError(f"VeRA target {path!r} is not a dense matrix (shape "
                             f"{getattr(w, 'shape', None)}); narrow the target patterns")
        hits.append(path)
        *lead, _, n_out = w.shape
        return VeRAWeight(base=w, d=jnp.full((*lead, rank), d_init, jnp.float32),
                          b=jnp.zeros((*lead, n_out), jnp.float32), seed=seed)

    out = map_weights(one, params)
    if not hits:
        raise ValueError(f"VeRA targets {list(targets)} match no weight; weight paths are: "
                         f"{paths}")
    return out


def method(pcfg):
    """VeRA from a config's `peft` section: rank, d_init, seed, targets, train_patterns."""
    import functools
    from ftjax.peft import Method
    transform = functools.partial(
        apply_vera, rank=int(pcfg.get("rank", 256)), d_init=float(pcfg.get("d_init", 0.1)),
        targets=tuple(pcfg.get("targets", DEFAULT_TARGETS)), seed=int(pcfg.get("seed", 0)))
    return Method(name="vera", transform=transform,
                  train_patterns=tuple(pcfg.get("train_patterns", ())))
