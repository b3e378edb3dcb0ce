"""PEFT adapter directories <-> ftjax params with adapter leaves.

`save_peft_adapter(dir, cfg, params)` writes `adapter_config.json` + `adapter_model.safetensors`
that `peft.PeftModel.from_pretrained(hf_model, dir)` loads onto the transformers model
`ftjax.io.hf.save_pretrained` writes for `cfg`; `load_peft_adapter(dir, cfg, base_params)` reads
such a directory (written by PEFT or by ftjax) back into params with `LoRAWeight` leaves
(`DoRAWeight` for `use_dora`, `IA3Weight` for peft_type IA3). See docs/peft_format.md and
shared/reference/hf-formats-and-losses.md §2.

Layout facts (PEFT 0.21, checked against its source and by saving tiny models):
- a key is `base_model.model.<transformers module path>.<adapter tensor>`; the module path is
  the key of the module's weight in the checkpoint (`ftjax.io.hf.tensor_layout`, which this
  file reuses) without `.weight`, e.g. `model.layers.3.self_attn.q_proj`.
- Linear (and GPT-2 Conv1D) LoRA: `lora_A.weight` [r, in], `lora_B.weight` [out, r]; the
  update is `s * B @ A` on the [out, in] weight. ftjax's `a` [in, r] / `b` [r, out] are A.T and
  B.T, with the layer index as the leading axis of stacked leaves.
- Embedding LoRA: `lora_embedding_A` [r, vocab], `lora_embedding_B` [embed, r] (no `.weight`);
  the table update is `s * (B @ A).T` [vocab, embed], so again a = A.T, b = B.T.
- Scale s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; r and alpha per
  module from `rank_pattern` / `alpha_pattern` (first key k with
  `re.match(rf"(.*\\.)?({k})$", module)`).
- GPT-2's fused `c_attn` (q|k|v on the output axis) holds one LoRA for three ftjax leaves:
  written as A = [A_q; A_k; A_v] (ranks concatenated) and block-diagonal B, which is the same
  update; read by sharing A and splitting B's rows.
- DoRA: `lora_magnitude_vector` [out] (no `.weight`) holds m itself, the norms of W + sBA per
  output unit (dim 1 of [out, in]), = DoRAWeight.m (norms over `in` of the [in, out] kernel).
- IA3: `ia3_l` [out, 1] scales a module's output, [1, in] (modules in `feedforward_modules`)
  its input; = IA3Weight.ia3_l [.., out] / [.., in].

- Mixture-of-experts weights (Mixtral) are raw parameters in transformers 5, adapted through
  `target_parameters` (PEFT's `ParamWrapper`): for `mlp.experts.gate_up_proj` [E, 2f, d],
  `mlp.experts.down_proj` [E, d, f] and the router's `mlp.gate.weight` [E, d], `lora_A.weight`
  is [E*r, in] (expert-major rows: row e*r + j is A_e[j]) and `lora_B.weight` [out, r*E]
  (expert-minor columns: column j*E + e is B_e[:, j]); expert e's update is s * B_e @ A_e on its
  [out, in] slice. Several targeted parameters of one module nest wrappers in the module's
  parameter order (gate_up_proj inside down_proj), so the inner one's keys gain `.base_layer`
  (`mlp.experts.base_layer.lora_A.weight` for gate_up_proj when down_proj is targeted too).
  rank/alpha patterns match the parameter path (`mlp.experts.gate_up_proj`).
- The fused gate|up tensor has one A per expert shared by its two halves, while ftjax's gate
  and up adapters are independent: ftjax writes rank r_gate + r_up with A_e = [A_gate; A_up]
  and block-diagonal B_e (the same update), and reading splits B's rows; when B is block
  structured (every rank column feeds one half only) each half keeps just its own columns, so
  such adapters read back with their original factors. Transformers-4 era adapters on the
  per-expert `block_sparse_moe.experts.M.w1/w2/w3` (and `block_sparse_moe.gate`) Linear modules
  are read too.

ftjax stacks layers, so one LoRA leaf has one rank and one scale for all layers. An adapter
whose rank or alpha differs between layers of one module type (or that leaves layers out) is
read exactly by zero-padding A/B to the largest rank and folding each layer's scale into its B.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from ftjax.io import hf
from ftjax.io.params_file import flatten, unflatten
from ftjax.models.config import ModelConfig
from ftjax.peft.core import is_structured, materialize
from ftjax.peft.lora import LoRAWeight

__all__ = ["PeftFormatError", "save_peft_adapter", "load_peft_adapter", "read_adapter_config",
           "module_table", "param_table", "residual_to_standard", "CONFIG_NAME", "WEIGHTS_NAME"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# init_lora_weights values whose training rewrote the base weights (W - s*B0@A0): the adapter
# alone is wrong on the original base (PEFT's `path_initial_model_for_weight_conversion`
# converts such adapters to plain LoRA and records init_lora_weights=true).
_MUTATED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LORA_SUFFIXES = (("lora_A.weight", "A"), ("lora_B.weight", "B"),
                  ("lora_embedding_A", "A"), ("lora_embedding_B", "B"),
                  ("lora_magnitude_vector", "m"))


class PeftFormatError(ValueError):
    """A PEFT adapter that ftjax cannot read or write; lists every problem."""


def _fail(what: str, problems: list[str]) -> PeftFormatError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return PeftFormatError(f"{what}: {len(problems)} problem(s):\n{lines}")


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------------------------
# transformers modules an adapter can sit on, from ftjax.io.hf's tensor layout


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


def _layout(cfg: ModelConfig) -> list:
    """The HF tensors under transformers 5's module names (fused experts)."""
    return hf.tensor_layout(cfg, moe_layout="fused")


def _is_moe(e: Any) -> bool:
    return any(p.startswith(_MOE) for p, _ in e.targets)


def _per_slot(shape: tuple, index: Any) -> tuple:
    return tuple(shape[hf._n_index(index):])


def param_table(cfg: ModelConfig) -> dict[str, Param]:
    """Every parameter of cfg's transformers class adapted via `target_parameters` (the MoE
    router and experts), by parameter path, in the module's parameter order."""
    shapes = hf._leaf_shapes(cfg)
    out: dict[str, Param] = {}
    for e in _layout(cfg):
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
    shapes = hf._leaf_shapes(cfg)
    out: dict[str, Module] = {}
    entries = [e for e in _layout(cfg) if not _is_moe(e)]
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


# --------------------------------------------------------------------------------------------
# PEFT's matching rules (peft.tuners.tuners_utils.check_target_module_exists, get_pattern_key)


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
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


def _is_targeted(conf: dict, module: Module) -> bool:
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


# --------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass
class _Adapter:
    """One module's LoRA in PEFT layout: A [r, in], B [out, r], scale, DoRA magnitude [out];
    for stacked experts A [E, r, in], B [E, out, r] (one adapter per expert)."""
    A: np.ndarray
    B: np.ndarray
    scale: float
    magnitude: Optional[np.ndarray] = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[-2])


def _host(x: Any) -> np.ndarray:
    import jax
    return np.asarray(jax.device_get(x), np.float32)


def _slice(x: Any, layer: Any) -> np.ndarray:
    return _host(x if layer is None else x[layer])


def _kind(w: Any) -> str:
    """'lora', 'dora', 'ia3' or the class name of an adapter leaf ftjax cannot write."""
    name = type(w).__name__
    if name == "DoRAWeight":
        return "dora"
    if name == "IA3Weight":
        return "ia3"
    if isinstance(w, LoRAWeight):
        return "lora"
    return name


def _row_norms(w_in_out: np.ndarray) -> np.ndarray:
    """Norm of each output unit's weights: PEFT's `||W||` over dim 1 of the [out, in] weight."""
    return np.linalg.norm(w_in_out.astype(np.float64), axis=0).astype(np.float32)


def _part_adapter(w: Any, layer: Any) -> _Adapter:
    a, b = _slice(w.a, layer), _slice(w.b, layer)
    mag = None
    if _kind(w) == "dora":
        mag = _slice(w.m, layer).reshape(-1)
    return _Adapter(A=np.ascontiguousarray(np.swapaxes(a, -1, -2)),
                    B=np.ascontiguousarray(np.swapaxes(b, -1, -2)),
                    scale=float(w.scale), magnitude=mag)


def _module_adapter(module: Any, leaves: dict[str, Any]) -> Optional[_Adapter]:
    """The PEFT adapter of a Module or Param, combining the pieces of fused weights (GPT-2's
    q|k|v, Mixtral's gate|up); None when no piece is adapted."""
    pieces = [(k, _part_adapter(leaves[p], i)) for k, (p, i) in enumerate(module.parts)
              if p in leaves]
    if not pieces:
        return None
    if len(module.parts) == 1:
        return pieces[0][1]
    # A stacks the pieces' ranks, B is block-diagonal (pieces without an adapter contribute
    # zero rows): B @ A = sum_k (rows of piece k) B_k @ A_k. Differing scales are folded into
    # B relative to the first piece's.
    s0 = pieces[0][1].scale
    offsets = np.cumsum((0,) + module.out_sizes)
    r_total = sum(ad.rank for _, ad in pieces)
    lead = pieces[0][1].B.shape[:-2]
    B = np.zeros(lead + (module.n_out, r_total), np.float32)
    col = 0
    for k, ad in pieces:
        B[..., offsets[k]:offsets[k + 1], col:col + ad.rank] = \
            ad.B * np.float32(ad.scale / s0) if ad.scale != s0 else ad.B
        col += ad.rank
    A = np.concatenate([ad.A for _, ad in pieces], axis=-2)
    if any(ad.magnitude is not None for _, ad in pieces):
        raise PeftFormatError(f"DoRA on the fused module {module.name!r} is not supported")
    return _Adapter(A=A, B=B, scale=s0)


def _to_peft_factors(ad: _Adapter) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight, lora_B.weight) of a ParamWrapper: per-expert A [E, r, in] and
    B [E, out, r] become [E*r, in] (expert-major rows) and [out, r*E] (expert-minor columns)."""
    if ad.A.ndim == 2:
        return ad.A, ad.B
    e, r, n_in = ad.A.shape
    return (ad.A.reshape(e * r, n_in),
            np.ascontiguousarray(ad.B.transpose(1, 2, 0)).reshape(ad.B.shape[1], r * e))


def _from_peft_factors(A: np.ndarray, B: np.ndarray, experts: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_to_peft_factors`: per-expert A [E, r, in], B [E, out, r] (2-D as given)."""
    if not experts:
        return A, B
    r = A.shape[0] // experts
    return A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts).transpose(2, 0, 1)


def _nested_keys(params: dict[str, Param], targeted: Sequence[str]) -> dict[str, str]:
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


def _alpha_for(scale: float, rank: int, rslora: bool) -> float:
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


def _type_key(name: str) -> str:
    """'self_attn.q_proj' for 'model.layers.3.self_attn.q_proj' (the per-layer suffix)."""
    m = re.match(r"^.*?\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """rank/alpha_pattern {key: value} giving `values[module]` under PEFT's matching rule."""
    by_type: dict[str, set] = collections.defaultdict(set)
    for name, v in values.items():
        by_type[_type_key(name)].add(v)
    pats = {k: next(iter(v)) for k, v in by_type.items()
            if len(v) == 1 and next(iter(v)) != default}
    if all(_pattern_value(pats, n, default) == v for n, v in values.items()) \
            and not any(len(v) > 1 for v in by_type.values()):
        return dict(sorted(pats.items()))
    # Fall back to one escaped full module path per deviating module.
    pats = {re.escape(n): v for n, v in values.items() if v != default}
    return dict(sorted(pats.items()))


def _target_modules(adapted: Sequence[str], table: dict[str, Module]) -> list[str]:
    """Shortest PEFT target_modules list (suffix match) that selects exactly `adapted`."""
    want = set(adapted)

    def selected(targets):
        return {n for n in table if n in targets or any(n.endswith(f".{t}") for t in targets)}

    for key_fn in (lambda n: n.rsplit(".", 1)[-1], _type_key, lambda n: n):
        targets = sorted({key_fn(n) for n in adapted})
        if selected(targets) == want:
            return targets
    return sorted(want)


def _target_params(adapted: Sequence[str], table: dict[str, Param]) -> list[str]:
    """PEFT target_parameters (suffix match) selecting exactly `adapted`: the per-layer paths
    (`mlp.experts.gate_up_proj`), never a bare name (`weight` would match every Linear)."""
    targets = sorted({_type_key(n) for n in adapted})
    if {n for n in table if any(n.endswith(f".{t}") for t in targets)} == set(adapted):
        return targets
    return sorted(adapted)


def _most_common(values: Sequence[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def save_peft_adapter(path: str, cfg: ModelConfig, params: Any, *,
                      base_model_name_or_path: str = "", task_type: Optional[str] = "CAUSAL_LM",
                      use_rslora: Optional[bool] = None,
                      modules_to_save: Sequence[str] = ()) -> list[str]:
    """Writes the adapter leaves of `params` (LoRA, DoRA or IA3) as a PEFT adapter directory.

    Files: `adapter_config.json` (sorted keys, as PEFT writes) and `adapter_model.safetensors`
    (float32, `{"format": "pt"}`). r / lora_alpha are the most common rank and alpha, with
    `rank_pattern` / `alpha_pattern` for the modules that differ; every alpha is chosen so
    that PEFT's scale equals the leaf's `scale` exactly. `use_rslora` only changes how the
    scales are expressed (None: whichever needs fewer alpha_pattern entries, plain on ties).
    With any DoRA leaf the adapter is `use_dora` (PEFT's flag is global), and plain LoRA
    leaves get the magnitude that makes DoRA their identity. Leaves that are not adapters are
    not written: the adapter applies to the base model the user loads (e.g. the one
    `base_model_name_or_path` names), except `modules_to_save`: paths of plain leaves that
    were trained in full (e.g. "lm_head/kernel"), written as PEFT's `modules_to_save` (the
    whole transformers module: weight and bias). Returns the files written.
    """
    path = os.fspath(path)
    problems = hf.hf_problems(cfg)
    if problems:
        raise _fail(f"cannot write a PEFT adapter for a {cfg.family!r} ModelConfig", problems)
    table = module_table(cfg)
    ptable = param_table(cfg)
    param_slots = {p for t in ptable.values() for p, _ in t.parts}
    slots = {p for m in table.values() for p, _ in m.parts} | param_slots
    leaves: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    for p, w in flatten(params).items():
        if not is_structured(w):
            continue
        kinds[p] = _kind(w)
        if kinds[p] not in ("lora", "dora", "ia3"):
            problems.append(f"{p!r} is a {kinds[p]}, which has no PEFT form (supported: "
                            "LoRAWeight, DoRAWeight, IA3Weight)")
        elif p not in slots:
            problems.append(f"{p!r} holds an adapter, but it is not the weight of a "
                            f"transformers module of {hf.SUPPORTED_ARCHITECTURES[cfg.family][0]} "
                            f"(adaptable leaves: {sorted(slots)})")
        elif p in param_slots and kinds[p] != "lora":
            problems.append(f"{p!r} is a {kinds[p]} adapter on a mixture-of-experts weight; "
                            "PEFT adapts these raw parameters (target_parameters) with plain "
                            "LoRA only (use LoRA there, or export merged)")
        else:
            leaves[p] = w
    if not kinds:
        problems.append("params contain no adapter leaves (LoRAWeight); apply a PEFT method "
                        "first, or use ftjax.io.hf.save_pretrained for a full model")
    if "ia3" in kinds.values() and set(kinds.values()) != {"ia3"}:
        problems.append("IA3 leaves mixed with LoRA/DoRA leaves: a PEFT adapter has one "
                        f"peft_type ({', '.join(f'{p}: {k}' for p, k in kinds.items())})")
    if problems:
        raise _fail(f"cannot write PEFT adapter {path!r}", problems)
    saved_modules, full_tensors = _modules_to_save(path, cfg, params, modules_to_save, leaves)
    if "ia3" in kinds.values():
        tensors, conf = _ia3_tensors_and_config(path, cfg, table, leaves, flatten(params))
        conf.update(task_type=task_type, base_model_name_or_path=base_model_name_or_path or None,
                    modules_to_save=saved_modules)
        _write(path, {**tensors, **full_tensors}, conf)
        return [CONFIG_NAME, WEIGHTS_NAME]
    use_dora = "dora" in kinds.values()
    if use_dora:
        for p, w in leaves.items():
            if p.endswith("/embedding"):
                problems.append(f"DoRA/LoRA on the embedding {p!r} cannot be written with "
                                "use_dora=true (PEFT's embedding DoRA normalises other axes)")
        if problems:
            raise _fail(f"cannot write PEFT adapter {path!r}", problems)

    if use_dora and any(p in param_slots for p in leaves):
        raise _fail(f"cannot write PEFT adapter {path!r}", [
            "use_dora=true (DoRA leaves) together with LoRA on mixture-of-experts weights: "
            "PEFT's target_parameters LoRA does not work with use_dora, and use_dora is global "
            "to an adapter"])
    param_adapters = {n: ad for n, t in ptable.items()
                      if (ad := _module_adapter(t, leaves)) is not None}
    adapters: dict[str, _Adapter] = {}
    for name, module in table.items():
        ad = _module_adapter(module, leaves)
        if ad is None:
            continue
        if use_dora and len(module.parts) > 1:
            raise _fail(f"cannot write PEFT adapter {path!r}", [
                f"use_dora=true with an adapter on the fused module {name!r} (GPT-2 c_attn) "
                "is not supported"])
        if use_dora and ad.magnitude is None:
            # use_dora is global in PEFT: a plain LoRA module becomes DoRA with m = ||W + sBA||,
            # which is exactly the identity rescaling.
            w = leaves[module.parts[0][0]]
            base = _slice(materialize(w.base), module.parts[0][1])
            ad.magnitude = _row_norms(base + ad.scale * (ad.A.T @ ad.B.T))
        adapters[name] = ad

    # ftjax's LoRA on a tied embedding also changes the LM head (the same matrix). PEFT ties
    # the head's adapter to the embedding's (lora_A = emb_B.T, lora_B = emb_A.T) with
    # ensure_weight_tying, and writes the tied copies too; so do we.
    tied = next((n for n in adapters if cfg.tie_embeddings
                 and table[n].parts[0][0] == "embed/embedding"), None)
    head = {}
    if tied is not None:
        e = adapters[tied]
        head["lm_head"] = _Adapter(A=np.ascontiguousarray(e.B.T), B=np.ascontiguousarray(e.A.T),
                                   scale=e.scale)
    every = {**adapters, **head, **param_adapters}
    ranks = {n: ad.rank for n, ad in every.items()}
    r = int(_most_common(list(ranks.values())))
    best = None
    for rs in ((False, True) if use_rslora is None else (bool(use_rslora),)):
        alphas = {n: _alpha_for(ad.scale, ad.rank, rs) for n, ad in every.items()}
        alpha = _most_common(list(alphas.values()))
        pats = _patterns(alphas, alpha)
        if best is None or len(pats) < len(best[3]):
            best = (rs, alphas, alpha, pats)
    rslora, alphas, alpha, alpha_pattern = best
    rank_pattern = _patterns(ranks, r)
    for n, ad in every.items():  # check what PEFT will compute from the config
        rr = _pattern_value(rank_pattern, n, r)
        aa = _pattern_value(alpha_pattern, n, alpha)
        s = aa / math.sqrt(rr) if rslora else aa / rr
        if rr != ranks[n] or abs(s - ad.scale) > 1e-12 * abs(ad.scale):
            raise PeftFormatError(f"internal: config gives {n!r} r={rr}, scale={s}; the "
                                  f"adapter has r={ranks[n]}, scale={ad.scale}")

    conf = {
        "peft_type": "LORA", "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or None, "revision": None,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": use_dora,
        "target_modules": _target_modules(list(adapters), table) if adapters else [],
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": cfg.family == "gpt2", "bias": "none", "lora_bias": False,
        "lora_dropout": 0.0, "modules_to_save": saved_modules, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "ensure_weight_tying": tied is not None, "inference_mode": True,
    }
    if param_adapters:
        conf["target_parameters"] = _target_params(list(param_adapters), ptable)
    stems = {v: k for k, v in _nested_keys(ptable, list(param_adapters)).items()}
    tensors: dict[str, np.ndarray] = {}
    for name, ad in every.items():
        key = PREFIX + name
        if name in param_adapters:
            A, B = _to_peft_factors(ad)
            tensors[f"{PREFIX}{stems[name]}.lora_A.weight"] = A
            tensors[f"{PREFIX}{stems[name]}.lora_B.weight"] = B
            continue
        if name in table and table[name].embedding:
            tensors[f"{key}.lora_embedding_A"] = ad.A
            tensors[f"{key}.lora_embedding_B"] = ad.B
        else:
            tensors[f"{key}.lora_A.weight"] = ad.A
            tensors[f"{key}.lora_B.weight"] = ad.B
        if use_dora:
            tensors[f"{key}.lora_magnitude_vector"] = ad.magnitude
    tensors.update(full_tensors)
    _write(path, tensors, conf)
    return [CONFIG_NAME, WEIGHTS_NAME]


def _modules_to_save(path: str, cfg: ModelConfig, params: Any, paths: Sequence[str],
                     adapted: dict) -> tuple[Optional[list[str]], dict[str, np.ndarray]]:
    """(modules_to_save config value, full tensors) for the transformers modules holding the
    plain leaves `paths`; PEFT saves a listed module's whole state dict under its own keys."""
    if not paths:
        return None, {}
    flat = flatten(params)
    layout = hf.tensor_layout(cfg)
    by_module: dict[str, list] = collections.defaultdict(list)
    for e in layout:
        by_module[e.key.rsplit(".", 1)[0]].append(e)
    problems = []
    for p in paths:
        if p not in flat:
            problems.append(f"modules_to_save: no param {p!r}")
        elif is_structured(flat[p]):
            problems.append(f"modules_to_save: {p!r} is an adapter leaf, not a plain weight")
        elif cfg.tie_embeddings and p == "embed/embedding":
            problems.append("modules_to_save: the embedding of a model with tied embeddings "
                            "(export it merged instead)")
    wanted = {m for m, es in by_module.items()
              if any(leaf in paths for e in es for leaf, _ in e.targets)}
    for m in sorted(wanted, key=_natural_key):
        clash = [leaf for e in by_module[m] for leaf, _ in e.targets if leaf in adapted]
        if clash:
            problems.append(f"modules_to_save: module {m!r} also holds the adapter leaves "
                            f"{sorted(set(clash))} (PEFT does not adapt saved modules)")
    if problems:
        raise _fail(f"cannot write PEFT adapter {path!r}", problems)

    def selected(names):
        return {m for m in by_module if any(re.match(rf"(^|.*\.){n}($|\..*)", m)
                                            for n in names)}
    names = sorted({m.rsplit(".", 1)[-1] for m in wanted})
    if selected(names) != wanted:
        names = sorted(re.escape(m) for m in wanted)
    host = {leaf: _host_any(flat[leaf]) for m in wanted for e in by_module[m]
            for leaf, _ in e.targets}
    tensors = {}
    for m in wanted:
        for e in by_module[m]:
            parts = [host[leaf] if layer is None else host[leaf][layer]
                     for leaf, layer in e.targets]
            tensors[PREFIX + e.key] = e.to_hf(parts)
    return names, tensors


def _write(path: str, tensors: dict[str, np.ndarray], conf: dict) -> None:
    from safetensors.numpy import save_file
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, WEIGHTS_NAME + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, WEIGHTS_NAME))
    hf._write_json(os.path.join(path, CONFIG_NAME), conf)


def _bias_path(kernel_path: str) -> str:
    return kernel_path[:-len("kernel")] + "bias"


def _ia3_tensors_and_config(path: str, cfg: ModelConfig, table: dict, leaves: dict,
                            flat: dict) -> tuple[dict, dict]:
    """IA3: `ia3_l` [out, 1] (output scaling) or [1, in] (feedforward_modules: input)."""
    problems, tensors, ff_names, names = [], {}, [], []
    for name, module in table.items():
        hit = [(p, i) for p, i in module.parts if p in leaves]
        if not hit:
            continue
        if len(module.parts) > 1:
            problems.append(f"IA3 on the fused module {name!r} (GPT-2 c_attn) is not supported")
            continue
        (p, i), = hit
        w = leaves[p]
        if not w.feedforward and _bias_path(p) in flat:
            problems.append(f"{p!r}: IA3 output scaling of a biased projection; PEFT also "
                            "scales the bias, ftjax does not (make it a feedforward target or "
                            "leave it out)")
            continue
        vec = _slice(w.ia3_l, i).reshape(-1)
        tensors[f"{PREFIX}{name}.ia3_l"] = vec[None, :] if w.feedforward else vec[:, None]
        names.append(name)
        if w.feedforward:
            ff_names.append(name)
    if problems:
        raise _fail(f"cannot write PEFT adapter {path!r}", problems)
    targets = _target_modules(names, table)
    ff = _target_modules(ff_names, table) if ff_names else []
    ff_sel = {n for n in names if any(n.endswith(f) for f in ff)}  # PEFT: endswith, no dot
    if ff_sel != set(ff_names) or not set(ff) <= set(targets):
        ff = sorted(re.escape(n) for n in ff_names)
        ff = "|".join(ff) if ff else []
        targets = "|".join(re.escape(n) for n in names)
    conf = {"peft_type": "IA3", "revision": None, "target_modules": targets,
            "feedforward_modules": ff, "fan_in_fan_out": cfg.family == "gpt2",
            "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None,
            "inference_mode": True}
    return tensors, conf


# --------------------------------------------------------------------------------------------
# Reading


def read_adapter_config(path: str) -> dict:
    """The adapter_config.json dict of a PEFT adapter directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"PEFT adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no {CONFIG_NAME}; is it a PEFT save_pretrained "
                                "directory?")
    with open(cfg_path) as f:
        conf = json.load(f)
    if "peft_type" not in conf:
        raise PeftFormatError(f"{cfg_path} has no 'peft_type'")
    return conf


def _config_problems(conf: dict, dora_ok: bool, ia3_ok: bool) -> list[str]:
    problems = []
    ptype = str(conf["peft_type"]).upper()
    if ptype == "IA3" and ia3_ok:
        return problems
    if ptype != "LORA":
        kinds = "LORA (incl. rsLoRA, rank/alpha patterns" + (", DoRA)" if dora_ok else ")") \
            + (" and IA3" if ia3_ok else "")
        problems.append(f"peft_type {conf['peft_type']!r} is not supported (ftjax reads {kinds} "
                        "adapters)")
        return problems
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATED_BASE_INITS):
        problems.append(f"init_lora_weights={init!r}: this initialisation rewrote the base "
                        "weights, so the adapter is only valid on that residual model; convert "
                        "it with PEFT's save_pretrained(..., path_initial_model_for_weight_"
                        "conversion=...) first")
    if conf.get("use_dora") and not dora_ok:
        problems.append("use_dora=true, but ftjax.peft.dora.DoRAWeight is not available")
    if conf.get("lora_bias"):
        problems.append("lora_bias=true (a bias on lora_B) has no ftjax LoRAWeight form")
    for key in ("layer_replication", "trainable_token_indices", "alora_invocation_tokens"):
        if conf.get(key):
            problems.append(f"{key}={conf[key]!r} is not supported")
    for key in ("use_qalora", "use_bdlora"):
        if conf.get(key):
            problems.append(f"{key}=true (a LoRA variant) is not supported")
    for key in ("velora_config", "kasa_config", "monteclora_config", "arrow_config"):
        if conf.get(key):
            problems.append(f"{key} (a LoRA variant) is not supported")
    if conf.get("fan_in_fan_out") not in (None, False, True):
        problems.append(f"fan_in_fan_out={conf['fan_in_fan_out']!r}")
    return problems


def _dora_class():
    try:
        from ftjax.peft.dora import DoRAWeight
    except ImportError:
        return None
    return DoRAWeight


def _ia3_class():
    try:
        from ftjax.peft.ia3 import IA3Weight
    except ImportError:
        return None
    return IA3Weight


def _read_tensors(path: str, problems: list[str]) -> dict[str, np.ndarray]:
    f = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(f):
        bins = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {bins}: ftjax reads no pickles; re-save with PEFT's save_pretrained, "
                "which writes safetensors by default)") if bins else ""
        problems.append(f"no {WEIGHTS_NAME} in {path!r}{hint}")
        return {}
    from safetensors.numpy import load_file
    return load_file(f)


def load_peft_adapter(path: str, cfg: ModelConfig, base_params: Any) -> Any:
    """`base_params` with the adapter of a PEFT directory applied as structured leaves.

    LORA adapters become LoRAWeight leaves (DoRAWeight with use_dora), IA3 adapters IA3Weight
    leaves. Reads rank_pattern / alpha_pattern / use_rslora, target_modules (list or regex),
    target_parameters (Mixtral's router and fused experts; also transformers-4 per-expert
    w1/w2/w3 modules), exclude_modules, layers_to_transform, feedforward_modules. Full weights
    in the file (an embedding's `base_layer.weight`, `modules_to_save`, `bias="all"` biases)
    replace the corresponding base weights, as PEFT's own loader does. Raises
    PeftFormatError listing every missing, unexpected or misshaped tensor and every
    unsupported config field. The input tree is not modified.
    """
    path = os.fspath(path)
    conf = read_adapter_config(path)
    DoRA, IA3 = _dora_class(), _ia3_class()
    problems = _config_problems(conf, DoRA is not None, IA3 is not None)
    problems += [f"model: {p}" for p in hf.hf_problems(cfg)]
    if problems:
        raise _fail(f"cannot load PEFT adapter {path!r}", problems)
    tensors = _read_tensors(path, problems)
    # transformers-4 Mixtral adapters sit on per-expert Linear modules (block_sparse_moe.*)
    table = module_table(cfg, legacy_experts=any(".block_sparse_moe." in k for k in tensors))
    full = {e.key: e for e in _layout(cfg)}
    shapes = hf._leaf_shapes(cfg)
    ptable = param_table(cfg)
    targeted_params = _targeted_params(conf, ptable, cfg, problems)
    stems = _nested_keys(ptable, targeted_params)
    if str(conf["peft_type"]).upper() == "IA3":
        return _load_ia3(path, conf, cfg, base_params, tensors, table, full, shapes, problems,
                         IA3)
    rslora = bool(conf.get("use_rslora", False))
    use_dora = bool(conf.get("use_dora", False))
    r0, alpha0 = conf.get("r", 8), conf.get("lora_alpha", 8)
    rank_pattern = conf.get("rank_pattern") or {}
    alpha_pattern = conf.get("alpha_pattern") or {}

    if use_dora and targeted_params:
        problems.append("use_dora=true with target_parameters: PEFT applies no DoRA to raw "
                        "parameters")
    found: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    found_params: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    overrides: dict[str, np.ndarray] = {}
    tied_head: dict[str, np.ndarray] = {}  # lm_head tensors of a tied model (see below)
    unexpected: list[str] = []
    for key in sorted(tensors, key=_natural_key):
        if not key.startswith(PREFIX):
            unexpected.append(f"{key} (keys start with {PREFIX!r})")
            continue
        rest = key[len(PREFIX):]
        if cfg.tie_embeddings and rest.startswith("lm_head."):
            tied_head[key] = tensors[key]
            continue
        stem, _, leaf_name = rest.rpartition(".lora_")
        if stem in stems and leaf_name in ("A.weight", "B.weight"):
            found_params[stems[stem]][leaf_name[0]] = tensors[key]
            continue
        for suffix, what in _LORA_SUFFIXES:
            if rest.endswith("." + suffix):
                name = rest[:-len(suffix) - 1]
                if name not in table:
                    unexpected.append(f"{key} (no adaptable module {name!r} in "
                                      f"{hf.SUPPORTED_ARCHITECTURES[cfg.family][0]})")
                elif table[name].embedding != suffix.startswith("lora_embedding") \
                        and what != "m":
                    kind = "an Embedding" if table[name].embedding else "a Linear"
                    unexpected.append(f"{key} ({name!r} is {kind})")
                elif what == "m" and not use_dora:
                    unexpected.append(f"{key} (use_dora is false)")
                elif not _is_targeted(conf, table[name]):
                    unexpected.append(f"{key} ({name!r} is not selected by target_modules="
                                      f"{conf.get('target_modules')!r})")
                else:
                    found[name][what] = tensors[key]
                break
        else:
            plain = rest.replace(".base_layer.", ".")
            if plain in full:
                overrides[plain] = tensors[key]
            else:
                unexpected.append(f"{key} (no adapter tensor suffix, and {plain!r} is no "
                                  f"weight of {hf.SUPPORTED_ARCHITECTURES[cfg.family][0]})")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")

    missing = []
    adapters: dict[str, _Adapter] = {}
    for name, module in table.items():
        if not _is_targeted(conf, module):
            continue
        need = ("A", "B", "m") if use_dora else ("A", "B")
        sfx = dict(A="lora_embedding_A", B="lora_embedding_B") if module.embedding else \
            dict(A="lora_A.weight", B="lora_B.weight")
        sfx["m"] = "lora_magnitude_vector"
        absent = [f"{PREFIX}{name}.{sfx[w]}" for w in need if w not in found.get(name, {})]
        if absent:
            missing += absent
            continue
        t = found[name]
        A, B = t["A"], t["B"]
        r = int(_pattern_value(rank_pattern, name, r0))
        shape_ok = True
        for key, arr, want in ((sfx["A"], A, (r, module.n_in)), (sfx["B"], B, (module.n_out, r))):
            if tuple(arr.shape) != want:
                problems.append(f"tensor {PREFIX}{name}.{key} has shape {list(arr.shape)}, "
                                f"expected {list(want)} (r={r} from the config)")
                shape_ok = False
        if use_dora and tuple(t["m"].shape) != (module.n_out,):
            problems.append(f"tensor {PREFIX}{name}.lora_magnitude_vector has shape "
                            f"{list(t['m'].shape)}, expected [{module.n_out}]")
            shape_ok = False
        if use_dora and (module.embedding or len(module.parts) > 1):
            problems.append(f"DoRA on {name!r} is not supported (embeddings and fused modules)")
            shape_ok = False
        if not shape_ok:
            continue
        alpha = _pattern_value(alpha_pattern, name, alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        adapters[name] = _Adapter(A=np.asarray(A, np.float32), B=np.asarray(B, np.float32),
                                  scale=scale, magnitude=t.get("m"))
    param_adapters: dict[str, _Adapter] = {}
    stem_of = {v: k for k, v in stems.items()}
    for name in targeted_params:
        t, par = found_params.get(name, {}), ptable[name]
        keys = {w: f"{PREFIX}{stem_of[name]}.lora_{w}.weight" for w in "AB"}
        absent = [keys[w] for w in "AB" if w not in t]
        if absent:
            missing += absent
            continue
        r = int(_pattern_value(rank_pattern, name, r0))
        e = max(par.experts, 1)
        bad = [f"tensor {keys[w]} has shape {list(t[w].shape)}, expected {list(want)} (r={r} "
               f"from the config{f', {e} experts' if par.experts else ''})"
               for w, want in (("A", (e * r, par.n_in)), ("B", (par.n_out, r * e)))
               if tuple(t[w].shape) != want]
        if bad:
            problems += bad
            continue
        alpha = _pattern_value(alpha_pattern, name, alpha0)
        A, B = _from_peft_factors(np.asarray(t["A"], np.float32), np.asarray(t["B"], np.float32),
                                  par.experts)
        param_adapters[name] = _Adapter(A=A, B=B,
                                        scale=alpha / math.sqrt(r) if rslora else alpha / r)
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    if cfg.tie_embeddings:
        problems += _tied_head_problems(tied_head, table, adapters, overrides, base_params)
    for key, t in overrides.items():
        want = full[key].hf_shape(shapes)
        if tuple(t.shape) != tuple(want):
            problems.append(f"tensor {key!r} has shape {list(t.shape)}, expected {list(want)}")
    if not adapters and not param_adapters and not problems:
        problems.append(f"no module of {hf.SUPPORTED_ARCHITECTURES[cfg.family][0]} is selected "
                        f"by target_modules={conf.get('target_modules')!r}; modules are "
                        f"{list(table)[:12]}...")
    if problems:
        raise _fail(f"cannot load PEFT adapter {path!r}", problems)

    flat = dict(flatten(base_params))
    copied: set[str] = set()
    for key, t in overrides.items():  # full weights from the file replace the base's
        e = full[key]
        for (leaf, layer), part in zip(e.targets, e.to_ftjax(t)):
            if leaf not in copied:
                flat[leaf] = np.array(_host_any(flat[leaf]))
                copied.add(leaf)
            if layer is None:
                flat[leaf][...] = part
            else:
                flat[leaf][layer] = part

    # Per ftjax leaf: {layer: (a [in, r], b [r, out], scale, magnitude)}.
    per_leaf: dict[str, dict[Optional[int], tuple]] = collections.defaultdict(dict)
    for name, ad in adapters.items():
        module = table[name]
        offsets = np.cumsum((0,) + module.out_sizes)
        for k, (leaf, layer) in enumerate(module.parts):
            b = ad.B[offsets[k]:offsets[k + 1]]
            mag = None if ad.magnitude is None else ad.magnitude[offsets[k]:offsets[k + 1]]
            per_leaf[leaf][layer] = (ad.A.T, b.T, ad.scale, mag)
    for name, ad in param_adapters.items():
        par = ptable[name]
        for (leaf, layer), part in zip(par.parts, _fused_parts(ad.A, ad.B, par.out_sizes)):
            if part is not None:
                per_leaf[leaf][layer] = (np.swapaxes(part[0], -1, -2),
                                         np.swapaxes(part[1], -1, -2), ad.scale, None)
    for leaf, by_layer in per_leaf.items():
        flat[leaf] = _assemble(flat[leaf], by_layer, shapes[leaf], use_dora, DoRA)
    return unflatten(flat)


def _targeted_params(conf: dict, ptable: dict[str, Param], cfg: ModelConfig,
                     problems: list[str]) -> list[str]:
    """The parameters `target_parameters` selects (PEFT: the path, or a suffix after a dot);
    a problem for entries that select no router/expert parameter ftjax knows."""
    targets = conf.get("target_parameters") or []
    if isinstance(targets, str):
        targets = [targets]
    hit = [n for n in ptable if any(n == t or n.endswith(f".{t}") for t in targets)]
    arch = hf.SUPPORTED_ARCHITECTURES.get(cfg.family, (cfg.family,))[0]
    known = sorted({_type_key(n) for n in ptable})
    for t in targets:
        if not any(n == t or n.endswith(f".{t}") for n in ptable):
            problems.append(f"target_parameters entry {t!r} selects no parameter ftjax can "
                            f"adapt in {arch} (" + (f"it reads {known})" if known else
                            "target_parameters are read for mixture-of-experts weights only)"))
    return hit


def _fused_parts(A: np.ndarray, B: np.ndarray, out_sizes: Sequence[int]) -> list:
    """(A_k [.., r_k, in], B_k [.., out_k, r_k]) per part of a fused output axis, or None for
    a part the adapter leaves unchanged.

    The parts share A. When B is block structured (every rank column feeds one part only, as
    ftjax writes gate|up), each part keeps only its own columns: its exact original factors
    (a part with no columns has no adapter). Otherwise (or when B is all zero) every part gets
    the shared A and its rows of B.
    """
    offsets = np.cumsum((0,) + tuple(out_sizes))
    rows = [B[..., offsets[k]:offsets[k + 1], :] for k in range(len(out_sizes))]
    if len(rows) == 1:
        return [(A, B)]
    used = [np.any(r != 0, axis=tuple(range(r.ndim - 1))) for r in rows]
    if any(u.any() for u in used) and int(np.sum(used, axis=0).max()) <= 1:
        return [(A[..., u, :], r[..., u]) if u.any() else None for u, r in zip(used, rows)]
    return [(A, r) for r in rows]


def _is_feedforward(conf: dict, name: str) -> bool:
    ff = conf.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(k) for k in ff)  # PEFT: endswith without a dot


def _split_key(key: str, table: dict, suffixes: Sequence[str]) -> tuple[Optional[str], str]:
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


def _load_ia3(path, conf, cfg, base_params, tensors, table, full, shapes, problems, IA3):
    """IA3: one scaling vector per module, ones where a layer has none."""
    arch = hf.SUPPORTED_ARCHITECTURES[cfg.family][0]
    flat = dict(flatten(base_params))
    found, unexpected, missing = {}, [], []
    for key in sorted(tensors, key=_natural_key):
        name, why = _split_key(key, table, ("ia3_l",))
        if name is None:
            unexpected.append(f"{key} ({why} in {arch})")
        elif not _is_targeted(conf, table[name]):
            unexpected.append(f"{key} ({name!r} is not selected by target_modules="
                              f"{conf.get('target_modules')!r})")
        else:
            found[name] = tensors[key]
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    per_leaf: dict[str, dict] = collections.defaultdict(dict)
    ff_of: dict[str, set] = collections.defaultdict(set)
    for name, module in table.items():
        if not _is_targeted(conf, module):
            continue
        key = f"{PREFIX}{name}.ia3_l"
        if name not in found:
            missing.append(key)
            continue
        ff = _is_feedforward(conf, name)
        want = (1, module.n_in) if ff else (module.n_out, 1)
        if tuple(found[name].shape) != want:
            problems.append(f"tensor {key} has shape {list(found[name].shape)}, expected "
                            f"{list(want)} ({'feedforward: input' if ff else 'output'} scaling)")
            continue
        if module.embedding or len(module.parts) > 1 or isinstance(module.parts[0][1], tuple):
            problems.append(f"IA3 on {name!r} is not supported (embeddings, fused modules and "
                            "per-expert modules)")
            continue
        (leaf, layer), = module.parts
        if not ff and _bias_path(leaf) in flat:
            problems.append(f"{name!r}: IA3 output scaling of a biased projection (PEFT scales "
                            "the bias too, ftjax does not)")
            continue
        per_leaf[leaf][layer] = np.asarray(found[name], np.float32).reshape(-1)
        ff_of[leaf].add(ff)
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing}")
    for leaf, ffs in ff_of.items():
        if len(ffs) > 1:
            problems.append(f"{leaf!r}: feedforward_modules selects some layers only; ftjax's "
                            "stacked leaf scales all layers on the same side")
    if not per_leaf and not problems:
        problems.append(f"no module of {arch} is selected by target_modules="
                        f"{conf.get('target_modules')!r}")
    if problems:
        raise _fail(f"cannot load PEFT adapter {path!r}", problems)
    for leaf, by_layer in per_leaf.items():
        ff = next(iter(ff_of[leaf]))
        shape = shapes[leaf]
        n = shape[-2] if ff else shape[-1]
        if None in by_layer:
            vec = by_layer[None]
        else:
            vec = np.ones((shape[0], n), np.float32)
            for layer, v in by_layer.items():
                vec[layer] = v
        flat[leaf] = IA3(base=flat[leaf], ia3_l=vec, feedforward=ff)
    return unflatten(flat)


def _tied_head_problems(head: dict, table: dict, adapters: dict, overrides: dict,
                        base_params: Any) -> list[str]:
    """With tied embeddings ftjax's head is the embedding table, adapter included; PEFT
    (ensure_weight_tying) writes the head's tied copies: lora_A = emb_B.T, lora_B = emb_A.T and
    base_layer.weight = the embedding. Anything else cannot be expressed."""
    emb = next((n for n, m in table.items() if m.parts[0][0] == "embed/embedding"), None)
    ad = adapters.get(emb)
    if ad is not None and PREFIX + "lm_head.lora_A.weight" not in head:
        return [f"the adapter changes {emb} but not the lm_head tied to it (saved without "
                "ensure_weight_tying=true); ftjax's tied head is the embedding table itself, "
                "so it cannot apply the adapter to lookups only"]
    if not head:
        return []
    want = {}
    if ad is not None:
        want[PREFIX + "lm_head.lora_A.weight"] = ad.B.T
        want[PREFIX + "lm_head.lora_B.weight"] = ad.A.T
    table_w = overrides.get(emb + ".weight")
    if table_w is None:
        table_w = _host_any(materialize(flatten(base_params)["embed/embedding"]))
    want[PREFIX + "lm_head.base_layer.weight"] = table_w
    want[PREFIX + "lm_head.weight"] = table_w
    bad = sorted(k for k, v in head.items()
                 if k not in want or tuple(v.shape) != tuple(want[k].shape)
                 or not np.array_equal(v, want[k]))
    if not bad:
        return []
    return [f"tensors {bad}: the model ties lm_head to {emb}, so the head can only carry "
            f"the embedding's own adapter (PEFT's ensure_weight_tying=true), not one of its own"]


def _host_any(x: Any) -> np.ndarray:
    import jax
    return np.asarray(jax.device_get(x))


def _assemble(base: Any, by_layer: dict, shape: tuple, use_dora: bool, DoRA: Any) -> Any:
    """One (possibly layer- or expert-stacked) adapter leaf from per-slot PEFT factors.

    by_layer: {index: (a [.., in, r], b [.., r, out], scale, magnitude)} with index None (an
    unstacked leaf), a layer, or (layer, expert) (per-expert modules); a layer's factors may
    carry an expert axis themselves (fused experts). Slots share one rank and scale: factors
    are zero-padded to the largest rank and each slot's scale is folded into its b, which
    leaves every slot's update s_i * a_i @ b_i.
    """
    n_idx = {hf._n_index(k) for k in by_layer}
    if len(n_idx) != 1:
        raise PeftFormatError(f"adapter factors for one weight of shape {list(shape)} come "
                              f"both per layer and per expert: {sorted(map(str, by_layer))}")
    index_shape = tuple(shape[:n_idx.pop()])
    n_in, n_out = shape[-2], shape[-1]
    r = max(v[0].shape[-1] for v in by_layer.values())
    scale = _most_common([v[2] for v in by_layer.values()])
    a = np.zeros(tuple(shape[:-2]) + (n_in, r), np.float32)
    b = np.zeros(tuple(shape[:-2]) + (r, n_out), np.float32)
    m = np.zeros(tuple(shape[:-2]) + (n_out,), np.float32) if use_dora else None
    for ti in np.ndindex(*index_shape):
        key = None if not ti else ti[0] if len(ti) == 1 else ti
        if key not in by_layer:
            if use_dora:  # no adapter: the magnitude that makes DoRA the identity
                m[ti] = _row_norms(_slice(materialize(base), key))
            continue
        ai, bi, si, mi = by_layer[key]
        a[ti][..., :ai.shape[-1]] = ai
        b[ti][..., :bi.shape[-2], :] = bi if si == scale else bi * np.float32(si / scale)
        if use_dora:
            m[ti] = mi
    if use_dora:
        return DoRA(base=base, a=a, b=b, m=m, scale=scale)
    return LoRAWeight(base=base, a=a, b=b, scale=scale)


# --------------------------------------------------------------------------------------------
# Adapters trained over a rewritten base (PiSSA)


def residual_to_standard(trained: Any, initial: Any, original: Any) -> Any:
    """LoRA/DoRA leaves trained on a residual base (PiSSA: W_res = W - s*a0@b0) as adapters
    on the original W.

    trained / initial: the params after training and right after the transform (same
    structure); original: the untransformed params. W_res + s*a@b = W + s*(a@b - a0@b0), so
    the result has rank 2r: a' = [a | a0], b' = [b ; -b0] (PEFT's
    path_initial_model_for_weight_conversion does the same). DoRA's direction, hence its
    magnitude, is unchanged.
    """
    import jax.numpy as jnp
    t, i, o = flatten(trained), flatten(initial), flatten(original)
    out = {}
    for p, w in t.items():
        if is_structured(w) and _kind(w) in ("lora", "dora"):
            w0 = i[p]
            out[p] = dataclasses.replace(w, base=o[p], a=jnp.concatenate([w.a, w0.a], axis=-1),
                                         b=jnp.concatenate([w.b, -w0.b], axis=-2))
        else:
            out[p] = w
    return unflatten(out)
