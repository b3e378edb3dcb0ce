"""Meshes, logical-axis sharding rules, divisibility checks and multi-host set-up.

Every param leaf carries a tuple of *logical* axis names (``("layers", "embed", "heads")``);
a *rule set* maps each logical name to zero or more *mesh* axes. Changing the parallelism
strategy is changing the rule set (a preset name or a short list of pairs), never the model.

Mesh axes, always present in this order (absent ones have size 1 so rules can still name them):

    data      pure data parallelism (params replicated)
    fsdp      data parallelism with params/optimizer state sharded (ZeRO-3 style)
    expert    expert parallelism for MoE expert weights
    sequence  sequence/context parallelism (no preset uses it yet)
    tensor    Megatron-style tensor parallelism

Rule semantics (as in Flax's ``logical_to_mesh_axes``): for every dim, the rules naming its
logical axis are tried in order and the first one whose mesh axes are all still unused in
this spec wins; if none is usable the dim is replicated. A mesh axis therefore shards at most
one dim of any array. A logical name with no rule at all is an error (typos must not silently
replicate a 70B embedding); map it to ``None`` to replicate on purpose.

Everything that can fail because of shapes (divisibility, batch size, unused mesh axes) is
checked here *before* anything is compiled, with errors that list every offender and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "LOGICAL_AXES",
    "RULES",
    "Rules",
    "is_axes_leaf",
    "keypath_str",
    "make_mesh",
    "mesh_shape_from_config",
    "get_rules",
    "parse_rule_overrides",
    "logical_to_spec",
    "logical_sharding",
    "param_specs",
    "param_shardings",
    "state_shardings",
    "check_divisible",
    "check_mesh_axes_used",
    "check_batch_divisible",
    "validate",
    "batch_axes",
    "batch_sharding",
    "batch_shardings",
    "local_batch_rows",
    "shard_host_batch",
    "with_logical_constraint",
    "initialize_distributed",
    "detect_cluster_env",
]

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

#: Canonical mesh axis order. Outer axes (data) vary slowest over devices, so on TPU/GPU the
#: cheapest interconnect (within a host / ICI ring) goes to the innermost axis (tensor).
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "sequence", "tensor")

#: Logical axis names every preset has a rule for.
LOGICAL_AXES: tuple[str, ...] = (
    "batch", "seq", "layers", "vocab", "embed", "heads", "kv_heads", "mlp", "expert",
    "lora_rank",  # adapter rank dims (replicated by every preset)
)

MeshAxes = str | tuple[str, ...] | None
#: A rule set: ordered ``(logical_name, mesh_axes)`` pairs; ``mesh_axes`` is a mesh axis name,
#: a tuple of them (the dim is split over their product) or ``None`` (replicated).
Rules = tuple[tuple[str, MeshAxes], ...]
RulesLike = str | Sequence[Sequence[Any]] | Mapping[str, MeshAxes]


def _preset(**mapping: MeshAxes) -> Rules:
    """A preset with an explicit rule for every name in ``LOGICAL_AXES`` (default: replicate)."""
    unknown = set(mapping) - set(LOGICAL_AXES)
    assert not unknown, unknown
    return tuple((name, mapping.get(name)) for name in LOGICAL_AXES)


_BATCH = ("data", "fsdp")

#: Rule presets (the MaxText ``custom_mesh_and_rule`` idea as data). With a mesh axis of size 1
#: every rule naming it is harmless, so e.g. ``fsdp_tp`` on ``tensor=1`` equals ``fsdp``.
RULES: dict[str, Rules] = {
    # Pure data parallelism: every param replicated, batch split over data and fsdp.
    "dp": _preset(batch=_BATCH),
    # ZeRO-3 / FSDP: params (and optimizer state) sharded on their model-width dim.
    "fsdp": _preset(batch=_BATCH, embed="fsdp"),
    # FSDP over "fsdp" plus Megatron tensor parallelism over "tensor".
    "fsdp_tp": _preset(batch=_BATCH, embed="fsdp", vocab="tensor", heads="tensor",
                       kv_heads="tensor", mlp="tensor"),
    # Tensor parallelism only (params replicated across data/fsdp).
    "tp": _preset(batch=_BATCH, vocab="tensor", heads="tensor", kv_heads="tensor",
                  mlp="tensor"),
    # Expert parallelism for MoE: experts over "expert", which also splits the batch for the
    # dense parts (as in MaxText), plus fsdp/tensor as in fsdp_tp.
    "ep": _preset(batch=("data", "fsdp", "expert"), embed="fsdp", expert="expert",
                  vocab="tensor", heads="tensor", kv_heads="tensor", mlp="tensor"),
}


# --------------------------------------------------------------------------------------------
# Tree helpers
# --------------------------------------------------------------------------------------------

def is_axes_leaf(x: Any) -> bool:
    """True for a logical-axes tuple like ``("layers", None, "embed")`` (or ``()``)."""
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def keypath_str(path: Sequence[Any]) -> str:
    """``(DictKey('layers'), DictKey('attn'), ...)`` -> ``"layers/attn/..."``."""
    return "/".join(_key_str(k) for k in path)


def _flatten_axes(axes_tree: Any) -> tuple[list[tuple[Any, tuple]], Any]:
    """Flatten a logical-axes tree to ``[(path, axes), ...]`` and its treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes_leaf)
    for path, leaf in leaves:
        if not is_axes_leaf(leaf):
            raise TypeError(
                f"param_axes leaf at '{keypath_str(path)}' is {leaf!r}; expected a tuple of "
                "logical axis names (str) or None entries, e.g. ('layers', 'embed', 'mlp').")
    return leaves, treedef


def _mesh_str_from(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{n}={s}" for n, s in sizes.items())


def _mesh_str(mesh: Mesh) -> str:
    return _mesh_str_from(mesh.shape)


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------

def _cfg_items(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"expected a dict or ConfigDict, got {type(cfg).__name__}: {cfg!r}")


def mesh_shape_from_config(mesh_cfg: Any, device_count: int) -> dict[str, int]:
    """Resolve ``{axis: size}`` (one size may be -1) into sizes over all of ``MESH_AXES``.

    Missing axes get size 1. Raises ``ValueError`` when the product of sizes does not equal
    ``device_count`` or the config is malformed, saying what to change.
    """
    raw = _cfg_items(mesh_cfg)
    unknown = sorted(set(raw) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh config has unknown axes {unknown}; valid axes are "
                         f"{list(MESH_AXES)} (e.g. --config.mesh.fsdp=-1).")
    sizes: dict[str, int] = {}
    for name in MESH_AXES:
        v = raw.get(name, 1)
        if v is None:
            v = 1
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
            raise ValueError(f"mesh.{name}={v!r}: sizes must be positive ints, or -1 for "
                             "'all remaining devices'.")
        sizes[name] = int(v)
    auto = [n for n, s in sizes.items() if s == -1]
    shown = _mesh_str_from(sizes)
    if len(auto) > 1:
        raise ValueError(f"mesh ({shown}) has several -1 sizes {auto}; at most one axis can be "
                         "auto-filled. Give explicit sizes to all but one.")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if auto:
        if device_count % fixed:
            raise ValueError(
                f"mesh ({shown}): cannot fill mesh.{auto[0]}=-1 because the other axes "
                f"multiply to {fixed}, which does not divide jax.device_count()={device_count}. "
                f"Fix: choose sizes for the other axes whose product divides {device_count}.")
        sizes[auto[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(
            f"mesh ({shown}) needs {fixed} devices but jax.device_count()={device_count} "
            f"(over {jax.process_count()} process(es)). Fix: choose sizes whose product is "
            f"{device_count}, or set one axis to -1 to absorb the remaining devices "
            f"(e.g. --config.mesh.fsdp=-1).")
    return sizes


def _num_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices (DCN-connected islands) among ``devices``; 1 elsewhere."""
    if not devices or not hasattr(devices[0], "slice_index"):
        return 1
    return len({d.slice_index for d in devices})


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """Build a ``Mesh`` with axes ``MESH_AXES`` from ``{axis: size}`` (one size may be -1).

    Uses the global device list (``jax.devices()``), so under multi-process every process
    builds the same mesh. Axes are ``AxisType.Auto``: shardings are given to ``jax.jit`` and
    GSPMD propagates them (``jax.make_mesh`` defaults to Explicit axes since JAX 0.7).
    On a multi-slice TPU the slices (DCN) are laid out along ``data`` (or ``fsdp`` if ``data``
    is not a multiple of the slice count), keeping tensor/expert traffic inside a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape_from_config(mesh_cfg, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = _num_slices(devices)
    if slices > 1:
        dcn_axis = next((a for a in ("data", "fsdp") if sizes[a] % slices == 0), None)
        if dcn_axis is None:
            raise ValueError(
                f"mesh ({_mesh_str_from(sizes)}) spans {slices} TPU slices, but neither "
                f"mesh.data nor mesh.fsdp is a multiple of {slices}. Fix: e.g. "
                f"--config.mesh.data={slices} so that slices exchange only gradients.")
        dcn = tuple(slices if n == dcn_axis else 1 for n in MESH_AXES)
        ici = tuple(s // d for s, d in zip(shape, dcn))
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(arr, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------

def _norm_mesh_axes(logical: str, v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return () if v.lower() in ("none", "") else (v,)
    if isinstance(v, (tuple, list)) and all(isinstance(a, str) for a in v):
        return tuple(v)
    raise ValueError(f"rule for logical axis '{logical}' maps to {v!r}; expected a mesh axis "
                     f"name, a tuple of them, or None (mesh axes: {list(MESH_AXES)}).")


def _spec_entry(axes: tuple[str, ...]) -> MeshAxes:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def parse_rule_overrides(text: str) -> Rules:
    """Parse a command-line friendly override string into rules.

    ``"heads=none,mlp=tensor,batch=data+fsdp"`` -> ``(("heads", None), ("mlp", "tensor"),
    ("batch", ("data", "fsdp")))``. Meant for ``--config.sharding.rule_overrides=...``.
    """
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"rule override '{item}' in {text!r} is not 'logical=mesh_axes' "
                             "(e.g. 'heads=none' or 'batch=data+fsdp').")
        name, value = (s.strip() for s in item.split("=", 1))
        axes = tuple(a.strip() for a in value.split("+") if a.strip())
        axes = () if axes in ((), ("none",), ("None",)) else axes
        out.append((name, _spec_entry(axes)))
    return tuple(out)


def _rules_from(spec: RulesLike) -> list[tuple[str, tuple[str, ...]]]:
    if isinstance(spec, str):
        if spec in RULES:
            spec = RULES[spec]
        elif "=" in spec:
            spec = parse_rule_overrides(spec)
        else:
            raise ValueError(f"unknown sharding rule preset '{spec}'; presets are "
                             f"{sorted(RULES)} (or give a list of (logical, mesh_axes) pairs).")
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    pairs = spec.items() if isinstance(spec, Mapping) else spec
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"sharding rule #{i} is {pair!r}; expected a pair "
                             "(logical_name, mesh_axis | tuple of mesh axes | None).")
        out.append((pair[0], _norm_mesh_axes(pair[0], pair[1])))
    return out


def get_rules(spec: RulesLike, overrides: RulesLike | None = None) -> Rules:
    """Resolve a preset name, a list of pairs or a mapping into a normalised rule tuple.

    ``overrides`` (same forms, or ``"heads=none,mlp=tensor"``) are placed *before* the base
    rules, so they win under first-match semantics — the MaxText overlay idea. Mesh-axes
    entries of the result are a str, a tuple of str, or None. Idempotent.
    """
    rules = _rules_from(overrides) if overrides else []
    rules += _rules_from(spec)
    for name, axes in rules:
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule ('{name}', {_spec_entry(axes)!r}) names unknown mesh axes "
                             f"{bad}; mesh axes are {list(MESH_AXES)}.")
    return tuple((name, _spec_entry(axes)) for name, axes in rules)


def _lookup(rules: Rules, name: str) -> list[tuple[str, ...]]:
    return [_norm_mesh_axes(n, v) for n, v in rules if n == name]


def logical_to_spec(axes: Sequence[str | None], rules: RulesLike) -> P:
    """Map logical axis names to a ``PartitionSpec`` with one entry per dim.

    For each dim, the first rule for its name whose mesh axes are all unused so far wins; if
    every candidate reuses an already-used mesh axis, the dim is replicated. Raises
    ``KeyError`` for a logical name that has no rule.
    """
    rules = get_rules(rules)
    used: set[str] = set()
    entries: list[MeshAxes] = []
    for name in axes:
        if name is None:
            entries.append(None)
            continue
        candidates = _lookup(rules, name)
        if not candidates:
            raise KeyError(
                f"logical axis '{name}' (in {tuple(axes)}) has no sharding rule; known: "
                f"{sorted({n for n, _ in rules})}. Add ('{name}', None) to the rules to "
                f"replicate it, e.g. rule_overrides='{name}=none'.")
        chosen: tuple[str, ...] = ()
        for cand in candidates:
            if not used.intersection(cand):
                chosen = cand
                break
        used.update(chosen)
        entries.append(_spec_entry(chosen))
    return P(*entries)


def _spec_axes(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _check_mesh_has(mesh: Mesh, rules: Rules) -> None:
    for name, entry in rules:
        missing = [a for a in _spec_axes(entry) if a not in mesh.shape]
        if missing:
            raise ValueError(f"rule ('{name}', {entry!r}) uses mesh axes {missing} that mesh "
                             f"({_mesh_str(mesh)}) lacks; build it with make_mesh().")


def logical_sharding(axes: Sequence[str | None], mesh: Mesh, rules: RulesLike) -> NamedSharding:
    """``NamedSharding`` for one array with logical ``axes``."""
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def param_specs(axes_tree: Any, rules: RulesLike) -> Any:
    """Pytree of ``PartitionSpec`` with the structure of ``axes_tree``."""
    rules = get_rules(rules)
    leaves, treedef = _flatten_axes(axes_tree)
    return jax.tree_util.tree_unflatten(treedef, [logical_to_spec(a, rules) for _, a in leaves])


def param_shardings(axes_tree: Any, mesh: Mesh, rules: RulesLike) -> Any:
    """Pytree of ``NamedSharding`` with the structure of ``axes_tree`` (``param_axes(cfg)``)."""
    rules = get_rules(rules)
    _check_mesh_has(mesh, rules)
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
        table[tuple(_key_str(k) for k in path)] = (tuple(np.shape(leaf)), sh)
    replicated = NamedSharding(mesh, P())

    def pick(path: Sequence[Any], leaf: Any) -> Any:
        keys = tuple(_key_str(k) for k in path)
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
# Checks (run before compiling)
# --------------------------------------------------------------------------------------------

def _override_hint(name: str) -> str:
    return f"rule_overrides='{name}=none'"


def _divisibility_errors(shapes_tree: Any, axes_tree: Any, mesh: Mesh, rules: Rules) -> list[str]:
    axes_leaves, treedef = _flatten_axes(axes_tree)
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
            mesh_axes = _spec_axes(entry)
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
    axes_paths = {tuple(_key_str(k) for k in p) for p, _ in axes_leaves}
    shape_paths = {tuple(_key_str(k) for k in p)
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
    _check_mesh_has(mesh, rules)
    errors = _divisibility_errors(shapes_tree, axes_tree, mesh, rules)
    if errors:
        n_params = len({e.split(": ", 1)[0] for e in errors})
        raise ValueError(f"{n_params} param(s) cannot be sharded on mesh ({_mesh_str(mesh)}):"
                         "\n  - " + "\n  - ".join(errors))


def check_mesh_axes_used(mesh: Mesh, rules: RulesLike) -> None:
    """Raise if a mesh axis of size > 1 is named by no rule: its devices would duplicate work."""
    rules = get_rules(rules)
    named = {a for _, entry in rules for a in _spec_axes(entry)}
    idle = [f"{a}={s}" for a, s in mesh.shape.items() if s > 1 and a not in named]
    if idle:
        raise ValueError(
            f"mesh axes {idle} are used by no sharding rule, so their devices would all compute "
            f"the same thing. Fix: set them to 1 (and grow another axis), or pick rules that "
            f"use them (presets: {sorted(RULES)}; e.g. 'fsdp_tp' uses tensor, 'ep' uses expert).")


def batch_axes(mesh: Mesh, rules: RulesLike) -> tuple[str, ...]:
    """Mesh axes that split the batch dim (the rule for logical 'batch')."""
    return _spec_axes(logical_to_spec(("batch",), rules)[0])


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
            f"the mesh ({_mesh_str(mesh)}).")


def validate(mesh: Mesh, rules: RulesLike, *, shapes_tree: Any = None, axes_tree: Any = None,
             global_batch: int | None = None, accum_steps: int = 1) -> None:
    """Run every pre-compile check that applies; raise one ``ValueError`` with all problems."""
    rules = get_rules(rules)
    _check_mesh_has(mesh, rules)
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
        math.prod(mesh.shape[a] for a in _spec_axes(e)) for e in spec[1:])
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
        dim0 = _spec_axes(sh.spec[0])
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


# --------------------------------------------------------------------------------------------
# Multi-host initialisation
# --------------------------------------------------------------------------------------------

def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (JAX decides this from the PCI bus when it is imported)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # private module moved: fall back to the environment checks
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster_env(env: Mapping[str, str] | None = None,
                       tpu_vm: bool | None = None) -> str | None:
    """Name the multi-process launcher JAX can auto-configure, or None.

    Reads ``env`` (default ``os.environ``). A single SLURM task or a TPU VM host list with one
    entry is None. On a GCE TPU VM the host list lives in the metadata server, not in the
    environment, so any Cloud TPU VM counts (``tpu_vm``, default: detect; JAX's own
    initialisation then finds the workers and is a 1-process no-op on a single host).
    """
    if tpu_vm is None:
        tpu_vm = env is None and _on_cloud_tpu_vm()
    env = os.environ if env is None else env

    def as_int(key: str) -> int:
        try:
            return int(env.get(key, "0").split("(")[0])
        except ValueError:
            return 0

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    # SLURM_STEP_NODELIST exists only inside an `srun` step, which is what JAX's detector needs;
    # the sbatch script itself (one process) must not try to join a cluster.
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and \
            max(as_int("SLURM_STEP_NUM_TASKS"), as_int("SLURM_NTASKS")) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and as_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or as_int("MEGASCALE_NUM_SLICES") > 1:
        return "tpu-multislice"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu-pod"
    if tpu_vm and env.get("TPU_SKIP_MDS_QUERY") is None:
        return "cloud-tpu-vm"
    return None


def initialize_distributed(dist_cfg: Any = None) -> tuple[int, int]:
    """Join a multi-process JAX run if one is configured or detected; return (index, count).

    Must run before any other JAX call that touches devices. ``dist_cfg`` fields (all
    optional): ``coordinator_address`` ("host:port" of process 0), ``num_processes``,
    ``process_id``, ``local_device_ids``, ``cpu_collectives`` ("gloo"/"mpi"; needed for
    cross-process collectives on CPU), ``initialization_timeout`` (s). With nothing set,
    JAX auto-detects TPU pods, SLURM ``srun`` steps and Open MPI; otherwise it is a no-op.
    Idempotent.
    """
    cfg = _cfg_items(dist_cfg)
    known = {"coordinator_address", "num_processes", "process_id", "local_device_ids",
             "cpu_collectives", "initialization_timeout"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"distributed config has unknown fields {unknown}; known: "
                         f"{sorted(known)}.")
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()

    coordinator = cfg.get("coordinator_address") or None
    num = cfg.get("num_processes")
    pid = cfg.get("process_id")
    local_ids = cfg.get("local_device_ids")
    if local_ids is not None and not isinstance(local_ids, int):
        local_ids = [int(i) for i in local_ids]
    timeout = int(cfg.get("initialization_timeout") or 300)
    collectives = cfg.get("cpu_collectives")

    explicit = coordinator is not None or (num is not None and int(num) > 1)
    detected = None if explicit else detect_cluster_env()
    if not explicit and detected is None:
        return jax.process_index(), jax.process_count()  # single process: nothing to join

    if explicit:
        if num is not None and pid is not None and not 0 <= int(pid) < int(num):
            raise ValueError(f"distributed.process_id={pid} must be in [0, num_processes={num}).")
        if coordinator is None and detect_cluster_env() is None:
            raise ValueError(
                f"distributed.num_processes={num} but distributed.coordinator_address is unset "
                "and no cluster launcher (SLURM srun, TPU pod, Open MPI) was detected. Fix: "
                "--config.distributed.coordinator_address=HOST:PORT (process 0's address, the "
                "same on every process) and a distinct --config.distributed.process_id per process.")
    if collectives:
        # Only read by the CPU backend, so setting it is harmless on GPU/TPU; it must happen
        # before the backend starts, and we cannot ask for the platform without starting it.
        if collectives not in ("gloo", "mpi", "megascale"):
            raise ValueError(f"distributed.cpu_collectives={collectives!r}: use 'gloo' "
                             "(works everywhere) or 'mpi'.")
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=None if num is None else int(num),
                process_id=None if pid is None else int(pid),
                local_device_ids=local_ids,
                initialization_timeout=timeout)
        else:
            jax.distributed.initialize(local_device_ids=local_ids,
                                       initialization_timeout=timeout)
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({'explicit config' if explicit else detected}): "
            f"{e}. initialize_distributed() must run before any JAX computation or device "
            "query; call it first thing in main().") from e
    return jax.process_index(), jax.process_count()
