"""The training state and its placement on a device mesh."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `rng` is a raw uint32[2] key (checkpoint-friendly)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_state(params: Any, tx, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def _path_key(path) -> tuple:
    out = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                out.append(getattr(p, attr))
                break
    return tuple(out)


def state_shardings(abstract_state: TrainState, param_shardings: Any, mesh) -> TrainState:
    """Shardings for a TrainState: params as given; optimizer leaves follow the param they mirror.

    An optimizer-state leaf whose path ends with a param's path and has that param's shape
    (Adam's mu/nu, momentum, ...) takes that param's sharding; anything else (counts, Adafactor's
    factored row/column statistics) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params):
        by_path[_path_key(path)] = leaf.shape
    sh_by_path = {_path_key(p): s for p, s in
                  jax.tree_util.tree_leaves_with_path(param_shardings)}

    def for_opt_leaf(path, leaf):
        key = _path_key(path)
        for n in range(len(key), 0, -1):
            suffix = key[-n:]
            if suffix in by_path and by_path[suffix] == leaf.shape:
                return sh_by_path[suffix]
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_sh, rng=replicated)
