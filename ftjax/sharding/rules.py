"""Logical-axis names, rule presets and the logical -> mesh-axis mapping (PartitionSpecs)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

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


def key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def keypath_str(path: Sequence[Any]) -> str:
    """``(DictKey('layers'), DictKey('attn'), ...)`` -> ``"layers/attn/..."``."""
    return "/".join(key_str(k) for k in path)


def flatten_axes(axes_tree: Any) -> tuple[list[tuple[Any, tuple]], Any]:
    """Flatten a logical-axes tree to ``[(path, axes), ...]`` and its treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=is_axes_leaf)
    for path, leaf in leaves:
        if not is_axes_leaf(leaf):
            raise TypeError(
                f"param_axes leaf at '{keypath_str(path)}' is {leaf!r}; expected a tuple of "
                "logical axis names (str) or None entries, e.g. ('layers', 'embed', 'mlp').")
    return leaves, treedef


def mesh_str_from(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{n}={s}" for n, s in sizes.items())


def mesh_str(mesh: Mesh) -> str:
    return mesh_str_from(mesh.shape)



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


def spec_axes(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_mesh_has(mesh: Mesh, rules: Rules) -> None:
    for name, entry in rules:
        missing = [a for a in spec_axes(entry) if a not in mesh.shape]
        if missing:
            raise ValueError(f"rule ('{name}', {entry!r}) uses mesh axes {missing} that mesh "
                             f"({mesh_str(mesh)}) lacks; build it with make_mesh().")
