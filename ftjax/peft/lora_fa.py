"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"): LoRA with the
down-projection A frozen at its random init and only B trained.

    y = x W + s * (x A) B,    A [.., in, r] frozen,  B [.., r, out] trained (zero at init)

Freezing A drops its gradient and optimizer state (half of LoRA's adapter state for square
weights) and the activation x kept for A's gradient: only x A [.., r] is needed for B's.
The model starts equal to the base (B = 0). A is never checkpointed (checkpoints hold what
trains): it is rebuilt by the transform from the run's key and the shapes, exactly as LoRA's
initial A (`lora.init_factors`, same key per weight), so a restore or a PEFT export re-applying
the transform gets the same A. The weight has LoRA's layout (`lora_factors`), so PEFT export
writes it as lora_A / lora_B, and stripping it (the DPO reference) gives back its base.
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
from ftjax.peft.method import Method, register


@flax.struct.dataclass
class LoRAFAWeight(StructuredWeight):
    """A frozen base [.., in, out], a frozen A [.., in, r] and a trainable B [.., r, out]."""
    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    def matmul(self, x):
        dt = x.dtype
        xa = jnp.einsum("...i,ir->...r", x, jax.lax.stop_gradient(self.a).astype(dt))
        return linear(x, self.base, dt) + self.scale * jnp.einsum("...r,ro->...o", xa,
                                                                   self.b.astype(dt))

    def materialize(self):
        w = materialize(self.base)
        return w + (self.scale * jnp.matmul(self.a, self.b)).astype(w.dtype)

    def trainable_fields(self):
        return ("b",)

    def frozen_base(self):
        return unwrap(self.base)

    def lora_factors(self):
        return self.a, self.b, self.scale

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = base_axes[:-2], base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "a": lead + (ax_in, lora.RANK_AXIS),
                "b": lead + (lora.RANK_AXIS, ax_out)}


def apply_lora_fa(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
                  targets: Sequence[str] = lora.DEFAULT_TARGETS, rslora: bool = False,
                  init: str = "default", rank_pattern: Optional[dict] = None,
                  alpha_pattern: Optional[dict] = None, dtype=None) -> Any:
    """Wraps every dense kernel whose path fully matches a `targets` regex in a LoRAFAWeight,
    A drawn as LoRA's (init default: Kaiming-uniform; gaussian: N(0, 1/r)), B = 0."""
    if init not in ("default", "gaussian"):
        raise ValueError(f"LoRA-FA init={init!r}: choose default or gaussian (A stays at its "
                         "random init; pissa would move W into the frozen A)")

    def make(path, w, r, s, k):
        if path.endswith("embedding"):
            raise ValueError(f"LoRA-FA target {path!r} is an embedding table; LoRA-FA adapts "
                             "kernels, narrow the target patterns")
        a, b, base = lora.init_factors(k, w, r, s, init, is_embedding=False)
        adt = dtype or jnp.float32
        return LoRAFAWeight(base=base, a=a.astype(adt), b=b.astype(adt), scale=s)

    return lora.wrap_targets(params, key, "LoRA-FA", targets, None, make, rank=rank,
                             alpha=alpha, rslora=rslora, rank_pattern=rank_pattern,
                             alpha_pattern=alpha_pattern)


# LoRA's settings without dropout; init: default | gaussian.
DEFAULTS = {k: v for k, v in lora.DEFAULTS.items() if k != "dropout"}


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """LoRA-FA from a resolved `peft` section (see DEFAULTS)."""
    del apply_fn, tokenizer  # the forward pass is the model's own
    return Method(name="lora_fa",
                  transform=functools.partial(apply_lora_fa, **lora.lowrank_kwargs(s)),
                  train_patterns=tuple(s.train_patterns))


register("lora_fa", DEFAULTS, method, {**{k: v for k, v in lora.CHECKS.items() if k in DEFAULTS},
                                       "init": ("default", "gaussian")})
