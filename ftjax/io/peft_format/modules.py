"""The transformers modules and raw parameters a PEFT adapter can sit on, and PEFT's rules
for selecting them (target_modules, rank/alpha patterns, layers_to_transform, ...).

Tables come from `ftjax.io.hf`'s tensor layout: a module path is the key of its weight in
the checkpoint without `.weight` (`model.layers.3.self_attn.q_proj`). The matching rules
mirror peft.tuners.tuners_utils (check_target_module_exists, get_pattern_key), PEFT 0.21.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Optional, Sequence

from ftjax.io import hf
from ftjax.io.peft_format.files import PREFIX
from ftjax.models.config import ModelConfig

__all__ = ["Module", "Param", "module_table", "param_table", "fused_layout", "pattern_value",
           "is_targeted", "is_feedforward", "split_key", "select_params", "nested_keys",
           "alpha_for", "type_key", "patterns_for", "target_modules_for", "target_params_for",
           "most_common", "bias_path"]


@dataclasses.dataclass(frozen=True)
class Module:
    """A transformers Linear/Conv1D/Embedding module and the ftjax leaf slots it covers.

    parts: (leaf path, layer index or None) per piece of the weight's output axis (three
    for GPT-2's fused c_attn, one otherwise); out_sizes: each piece's output width.
    """
    name: str
    embedding: bool
    parts: tuple[tuple[str, Any], ...]
    n_in: int
    out_sizes: tuple[int, ...]

    @property
    def n_out(self) -> int:
        return sum(self.out_sizes)


@dataclasses.dataclass(frozen=True)
class Param:
    """A raw transformers parameter PEFT adapts via `target_parameters` (MoE experts, router).

    name: the parameter path (`model.layers.3.mlp.experts.gate_up_proj`), module: the module
    holding it; experts: E for a stacked [E, ..] parameter, 0 for a 2-D one; parts, n_in,
    out_sizes as for Module (gate|up are two parts of gate_up_proj's output axis).
    """
    name: str
    module: str
    parts: tuple[tuple[str, Any], ...]
    experts: int
    n_in: int
    out_sizes: tuple[int, ...]

    @property
    def n_out(self) -> int:
        return sum(self.out_sizes)


_MOE = "layers/moe/"


def fused_layout(cfg: ModelConfig) -> list:
    """The HF tensors under transformers 5's module names (fused experts)."""
    return hf.tensor_layout(cfg, moe_layout="fused")


def _is_moe(e: Any) -> bool:
    return any(p.startswith(_MOE) for p, _ in e.targets)


def _per_slot(shape: tuple, index: Any) -> tuple:
    return tuple(shape[hf.n_index(index):])


def param_table(cfg: ModelConfig) -> dict[str, Param]:
    """Every parameter of cfg's transformers class adapted via `target_parameters` (the MoE
    router and experts), by parameter path, in the module's parameter order."""
    shapes = hf.leaf_shapes(cfg)
    out: dict[str, Param] = {}
    for e in fused_layout(cfg):
        if not _is_moe(e):
            continue
        leaf = [_per_slot(shapes[p], i) for p, i in e.targets]
        experts = leaf[0][0] if len(leaf[0]) == 3 else 0
        out[e.key] = Param(e.key, e.key.rsplit(".", 1)[0], e.targets, experts, leaf[0][-2],
                           tuple(s[-1] for s in leaf))
    return out


def module_table(cfg: ModelConfig, legacy_experts: bool = False) -> dict[str, Module]:
    """Every adaptable module of cfg's transformers class, by module path (file order).

    legacy_experts: also the per-expert Linear modules of transformers 4's Mixtral
    (`block_sparse_moe.experts.M.w1` ..., `block_sparse_moe.gate`), which ftjax reads only.
    """
    shapes = hf.leaf_shapes(cfg)
    out: dict[str, Module] = {}
    entries = [e for e in fused_layout(cfg) if not _is_moe(e)]
    if legacy_experts:
        entries += [e for e in hf.tensor_layout(cfg, moe_layout="hub") if _is_moe(e)]
    for e in entries:
        if not e.key.endswith(".weight"):
            continue
        paths = [p for p, _ in e.targets]
        if all(p.endswith("/kernel") for p in paths):
            emb = False
        elif len(paths) == 1 and paths[0].endswith("/embedding"):
            emb = True
        else:
            continue
        leaf = [_per_slot(shapes[p], i) for p, i in e.targets]
        out[e.key[:-len(".weight")]] = Module(e.key[:-len(".weight")], emb, e.targets,
                                               leaf[0][0], tuple(s[-1] for s in leaf))
    return out



def pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern lookup: the first key matching the end of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index(name: str, layers_pattern: Any) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def is_targeted(conf: dict, module: Module) -> bool:
    """Whether the adapter config selects `module` (PEFT's check_target_module_exists)."""
    name = module.name
    exclude = conf.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{k}") for k in exclude):
            return False
    for m in conf.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", name):
            return False
    targets = conf.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets.lower() == "all-linear":  # every Linear/Conv1D but the output layer
            return not module.embedding and name != "lm_head"
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = conf.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(name, conf.get("layers_pattern"))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def is_feedforward(conf: dict, name: str) -> bool:
    """IA3: whether `feedforward_modules` selects module `name` (its input is scaled)."""
    ff = conf.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(k) for k in ff)  # PEFT: endswith without a dot


def split_key(key: str, table: dict, suffixes: Sequence[str]) -> tuple[Optional[str], str]:
    """(module name, suffix) of `base_model.model.<module>.<suffix>`, or (None, reason)."""
    if not key.startswith(PREFIX):
        return None, f"keys start with {PREFIX!r}"
    rest = key[len(PREFIX):]
    for sfx in suffixes:
        if rest.endswith("." + sfx):
            name = rest[:-len(sfx) - 1]
            if name in table:
                return name, sfx
            return None, f"no adaptable module {name!r}"
    return None, f"no {'/'.join(suffixes)} suffix"


def select_params(conf: dict, ptable: dict[str, Param], cfg: ModelConfig,
                     problems: list[str]) -> list[str]:
    """The parameters `target_parameters` selects (PEFT: the path, or a suffix after a dot);
    a problem for entries that select no router/expert parameter ftjax knows."""
    targets = conf.get("target_parameters") or []
    if isinstance(targets, str):
        targets = [targets]
    hit = [n for n in ptable if any(n == t or n.endswith(f".{t}") for t in targets)]
    arch = hf.SUPPORTED_ARCHITECTURES.get(cfg.family, (cfg.family,))[0]
    known = sorted({type_key(n) for n in ptable})
    for t in targets:
        if not any(n == t or n.endswith(f".{t}") for n in ptable):
            problems.append(f"target_parameters entry {t!r} selects no parameter ftjax can "
                            f"adapt in {arch} (" + (f"it reads {known})" if known else
                            "target_parameters are read for mixture-of-experts weights only)"))
    return hit


def nested_keys(params: dict[str, Param], targeted: Sequence[str]) -> dict[str, str]:
    """Adapter key stem (module path with PEFT's `.base_layer`s) -> targeted parameter path.

    PEFT wraps a module's targeted parameters in its parameter order, each wrapper around the
    previous one, so the i-th of n targeted parameters sits under n-1-i `base_layer`s.
    """
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for name in params:
        if name in targeted:
            by_module[params[name].module].append(name)
    out = {}
    for module, names in by_module.items():
        for i, name in enumerate(names):
            out[module + ".base_layer" * (len(names) - 1 - i)] = name
    return out


def alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """An alpha for which PEFT's `alpha / r` (or `alpha / sqrt(r)`) is exactly `scale`.

    Prefers the shortest decimal (16 rather than 16.000000000000004), so configs stay readable.
    """
    denom = math.sqrt(rank) if rslora else rank
    exact = scale * denom
    for digits in range(0, 17):
        cand = round(exact, digits)
        if cand / denom == scale:
            return int(cand) if cand == int(cand) and abs(cand) < 2 ** 53 else cand
    cand = exact
    for _ in range(8):  # neighbouring doubles
        for c in (cand, math.nextafter(cand, math.inf), math.nextafter(cand, -math.inf)):
            if c / denom == scale:
                return c
        cand = math.nextafter(cand, math.inf if cand / denom < scale else -math.inf)
    return exact


def type_key(name: str) -> str:
    """'self_attn.q_proj' for 'model.layers.3.self_attn.q_proj' (the per-layer suffix)."""
    m = re.match(r"^.*?\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def patterns_for(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """rank/alpha_pattern {key: value} giving `values[module]` under PEFT's matching rule."""
    by_type: dict[str, set] = collections.defaultdict(set)
    for name, v in values.items():
        by_type[type_key(name)].add(v)
    pats = {k: next(iter(v)) for k, v in by_type.items()
            if len(v) == 1 and next(iter(v)) != default}
    if all(pattern_value(pats, n, default) == v for n, v in values.items()) \
            and not any(len(v) > 1 for v in by_type.values()):
        return dict(sorted(pats.items()))
    # Fall back to one escaped full module path per deviating module.
    pats = {re.escape(n): v for n, v in values.items() if v != default}
    return dict(sorted(pats.items()))


def target_modules_for(adapted: Sequence[str], table: dict[str, Module]) -> list[str]:
    """Shortest PEFT target_modules list (suffix match) that selects exactly `adapted`."""
    want = set(adapted)

    def selected(targets):
        return {n for n in table if n in targets or any(n.endswith(f".{t}") for t in targets)}

    for key_fn in (lambda n: n.rsplit(".", 1)[-1], type_key, lambda n: n):
        targets = sorted({key_fn(n) for n in adapted})
        if selected(targets) == want:
            return targets
    return sorted(want)


def target_params_for(adapted: Sequence[str], table: dict[str, Param]) -> list[str]:
    """PEFT target_parameters (suffix match) selecting exactly `adapted`: the per-layer paths
    (`mlp.experts.gate_up_proj`), never a bare name (`weight` would match every Linear)."""
    targets = sorted({type_key(n) for n in adapted})
    if {n for n in table if any(n.endswith(f".{t}") for t in targets)} == set(adapted):
        return targets
    return sorted(adapted)


def most_common(values: Sequence[Any]) -> Any:
    """The most frequent value (the first seen on ties)."""
    return collections.Counter(values).most_common(1)[0][0]


def bias_path(kernel_path: str) -> str:
    """".../bias" for ".../kernel"."""
    return kernel_path[:-len("kernel")] + "bias"
