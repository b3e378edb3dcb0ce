"""A bank of LoRA adapters over one base for serving: per-row selection, added while serving.

`AdapterBank(base_params, capacity=N, max_rank=R)` wraps every targeted weight in a
`MultiLoRAWeight` with room for N adapters of rank up to R, all zero. `add(name, lora_params)`
writes an adapter's factors into a free index (rank zero-padded to R; its LoRA scale folded
into b, so every index has scale 1); `remove(name)` frees it. Shapes never change, so the
engine's compiled steps keep working and an adapter can be loaded without a restart. A row
with index -1 runs the base alone.

The base may itself be structured (an int8 / NF4 quantized kernel): the bank's weights apply
the adapters on top of whatever base product it has.
"""
from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import jax.numpy as jnp

from ftjax.peft.core import StructuredWeight, map_weights, select_targets
from ftjax.peft.lora import DEFAULT_TARGETS, LoRAWeight
from ftjax.peft.multi import MultiLoRAWeight

__all__ = ["AdapterBank"]


def _lora_leaves(tree: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    map_weights(lambda p, w: out.__setitem__(p, w), tree)
    return out


class AdapterBank:
    """Up to `capacity` LoRA adapters (rank <= `max_rank`) on the weights matching `targets`."""

    def __init__(self, base_params: Any, *, capacity: int = 8, max_rank: int = 16,
                 targets: Sequence[str] = DEFAULT_TARGETS):
        if capacity < 1 or max_rank < 1:
            raise ValueError(f"capacity and max_rank must be >= 1, got {capacity}, {max_rank}")
        self.capacity, self.max_rank, self.targets = capacity, max_rank, tuple(targets)
        self._names: list[Optional[str]] = [None] * capacity
        self._lock = threading.Lock()

        def check(path, w):
            if getattr(w, "ndim", len(getattr(w, "shape", ()))) < 2:
                raise ValueError(f"adapter bank target {path} is not a matrix")
            if isinstance(w, (LoRAWeight, MultiLoRAWeight)):
                raise ValueError(f"{path} already holds an adapter; give the bank the plain "
                                 "(or quantized) base")

        def make(path, w, _):
            *lead, n_in, n_out = w.shape
            a = jnp.zeros((*lead, capacity, n_in, max_rank), jnp.float32)
            b = jnp.zeros((*lead, capacity, max_rank, n_out), jnp.float32)
            return MultiLoRAWeight(base=w, a=a, b=b, ids=None, scales=(1.0,) * capacity)

        self.params = select_targets(base_params, self.targets, make, name="adapter bank",
                                     check=check)
        self.paths = sorted(p for p, w in _lora_leaves(self.params).items()
                            if isinstance(w, MultiLoRAWeight))

    # ---- names --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [n for n in self._names if n is not None]

    def index(self, name: str) -> int:
        """The index of adapter `name` (KeyError naming the loaded ones if absent)."""
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.names()}") from None

    # ---- add / remove -------------------------------------------------------------------

    def add(self, name: str, lora_params: Any, *, busy: Sequence[int] = ()) -> int:
        """Writes the LoRA tree's factors into a free index; returns it. The tree must be
        over the same base (its LoRAWeight paths among the bank's targets). `busy`: indices
        still used by running requests (not reused even if free)."""
        if not name or ":" in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and without ':'")
        loras = {p: w for p, w in _lora_leaves(lora_params).items()
                 if isinstance(w, StructuredWeight)}
        problems = []
        for p, w in loras.items():
            if not isinstance(w, LoRAWeight):
                problems.append(f"{p}: {type(w).__name__} is not a LoRA weight (merge it "
                                "into the base, or serve it as its own model)")
            elif p not in self.paths:
                problems.append(f"{p}: not among the bank's targets {list(self.targets)}")
            elif w.a.shape[-1] > self.max_rank:
                problems.append(f"{p}: rank {w.a.shape[-1]} > max_rank {self.max_rank} "
                                "(start the server with a larger --max-lora-rank)")
        if not any(isinstance(w, LoRAWeight) for w in loras.values()):
            problems.append("the tree holds no LoRA weight")
        if problems:
            raise ValueError(f"adapter {name!r} cannot be loaded:\n  " + "\n  ".join(problems))
        with self._lock:
            if name in self._names:
                raise ValueError(f"an adapter named {name!r} is already loaded; remove it first")
            free = [i for i, n in enumerate(self._names) if n is None and i not in set(busy)]
            if not free:
                raise ValueError(f"the adapter bank is full ({self.capacity} adapters, or the "
                                 "free ones are still in use); remove one or start the server "
                                 "with a larger --max-adapters")
            i = free[0]
            self.params = self._write(i, loras)
            self._names[i] = name
        return i

    def remove(self, name: str) -> int:
        """Frees the adapter's index (its factors are zeroed when the index is reused)."""
        with self._lock:
            i = self.index(name)
            self._names[i] = None
        return i

    def _write(self, i: int, loras: dict[str, LoRAWeight]) -> Any:
        def one(path, w):
            if not isinstance(w, MultiLoRAWeight):
                return w
            lead = w.a.ndim - 3
            at = (slice(None),) * lead + (i,)
            a, b = jnp.zeros_like(w.a[at]), jnp.zeros_like(w.b[at])
            lw = loras.get(path)
            if lw is not None:
                if tuple(lw.base.shape) != tuple(w.base.shape):
                    raise ValueError(f"{path}: the adapter's base has shape "
                                     f"{tuple(lw.base.shape)}, the served base "
                                     f"{tuple(w.base.shape)}")
                r = lw.a.shape[-1]
                a = a.at[..., :r].set(lw.a.astype(jnp.float32))
                b = b.at[..., :r, :].set(float(lw.scale) * lw.b.astype(jnp.float32))
            return w.replace(a=w.a.at[at].set(a), b=w.b.at[at].set(b))
        return map_weights(one, self.params)
