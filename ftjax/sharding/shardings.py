"""Param, optimizer-state and batch shardings from logical axes; host batches onto devices."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.sharding.rules import (RulesLike, check_mesh_has, flatten_axes, get_rules, key_str,
                                  logical_to_spec, spec_axes)

def logical_sharding(axes: Sequence[str | None], mesh: Mesh, rules: RulesLike) -> NamedSharding:
    """``NamedSharding`` for one array with logical ``axes``."""
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def param_specs(axes_tree: Any, rules: RulesLike) -> Any:
    """Pytree of ``PartitionSpec`` with the structure of ``axes_tree``."""
    rules = get_rules(rules)
    leaves, treedef = flatten_axes(axes_tree)
    return jax.tree_util.tree_unflatten(treedef, [logical_to_spec(a, rules) for _, a in leaves])


def param_shardings(axes_tree: Any, mesh: Mesh, rules: RulesLike) -> Any:
    """Pytree of ``NamedSharding`` with the structure of ``axes_tree`` (``param_axes(cfg)``)."""
    rules = get_rules(rules)
    check_mesh_has(mesh, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(axes_tree, rules),
                        is_leaf=lambda x: isinstance(x, P))


def state_shardings(state_shapes: Any, param_shapes: Any, param_sharding_tree: Any,
                    mesh: Mesh) -> Any:
    """Shardings for a train/optimizer state, derived from the params' shardings.

    A state leaf whose key path *ends with* a param's key path and has the same shape (Adam's
    ``mu``/``nu``, a full ``TrainState.params``, masked/multi-transform states over a subset)
    gets that param's sharding; the longest such suffix wins. Everything else (step counters,
    factored second moments, schedules' state) is replicated.
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(param_shapes)[0]
    shard_leaves = jax.tree.leaves(param_sharding_tree,
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(param_leaves) != len(shard_leaves):
        raise ValueError(f"param_shapes has {len(param_leaves)} leaves but the sharding tree "
                         f"has {len(shard_leaves)}; pass trees with the same structure.")
    table: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), sh in zip(param_leaves, shard_leaves):
        table[tuple(key_str(k) for k in path)] = (tuple(np.shape(leaf)), sh)
    replicated = NamedSharding(mesh, P())

    def pick(path: Sequence[Any], leaf: Any) -> Any:
        keys = tuple(key_str(k) for k in path)
        shape = tuple(np.shape(leaf))
        for i in range(len(keys)):
            hit = table.get(keys[i:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def with_logical_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh,
                            rules: RulesLike) -> jax.Array:
    """``with_sharding_constraint`` by logical names (for activations inside a jitted step)."""
    return jax.lax.with_sharding_constraint(x, logical_sharding(axes, mesh, rules))



# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh, rules: RulesLike, ndim: int = 2) -> NamedSharding:
    """``NamedSharding`` for a ``[B, T, ...]`` array: B over the 'batch' mesh axes, rest replicated."""
    if ndim < 1:
        raise ValueError(f"batch arrays need a leading batch dim; got ndim={ndim}")
    spec = logical_to_spec(("batch",), rules)
    return NamedSharding(mesh, P(spec[0], *([None] * (ndim - 1))))


def batch_shardings(batch: Any, mesh: Mesh, rules: RulesLike) -> Any:
    """Per-leaf batch shardings for a (nested) dict of arrays / ShapeDtypeStructs."""
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, max(1, np.ndim(x))), batch)


def _for_rank(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """Trim trailing (replicated) entries or pad with None so the spec fits ``ndim`` dims."""
    spec = tuple(sharding.spec)
    if len(spec) > ndim:
        if any(e is not None for e in spec[ndim:]):
            raise ValueError(f"sharding {sharding.spec} shards dims a rank-{ndim} array lacks")
        spec = spec[:ndim]
    return NamedSharding(sharding.mesh, P(*spec, *([None] * (ndim - len(spec)))))


def local_batch_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the global batch this process must supply for ``sharding``.

    With a process-major mesh and the batch split over all processes this is
    ``[p*B/P, (p+1)*B/P)``; if the batch is replicated across processes it is ``[0, B)``.
    """
    spec = tuple(sharding.spec) or (None,)
    mesh = sharding.mesh
    shape = (global_batch,) + tuple(
        math.prod(mesh.shape[a] for a in spec_axes(e)) for e in spec[1:])
    intervals = sorted({(idx[0] if idx else slice(None)).indices(global_batch)[:2]
                        for idx in sharding.addressable_devices_indices_map(shape).values()})
    for (_, stop), (start, _) in zip(intervals, intervals[1:]):
        if stop != start:
            raise ValueError(f"this process's devices hold non-contiguous batch rows "
                             f"{intervals} under {sharding.spec}; build the mesh with "
                             "make_mesh() so that devices are ordered process-major.")
    lo, hi = intervals[0][0], intervals[-1][1]
    return lo, hi


def shard_host_batch(batch: Any, sharding: NamedSharding | Any) -> Any:
    """Put a host (numpy) batch on devices as global ``jax.Array``s.

    ``sharding`` is one ``NamedSharding`` (adapted to each leaf's rank) or a tree of them.
    Single process: ``batch`` is the whole global batch and is ``device_put``. Multi-process:
    each process passes only its own rows — ``local_batch_rows(sharding, B)``, i.e. rows
    ``[p*B/P, (p+1)*B/P)`` for the usual batch sharding — and the global array is assembled
    with ``jax.make_array_from_process_local_data``.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: sharding, batch)
    else:
        shardings = sharding

    def put(x: Any, sh: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("batch leaves need a leading batch dim; got a scalar")
        sh = _for_rank(sh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        dim0 = spec_axes(sh.spec[0])
        shards = math.prod(sh.mesh.shape[a] for a in dim0)
        # Distinct dim-0 shards this process holds -> its share of the global batch.
        probe = local_batch_rows(sh, shards)
        local_shards = probe[1] - probe[0]
        if (x.shape[0] * shards) % local_shards:
            raise ValueError(f"local batch of {x.shape[0]} rows cannot cover {local_shards} of "
                             f"{shards} batch shards evenly")
        global_rows = x.shape[0] * shards // local_shards
        return jax.make_array_from_process_local_data(sh, x, (global_rows,) + x.shape[1:])

    return jax.tree.map(put, batch, shardings)
