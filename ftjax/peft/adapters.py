"""Bottleneck adapters: serial (Houlsby et al. 2019) and parallel (He et al. 2022).

An adapter is a small MLP  f(z) = up(act(down(z)))  (down [d, r], up [r, out], both with
biases) attached to a projection W as a structured weight, so the model code is unchanged:

  serial    y = W x + b;   y + s * f(y)    the adapter reads the projection's output and adds
                                           its own residual (Houlsby's adapter after the
                                           attention output projection and after the FFN)
  parallel  y = W x + s * f(x) (+ b)       the adapter reads the projection's input, in
                                           parallel with it (He et al.'s parallel adapter)

Default targets are `o_proj` (after attention) and `down_proj` (after the MLP). `up` starts at
zero, so the adapted model starts equal to the base; `down` is Kaiming-uniform like torch's
nn.Linear. Trainable parameters per adapted matrix (in -> out, bottleneck r):

  serial:   out*r + r + r*out + out        parallel:   in*r + r + r*out + out

(times the number of layers for stacked weights).

Approximations, since a structured weight only sees one projection:
- Serial with a bias (GPT-2's o_proj/down_proj biases): the plain bias leaf is folded into the
  adapter weight (and the leaf zeroed), so the adapter reads the full output W x + b, as in
  Houlsby. Houlsby's layer-norm re-training is not part of the adapter (pre-norm models).
- Parallel on `down_proj` reads down_proj's input (the MLP's intermediate activation,
  width `intermediate_size`); He et al.'s parallel adapter reads the sub-layer's input (the
  normed hidden state). Reading that would need a hook in the model; this is the closest
  placement a weight transform can reach.
Adapters are nonlinear, so they cannot be merged into W: `materialize()` raises.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.peft.core import StructuredWeight, linear, select_targets, unwrap
from ftjax.peft.method import Method, register

BOTTLENECK_AXIS = "lora_rank"  # an adapter rank axis: replicated by every sharding preset

DEFAULT_TARGETS = (r"layers/attn/o_proj/kernel", r"layers/mlp/down_proj/kernel")
MODES = ("serial", "parallel")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")


def _act(x: jax.Array, name: str) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    if name == "tanh":
        return jnp.tanh(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown adapter activation {name!r}; choose one of {ACTIVATIONS}")


@flax.struct.dataclass
class BottleneckAdapter(StructuredWeight):
    """A frozen projection W [.., in, out] plus a trainable bottleneck MLP (see module doc).

    down [.., out, r] (serial) or [.., in, r] (parallel); down_bias [.., r]; up [.., r, out];
    up_bias [.., out]; bias [.., out]: the projection's own bias folded in (serial; zeros when
    the projection has none or for parallel adapters), frozen.
    """
    base: Any
    down: jax.Array
    down_bias: jax.Array
    up: jax.Array
    up_bias: jax.Array
    bias: jax.Array
    mode: str = flax.struct.field(pytree_node=False, default="serial")
    activation: str = flax.struct.field(pytree_node=False, default="relu")
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    def _adapter(self, z: jax.Array) -> jax.Array:
        dt = z.dtype
        h = jnp.einsum("...i,ir->...r", z, self.down.astype(dt)) + self.down_bias.astype(dt)
        h = _act(h, self.activation)
        return jnp.einsum("...r,ro->...o", h, self.up.astype(dt)) + self.up_bias.astype(dt)

    def matmul(self, x):
        y = linear(x, self.base, x.dtype) + self.bias.astype(x.dtype)
        if self.mode == "serial":
            return y + self.scale * self._adapter(y)
        return y + self.scale * self._adapter(x)

    def materialize(self):
        raise ValueError("bottleneck adapters are nonlinear and cannot be merged into a dense "
                         "weight; keep the params unmerged (and leave export.hf_dir empty)")

    @property
    def shape(self):
        return tuple(self.base.shape)

    def trainable_fields(self):
        return ("down", "down_bias", "up", "up_bias")

    def frozen_base(self):
        return unwrap(self.base)

    def frozen_base_exact(self):
        # A serial adapter may hold the projection's bias (folded in, the plain leaf zeroed).
        return self.mode != "serial"

    def field_axes(self, base_axes):
        lead, ax_in, ax_out = base_axes[:-2], base_axes[-2], base_axes[-1]
        base = base_axes
        if isinstance(self.base, StructuredWeight):
            base = dataclasses.replace(self.base, **self.base.field_axes(base_axes))
        ax_read = ax_out if self.mode == "serial" else ax_in
        return {"base": base, "down": lead + (ax_read, BOTTLENECK_AXIS),
                "down_bias": lead + (BOTTLENECK_AXIS,), "up": lead + (BOTTLENECK_AXIS, ax_out),
                "up_bias": lead + (ax_out,), "bias": lead + (ax_out,)}


def adapter_param_count(n_in: int, n_out: int, r: int, mode: str = "serial") -> int:
    """Trainable parameters of one adapter on an [in, out] projection (see module doc)."""
    read = n_out if mode == "serial" else n_in
    return read * r + r + r * n_out + n_out


def _init_adapter(key, w, r: int, mode: str, bias, activation: str, scale: float,
                  dtype) -> BottleneckAdapter:
    *lead, n_in, n_out = w.shape
    read = n_out if mode == "serial" else n_in
    bound = 1.0 / math.sqrt(read)  # torch nn.Linear default (kaiming_uniform, a=sqrt(5))
    down = jax.random.uniform(key, (*lead, read, r), jnp.float32, -bound, bound)
    if bias is None:
        bias = jnp.zeros((*lead, n_out), w.dtype)
    return BottleneckAdapter(
        base=w, down=down.astype(dtype), down_bias=jnp.zeros((*lead, r), dtype),
        up=jnp.zeros((*lead, r, n_out), dtype), up_bias=jnp.zeros((*lead, n_out), dtype),
        bias=bias, mode=mode, activation=activation, scale=float(scale))


def apply_adapters(params: Any, key: jax.Array, *, bottleneck: int = 64, mode: str = "serial",
                   activation: str = "relu", scale: float = 1.0,
                   targets: Sequence[str] = DEFAULT_TARGETS, fold_bias: bool = True,
                   dtype=None) -> Any:
    """Wraps every kernel whose path fully matches a `targets` regex in a BottleneckAdapter.

    fold_bias (serial only): a sibling plain `bias` leaf moves into the adapter weight and the
    leaf is zeroed, so the serial adapter reads W x + b (exact Houlsby placement).
    Raises if no weight matches, listing the weight paths.
    """
    if mode not in MODES:
        raise ValueError(f"adapter mode {mode!r} is not known; choose one of {MODES}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter activation {activation!r} is not known; choose one of "
                         f"{ACTIVATIONS}")
    if int(bottleneck) < 1:
        raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}")
    adt = dtype or jnp.float32
    folded: list[tuple[str, ...]] = []

    def make(path, w, k):
        *parent, name = path.split("/")
        node = params
        for p in parent:
            node = node[p]
        bias = None
        if mode == "serial" and fold_bias and "bias" in node and name != "bias":
            bias = node["bias"]
            folded.append(tuple(parent))
        return _init_adapter(k, w, int(bottleneck), mode, bias, activation, scale, adt)

    out = select_targets(params, targets, make, name="adapter", key=key)
    for parent in folded:  # the folded-in bias leaves are zeroed (the adapter holds them)
        node = out
        for p in parent:
            node = node[p]
        node["bias"] = jnp.zeros_like(node["bias"])
    return out


DEFAULTS = dict(
    bottleneck=64,             # r, the adapter's hidden width
    mode="serial",             # serial (Houlsby) | parallel (He et al.)
    activation="relu",         # one of ACTIVATIONS
    scale=1.0,                 # s on the adapter's output
    targets=DEFAULT_TARGETS,   # o_proj and down_proj
    fold_bias=True,            # serial: move the projection's bias into the adapter
    train_patterns=(),
)


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """Bottleneck adapters from a resolved `peft` section (see configs/adapter_sft.py)."""
    del apply_fn, tokenizer
    transform = functools.partial(
        apply_adapters, bottleneck=int(s.bottleneck), mode=str(s.mode),
        activation=str(s.activation), scale=float(s.scale), targets=tuple(s.targets),
        fold_bias=bool(s.fold_bias))
    return Method(name="adapter", transform=transform, train_patterns=tuple(s.train_patterns),
                  mergeable=False)  # nonlinear: no dense form, so export.hf_dir is refused


register("adapter", DEFAULTS, method, dict(bottleneck=">= 1", mode=MODES, activation=ACTIVATIONS))
