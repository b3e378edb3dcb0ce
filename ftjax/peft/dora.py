"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

The adapted weight is split into a magnitude and a direction, W' = m ⊙ V / ||V||_col with
V = W0 + s·A·B (LoRA on the direction). For ftjax's [in, out] kernels the norm runs over the
`in` axis, one per output column, so m is [.., out] (PEFT's `lora_magnitude_vector`: row
norms of its [out, in] weight). m starts at ||W0 + s·A·B||_col, which equals ||W0||_col with
B = 0, so the model starts equal to the base. Forward:

    y = (m / ||W0 + s·A·B||_col) ⊙ (x W0 + s·x A B)

with the norm treated as a constant for gradients (paper §4.3; PEFT detaches it too), which
is what PEFT computes as (m/n - 1)·base(x) + (m/n)·s·lora(x) added to base(x).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.peft import lora
from ftjax.peft.core import StructuredWeight, linear, materialize, unwrap
from ftjax.peft.lora import DEFAULT_TARGETS, RANK_AXIS, init_factors, wrap_targets
from ftjax.peft.method import Method, register


@flax.struct.dataclass
class DoRAWeight(StructuredWeight):
    """A frozen base [.., in, out] (dense or structured), LoRA factors a [.., in, r] and
    b [.., r, out], and the magnitude m [.., out]; a, b and m train."""
    base: Any
    a: jax.Array
    b: jax.Array
    m: jax.Array
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    def direction(self) -> jax.Array:
        """V = W0 + s·A·B in float32."""
        return (materialize(self.base).astype(jnp.float32)
                + self.scale * jnp.matmul(self.a.astype(jnp.float32),
                                          self.b.astype(jnp.float32)))

    def column_norm(self) -> jax.Array:
        """||W0 + s·A·B|| over `in` for each output, detached (DoRA §4.3)."""
        norm = jnp.linalg.norm(jax.lax.stop_gradient(self.direction()), axis=-2)
        return jnp.where(norm == 0, jnp.ones_like(norm), norm)  # a zero column stays zero

    def magnitude_scale(self) -> jax.Array:
        return self.m.astype(jnp.float32) / self.column_norm()

    def matmul(self, x):
        dt = x.dtype
        y = (linear(x, self.base, dt)
             + self.scale * jnp.einsum("...r,ro->...o",
                                       jnp.einsum("...i,ir->...r", x, self.a.astype(dt)),
                                       self.b.astype(dt)))
        return y * self.magnitude_scale().astype(dt)

    def materialize(self):
        dtype = jax.eval_shape(lambda: materialize(self.base)).dtype
        w = self.direction()
        w = w * (self.m.astype(jnp.float32) / self.column_norm())[..., None, :]
        return w.astype(dtype)

    def trainable_fields(self):
        return ("a", "b", "m")

    def frozen_base(self):
        return unwrap(self.base)

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = tuple(base_axes[:-2]), base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "a": lead + (ax_in, RANK_AXIS), "b": lead + (RANK_AXIS, ax_out),
                "m": lead + (ax_out,)}


def apply_dora(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
               targets: Sequence[str] = DEFAULT_TARGETS, rslora: bool = False,
               init: str = "default", rank_pattern: Optional[dict] = None,
               alpha_pattern: Optional[dict] = None, dtype=None) -> Any:
    """Wraps every kernel whose path fully matches a `targets` regex in a DoRAWeight.

    Same options as `lora.apply_lora` (init: default | gaussian | pissa; per-path rank and
    alpha patterns). A target may already be a structured weight (e.g. an NF4Weight from
    `quant.quantize_params`: QDoRA), except with init="pissa", which needs the dense weight.
    Embedding tables are not supported (DoRA's column norm is defined for kernels).
    """
    def check(path, w):
        if path.endswith("embedding") or len(w.shape) < 2:
            raise ValueError(f"DoRA target {path!r} is not a kernel (shape {w.shape}); DoRA "
                             "adapts [.., in, out] kernels, narrow the target patterns")
        if isinstance(w, StructuredWeight) and init == "pissa":
            raise ValueError(f"DoRA init='pissa' needs a dense weight, {path!r} is a "
                             f"{type(w).__name__}")

    def make(path, w, r, s, k):
        a, b, base = init_factors(k, w, r, s, init, is_embedding=False)
        adt = dtype or jnp.float32
        v = (materialize(base).astype(jnp.float32) + s * jnp.matmul(a, b))
        m = jnp.linalg.norm(v, axis=-2)  # magnitude = column norms of W0 + s·A·B
        return DoRAWeight(base=base, a=a.astype(adt), b=b.astype(adt), m=m.astype(adt),
                          scale=s)

    return wrap_targets(params, key, "DoRA", targets, check, make, rank=rank, alpha=alpha,
                        rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


# The settings of LoRA without dropout (PEFT's DoRA has none either).
DEFAULTS = {k: v for k, v in lora.DEFAULTS.items() if k != "dropout"}


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """DoRA from a resolved `peft` section: LoRA's settings (init default | gaussian |
    pissa), no dropout."""
    del apply_fn, tokenizer
    return Method(name="dora", transform=functools.partial(apply_dora, **lora.lowrank_kwargs(s)),
                  train_patterns=tuple(s.train_patterns))


register("dora", DEFAULTS, method, {k: v for k, v in lora.CHECKS.items() if k in DEFAULTS})
