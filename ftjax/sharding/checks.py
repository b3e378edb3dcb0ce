"""Shape checks run before compiling: divisibility, batch size, unused mesh axes."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from ftjax.sharding.rules import (RULES, Rules, RulesLike, check_mesh_has, flatten_axes,
                                  get_rules, key_str, keypath_str, logical_to_spec, mesh_str,
                                  spec_axes)

# --------------------------------------------------------------------------------------------
# Checks (run before compiling)
# --------------------------------------------------------------------------------------------

def _override_hint(name: str) -> str:
    return f"rule_overrides='{name}=none'"


def _divisibility_errors(shapes_tree: Any, axes_tree: Any, mesh: Mesh, rules: Rules) -> list[str]:
    axes_leaves, treedef = flatten_axes(axes_tree)
    try:
        shape_subtrees = treedef.flatten_up_to(shapes_tree)
    except (ValueError, TypeError) as e:
        return [_structure_mismatch(shapes_tree, axes_leaves, e)]
    errors = []
    for (path, axes), leaf in zip(axes_leaves, shape_subtrees):
        where = keypath_str(path)
        shape = getattr(leaf, "shape", None)
        if shape is None:
            errors.append(f"{where}: expected an array (or ShapeDtypeStruct) for logical axes "
                          f"{axes}, found {type(leaf).__name__}. Give this weight its own axes "
                          "tree (structured weights provide one per field).")
            continue
        shape = tuple(shape)
        if len(shape) != len(axes):
            errors.append(f"{where}: shape {shape} has {len(shape)} dims but its logical axes "
                          f"{axes} name {len(axes)}; fix param_axes for this leaf.")
            continue
        try:
            spec = logical_to_spec(axes, rules)
        except KeyError as e:
            errors.append(f"{where}: {e.args[0]}")
            continue
        for dim, (size, name, entry) in enumerate(zip(shape, axes, spec)):
            mesh_axes = spec_axes(entry)
            n = math.prod(mesh.shape[a] for a in mesh_axes)
            if n > 1 and size % n:
                sizes = "*".join(f"{a}" for a in mesh_axes)
                fix = (f"choose a mesh where {sizes} (={n}) divides {size}, or map '{name}' to "
                       f"None in the rules ({_override_hint(name)})")
                errors.append(f"{where}: shape {shape}, dim {dim} (logical '{name}') = {size} "
                              f"is not divisible by mesh axes {mesh_axes} of size {n}. "
                              f"Fix: {fix}.")
    return errors


def _structure_mismatch(shapes_tree: Any, axes_leaves: list, err: Exception) -> str:
    axes_paths = {tuple(key_str(k) for k in p) for p, _ in axes_leaves}
    shape_paths = {tuple(key_str(k) for k in p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(shapes_tree)[0]}
    no_axes = sorted("/".join(s) for s in shape_paths
                     if not any(s[:len(a)] == a for a in axes_paths))
    no_param = sorted("/".join(a) for a in axes_paths
                      if not any(s[:len(a)] == a for s in shape_paths))
    return ("params and param_axes have different structures "
            f"(params without axes: {no_axes[:20] or 'none'}; axes without params: "
            f"{no_param[:20] or 'none'}). param_axes(cfg) must mirror init(cfg, key). ({err})")


def check_divisible(shapes_tree: Any, axes_tree: Any, mesh: Mesh, rules: RulesLike) -> None:
    """Raise one ``ValueError`` listing every param whose sharded dims do not divide the mesh.

    ``shapes_tree`` holds arrays or ``jax.ShapeDtypeStruct`` (``jax.eval_shape(init, ...)``)
    with the structure of ``axes_tree``. Also reports rank mismatches and unknown names.
    """
    rules = get_rules(rules)
    check_mesh_has(mesh, rules)
    errors = _divisibility_errors(shapes_tree, axes_tree, mesh, rules)
    if errors:
        n_params = len({e.split(": ", 1)[0] for e in errors})
        raise ValueError(f"{n_params} param(s) cannot be sharded on mesh ({mesh_str(mesh)}):"
                         "\n  - " + "\n  - ".join(errors))


def check_mesh_axes_used(mesh: Mesh, rules: RulesLike) -> None:
    """Raise if a mesh axis of size > 1 is named by no rule: its devices would duplicate work."""
    rules = get_rules(rules)
    named = {a for _, entry in rules for a in spec_axes(entry)}
    idle = [f"{a}={s}" for a, s in mesh.shape.items() if s > 1 and a not in named]
    if idle:
        raise ValueError(
            f"mesh axes {idle} are used by no sharding rule, so their devices would all compute "
            f"the same thing. Fix: set them to 1 (and grow another axis), or pick rules that "
            f"use them (presets: {sorted(RULES)}; e.g. 'fsdp_tp' uses tensor, 'ep' uses expert).")


def batch_axes(mesh: Mesh, rules: RulesLike) -> tuple[str, ...]:
    """Mesh axes that split the batch dim (the rule for logical 'batch')."""
    return spec_axes(logical_to_spec(("batch",), rules)[0])


def _batch_shards(mesh: Mesh, rules: RulesLike) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def check_batch_divisible(global_batch: int, mesh: Mesh, rules: RulesLike,
                          accum_steps: int = 1) -> None:
    """Check the global batch splits into ``accum_steps`` microbatches that split over devices.

    Each microbatch (``global_batch / accum_steps`` rows) is sharded over the batch mesh axes,
    and under multi-process every process loads an equal share of rows.
    """
    rules = get_rules(rules)
    axes = batch_axes(mesh, rules)
    shards = _batch_shards(mesh, rules)
    nproc = jax.process_count()
    problems = []
    if accum_steps < 1:
        problems.append(f"accum_steps={accum_steps} must be >= 1")
    elif global_batch % accum_steps:
        problems.append(f"global batch {global_batch} is not divisible by accum_steps="
                        f"{accum_steps}")
    else:
        micro = global_batch // accum_steps
        if micro % shards:
            problems.append(f"microbatch {micro} (= {global_batch} / accum_steps {accum_steps}) "
                            f"is not divisible by the batch mesh axes {axes} of size {shards}")
    if global_batch % nproc:
        problems.append(f"global batch {global_batch} is not divisible by the {nproc} processes")
    if problems:
        need = math.lcm(shards * max(accum_steps, 1), nproc)
        suggestion = max(1, -(-global_batch // need)) * need
        raise ValueError(
            "batch size does not fit the mesh: " + "; ".join(problems) + ". Fix: use a global "
            f"batch that is a multiple of {need} (e.g. {suggestion}), or change accum_steps or "
            f"the mesh ({mesh_str(mesh)}).")


def validate(mesh: Mesh, rules: RulesLike, *, shapes_tree: Any = None, axes_tree: Any = None,
             global_batch: int | None = None, accum_steps: int = 1) -> None:
    """Run every pre-compile check that applies; raise one ``ValueError`` with all problems."""
    rules = get_rules(rules)
    check_mesh_has(mesh, rules)
    msgs = []
    checks: list[Callable[[], None]] = [lambda: check_mesh_axes_used(mesh, rules)]
    if shapes_tree is not None and axes_tree is not None:
        checks.append(lambda: check_divisible(shapes_tree, axes_tree, mesh, rules))
    if global_batch is not None:
        checks.append(lambda: check_batch_divisible(global_batch, mesh, rules, accum_steps))
    for check in checks:
        try:
            check()
        except ValueError as e:
            msgs.append(str(e))
    if msgs:
        raise ValueError("sharding set-up is invalid:\n" + "\n".join(msgs))
