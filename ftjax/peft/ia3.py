"""IA3 (Liu et al. 2022, "(IA)^3"): learned elementwise rescaling of inner activations.

Keys and values are rescaled by l_k, l_v (the *output* of k_proj and v_proj, size kv_size) and
the MLP's intermediate activations by l_ff (the *input* of down_proj, size intermediate), all
initialised to ones, so the model starts equal to the base. Per layer that trains
2·kv_size + intermediate numbers. As in PEFT, "feed-forward" targets scale the input
(`ia3_l` [1, in]) and the others the output (`ia3_l` [out, 1]); merging multiplies the kernel
rows (input) or columns (output).

ftjax adds projection biases outside the weight product, so with biased k/v projections
(qkv_bias, e.g. Qwen2) the bias is not rescaled here, whereas PEFT scales it too.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.peft.core import (StructuredWeight, compile_patterns, linear, matches, materialize,
                             select_targets, unwrap, weight_paths)
from ftjax.peft.method import Method, register

# PEFT's Llama defaults: target_modules k_proj, v_proj, down_proj; feedforward_modules down_proj.
DEFAULT_TARGETS = (r"layers/attn/(k|v)_proj/kernel", r"layers/mlp/down_proj/kernel")
DEFAULT_FEEDFORWARD = (r"layers/mlp/down_proj/kernel",)


@flax.struct.dataclass
class IA3Weight(StructuredWeight):
    """A frozen base [.., in, out] and a trainable scale `ia3_l`: [.., out] on the output
    (l_k, l_v), or [.., in] on the input when `feedforward` (l_ff)."""
    base: Any
    ia3_l: jax.Array
    feedforward: bool = flax.struct.field(pytree_node=False, default=False)

    def matmul(self, x):
        dt = x.dtype
        if self.feedforward:
            return linear(x * self.ia3_l.astype(dt), self.base, dt)
        return linear(x, self.base, dt) * self.ia3_l.astype(dt)

    def materialize(self):
        w = materialize(self.base)
        l = self.ia3_l.astype(jnp.float32)  # noqa: E741 (the paper's name)
        scale = l[..., :, None] if self.feedforward else l[..., None, :]
        return (w.astype(jnp.float32) * scale).astype(w.dtype)

    def trainable_fields(self):
        return ("ia3_l",)

    def frozen_base(self):
        return unwrap(self.base)

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = tuple(base_axes[:-2]), base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        return {"base": base, "ia3_l": lead + ((ax_in,) if self.feedforward else (ax_out,))}


def apply_ia3(params: Any, key: jax.Array = None, *, targets: Sequence[str] = DEFAULT_TARGETS,
              feedforward: Sequence[str] = DEFAULT_FEEDFORWARD, dtype=None) -> Any:
    """Wraps every kernel whose path fully matches a `targets` regex in an IA3Weight with
    ones; those also matching `feedforward` scale their input, the others their output.
    `key` is unused (IA3 is deterministic) and kept for the transform signature."""
    del key
    pats, ff_pats = compile_patterns(targets), compile_patterns(feedforward)
    for path in weight_paths(params):
        if matches(path, ff_pats) and not matches(path, pats):
            raise ValueError(f"IA3 feedforward pattern matches {path!r}, which no target "
                             "pattern matches; feedforward targets must be targets too")

    def check(path, w):
        if path.endswith("embedding") or len(w.shape) < 2:
            raise ValueError(f"IA3 target {path!r} is not a kernel (shape {w.shape}); narrow "
                             "the target patterns")

    def make(path, w, k):
        ff = matches(path, ff_pats)
        *lead, n_in, n_out = w.shape
        l = jnp.ones((*lead, n_in if ff else n_out), dtype or jnp.float32)  # noqa: E741
        return IA3Weight(base=w, ia3_l=l, feedforward=ff)
    return select_targets(params, targets, make, name="IA3", check=check)


DEFAULTS = dict(
    targets=DEFAULT_TARGETS,          # k_proj, v_proj, down_proj (PEFT's Llama defaults)
    feedforward=DEFAULT_FEEDFORWARD,  # targets scaled on their input (l_ff)
    train_patterns=(),
)


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """IA3 from a resolved `peft` section (see DEFAULTS)."""
    del apply_fn, tokenizer
    transform = functools.partial(apply_ia3, targets=tuple(s.targets),
                                  feedforward=tuple(s.feedforward))
    return Method(name="ia3", transform=transform, train_patterns=tuple(s.train_patterns))


register("ia3", DEFAULTS, method)
