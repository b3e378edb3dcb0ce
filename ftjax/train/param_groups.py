"""Param groups: freeze, scale the learning rate of, or train only some layers of the params
matched by regexes over their paths (big_vision's "freezing as per-regex schedules").

    optimizer.param_groups = (
        ("embed/.*", None),                              # frozen
        (".*/b", 16.0),                                  # LoRA+: B at 16x the learning rate
        ("layers/.*", dict(layers=(-2, None))),          # only the last 2 stacked layers train
        ("lm_head/.*", dict(lr=0.1)),                    # same as ("lm_head/.*", 0.1)
    )

Paths are those of the trainable leaves ("layers/attn/q_proj/kernel", and for the fields of a
structured weight "layers/attn/q_proj/kernel/b"); the first pattern that fully matches a path
wins, and leaves matched by no pattern keep multiplier 1. A group spec is

  None      frozen: `ftjax.train.loop` moves such leaves into the frozen partition (no
            gradient, no optimizer state, not checkpointed), like `peft.train_patterns`; used
            on its own, `with_groups` zeroes their updates through `optax.multi_transform`, so no
            optimizer state is kept for them either.
  a number  a learning-rate multiplier: the group follows the run's schedule times this number
            (the update after the optimizer is scaled, which for SGD, Adam(W), Lion, ... is
            exactly a scaled learning rate, decoupled weight decay included).
  a dict    `lr` (multiplier, default 1) and/or `layers=(start, stop)`: a Python slice over the
            leading layer axis of stacked `layers/...` leaves ([L, ...]); slices outside it are
            frozen by a 0/1 mask broadcast over that axis, applied to the gradients (so they do
            not count towards clipping or moments) and to the updates (so weight decay and
            momentum do not move them). Negative indices count from the end: (-2, None) is the
            last two layers, whatever L is. These leaves keep optimizer state for all layers.

Every group follows the run's schedule (times its multiplier). On the command line write the
dicts as literals: --config.optimizer.param_groups='(("layers/.*", {"layers": (-2, None)}),)'.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
import optax

from ftjax.peft import core

LAYERS_PREFIX = "layers/"


@dataclasses.dataclass(frozen=True)
class Group:
    pattern: re.Pattern
    lr: Optional[float]                              # None = frozen
    layers: Optional[tuple[Optional[int], Optional[int]]] = None

    @property
    def frozen(self) -> bool:
        return self.lr is None


def _number(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{where}: expected a non-negative number, got {x!r}")
    return float(x)


def parse(groups: Any) -> tuple[Group, ...]:
    """Validates `optimizer.param_groups` (pairs of (regex, spec)); see the module docstring."""
    out = []
    for i, item in enumerate(groups or ()):
        where = f"optimizer.param_groups[{i}]"
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"{where}={item!r}: expected a (regex, spec) pair, spec being None "
                             "(frozen), a learning-rate multiplier or dict(lr=..., layers=(a, b))")
        pat, spec = core.compile_patterns([item[0]])[0], item[1]
        if spec is None:
            out.append(Group(pat, None))
        elif hasattr(spec, "keys"):
            unknown = set(spec.keys()) - {"lr", "layers"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}; use lr and layers")
            lr = _number(spec.get("lr", 1.0), f"{where}.lr")
            layers = spec.get("layers")
            if layers is not None:
                if (not isinstance(layers, (tuple, list)) or len(layers) != 2 or not all(
                        v is None or (isinstance(v, int) and not isinstance(v, bool))
                        for v in layers)):
                    raise ValueError(f"{where}.layers={layers!r}: expected (start, stop), ints "
                                     "or None, as a Python slice (e.g. (-2, None))")
                layers = tuple(layers)
            out.append(Group(pat, lr, layers))
        else:
            out.append(Group(pat, _number(spec, where)))
    return tuple(out)


def find(path: str, groups: Sequence[Group]) -> Optional[Group]:
    """The first group whose pattern fully matches `path` (None: no group, multiplier 1)."""
    return next((g for g in groups if g.pattern.fullmatch(path)), None)


def layer_mask(group: Group, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """0/1 float32 mask of a `layers=` group, shaped [L, 1, ...] to broadcast over a leaf."""
    if not path.startswith(LAYERS_PREFIX) or not shape:
        raise ValueError(f"param group {group.pattern.pattern!r} with layers={group.layers} "
                         f"matches {path!r} (shape {shape}), which is not a stacked layer leaf "
                         f"('{LAYERS_PREFIX}...', [L, ...]); narrow the pattern")
    n = shape[0]
    keep = np.zeros((n,), np.float32)
    keep[slice(*group.layers)] = 1.0
    if not keep.any():
        raise ValueError(f"param group {group.pattern.pattern!r}: layers={group.layers} selects "
                         f"none of the {n} layers of {path!r}")
    return keep.reshape((n,) + (1,) * (len(shape) - 1))


def _plan(tree: Any, groups: Sequence[Group], kind: str) -> Any:
    """Per-leaf static factors: kind "grad" (0/1 layer masks) or "update" (lr x mask)."""
    def one(path, x):
        p = core.path_str(path)
        g = find(p, groups)
        if g is None:
            return 1.0
        if g.frozen:
            return 0.0
        m = layer_mask(g, p, tuple(np.shape(x))) if g.layers is not None else 1.0
        return m * g.lr if kind == "update" else m
    return jax.tree_util.tree_map_with_path(one, tree)


def _scaled(updates: Any, factors: Any) -> Any:
    def one(u, f):
        if isinstance(f, float) and f == 1.0:
            return u
        return (u * np.asarray(f, np.float32)).astype(u.dtype)
    return jax.tree.map(one, updates, factors)


def _scale_by_plan(groups: Sequence[Group], kind: str) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        return _scaled(updates, _plan(updates, groups, kind)), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def with_groups(tx: optax.GradientTransformation, groups: Any) -> optax.GradientTransformation:
    """`tx` (clipping included) with the param groups applied; `tx` itself when there are none.

    chain(mask layer-range gradients, multi_transform(train: tx, frozen: zero), scale updates).
    """
    groups = parse(groups)
    if not groups:
        return tx
    parts = []
    if any(g.layers is not None for g in groups):
        parts.append(_scale_by_plan(groups, "grad"))
    if any(g.frozen for g in groups):
        def labels(tree):
            return jax.tree_util.tree_map_with_path(
                lambda p, _: "frozen" if getattr(find(core.path_str(p), groups), "frozen",
                                                  False) else "train", tree)
        parts.append(optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels))
    else:
        parts.append(tx)
    parts.append(_scale_by_plan(groups, "update"))
    chained = optax.chain(*parts)

    def init(params):
        _plan(params, groups, "update")  # fail before compiling, e.g. layers= on a non-layer leaf
        return chained.init(params)
    return optax.GradientTransformation(init, chained.update)


def freeze(mask: Any, groups: Any) -> Any:
    """A trainable mask (`core.trainable_mask`) with the leaves of frozen (None) groups turned
    off, so the loop gives them no gradient, optimizer state or checkpoint.

    Raises when a pattern matches no leaf of the tree (a typo would otherwise silently train
    everything), listing the paths.
    """
    groups = parse(groups)
    if not groups:
        return mask
    hits = [0] * len(groups)
    paths = []

    def one(path, m):
        p = core.path_str(path)
        paths.append(p)
        g = find(p, groups)
        if g is None:
            return m
        hits[groups.index(g)] += 1
        return m and not g.frozen
    out = jax.tree_util.tree_map_with_path(one, mask)
    unused = [g.pattern.pattern for g, n in zip(groups, hits) if n == 0]
    if unused:
        raise ValueError(f"optimizer.param_groups patterns {unused} match no param (or are "
                         f"shadowed by an earlier pattern); param paths are: {paths}")
    return out


def describe(tree: Any, groups: Any) -> dict[str, str]:
    """{path: "frozen" | "lr x m" | "lr x m, layers a:b"} for every leaf (for logs and docs)."""
    groups = parse(groups)
    out = {}

    def one(path, _):
        p = core.path_str(path)
        g = find(p, groups)
        if g is None or not g.frozen:
            lr = 1.0 if g is None else g.lr
            rng = "" if g is None or g.layers is None else \
                f", layers {':'.join('' if v is None else str(v) for v in g.layers)}"
            out[p] = f"lr x {lr:g}{rng}"
        else:
            out[p] = "frozen"
    jax.tree_util.tree_map_with_path(one, tree)
    return out


# ------------------------------------------------------------------------------------------
# Ready-made groups.
# ------------------------------------------------------------------------------------------

def loraplus(ratio: float = 16.0) -> tuple:
    """LoRA+ (Hayou et al. 2024): the B factors train at `ratio` x the learning rate of A
    (the paper recommends ratio ~ 2^4 for Adam). Prepend to other groups if any."""
    return ((r".*/b", float(ratio)),)


def last_layers(n: int, lr: float = 1.0, pattern: str = r"layers/.*") -> tuple:
    """The last `n` stacked layers train (earlier layer slices are frozen)."""
    if n <= 0:
        raise ValueError(f"last_layers(n={n}): n must be positive")
    return ((pattern, dict(layers=(-n, None), lr=lr)),)
