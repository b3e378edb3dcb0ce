"""Reading a PEFT LORA adapter (LoRA, DoRA, rsLoRA, rank/alpha patterns, MoE experts via
target_parameters, tied embeddings) into structured leaves over the base params.

ftjax stacks layers, so one leaf has one rank and one scale for all layers. An adapter whose
rank or alpha differs between layers of one module type (or that leaves layers out) is read
exactly by zero-padding A/B to the largest rank and folding each layer's scale into its B.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Optional, Sequence

import numpy as np

from ftjax.io import hf
from ftjax.io.files import natural_key
from ftjax.io.params_file import flatten, unflatten
from ftjax.io.peft_format.factors import Adapter, from_peft_factors, row_norms
from ftjax.io.peft_format.files import PREFIX, PeftFormatError, fail, host_any, host_slice
from ftjax.io.peft_format.modules import is_targeted, most_common, pattern_value
from ftjax.io.peft_format.registry import reader_codec
from ftjax.peft.core import materialize

__all__ = ["read_lora"]

_LORA_SUFFIXES = (("lora_A.weight", "A"), ("lora_B.weight", "B"),
                  ("lora_embedding_A", "A"), ("lora_embedding_B", "B"),
                  ("lora_magnitude_vector", "m"))


def read_lora(req) -> Any:
    """`req.base_params` with the LORA adapter of `req` (a `load.ReadRequest`) applied."""
    path, conf, cfg, base_params, tensors = req.path, req.conf, req.cfg, req.base_params, req.tensors
    table, full, shapes, ptable = req.table, req.full, req.shapes, req.ptable
    targeted_params, stems, problems = req.targeted_params, req.stems, req.problems
    rslora = bool(conf.get("use_rslora", False))
    use_dora = bool(conf.get("use_dora", False))
    build = reader_codec("dora" if use_dora else "lora").build
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
    for key in sorted(tensors, key=natural_key):
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
                                      f"{hf.HF_FAMILIES[cfg.family].architecture})")
                elif table[name].embedding != suffix.startswith("lora_embedding") \
                        and what != "m":
                    kind = "an Embedding" if table[name].embedding else "a Linear"
                    unexpected.append(f"{key} ({name!r} is {kind})")
                elif what == "m" and not use_dora:
                    unexpected.append(f"{key} (use_dora is false)")
                elif not is_targeted(conf, table[name]):
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
                                  f"weight of {hf.HF_FAMILIES[cfg.family].architecture})")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")

    missing = []
    adapters: dict[str, Adapter] = {}
    for name, module in table.items():
        if not is_targeted(conf, module):
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
        r = int(pattern_value(rank_pattern, name, r0))
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
        alpha = pattern_value(alpha_pattern, name, alpha0)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        adapters[name] = Adapter(A=np.asarray(A, np.float32), B=np.asarray(B, np.float32),
                                  scale=scale, magnitude=t.get("m"))
    param_adapters: dict[str, Adapter] = {}
    stem_of = {v: k for k, v in stems.items()}
    for name in targeted_params:
        t, par = found_params.get(name, {}), ptable[name]
        keys = {w: f"{PREFIX}{stem_of[name]}.lora_{w}.weight" for w in "AB"}
        absent = [keys[w] for w in "AB" if w not in t]
        if absent:
            missing += absent
            continue
        r = int(pattern_value(rank_pattern, name, r0))
        e = max(par.experts, 1)
        bad = [f"tensor {keys[w]} has shape {list(t[w].shape)}, expected {list(want)} (r={r} "
               f"from the config{f', {e} experts' if par.experts else ''})"
               for w, want in (("A", (e * r, par.n_in)), ("B", (par.n_out, r * e)))
               if tuple(t[w].shape) != want]
        if bad:
            problems += bad
            continue
        alpha = pattern_value(alpha_pattern, name, alpha0)
        A, B = from_peft_factors(np.asarray(t["A"], np.float32), np.asarray(t["B"], np.float32),
                                  par.experts)
        param_adapters[name] = Adapter(A=A, B=B,
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
        problems.append(f"no module of {hf.HF_FAMILIES[cfg.family].architecture} is selected "
                        f"by target_modules={conf.get('target_modules')!r}; modules are "
                        f"{list(table)[:12]}...")
    if problems:
        raise fail(f"cannot load PEFT adapter {path!r}", problems)

    flat = dict(flatten(base_params))
    copied: set[str] = set()
    for key, t in overrides.items():  # full weights from the file replace the base's
        e = full[key]
        for (leaf, layer), part in zip(e.targets, e.to_ftjax(t)):
            if leaf not in copied:
                flat[leaf] = np.array(host_any(flat[leaf]))
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
        flat[leaf] = _assemble(flat[leaf], by_layer, shapes[leaf], use_dora, build)
    return unflatten(flat)


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
        table_w = host_any(materialize(flatten(base_params)["embed/embedding"]))
    want[PREFIX + "lm_head.base_layer.weight"] = table_w
    want[PREFIX + "lm_head.weight"] = table_w
    bad = sorted(k for k, v in head.items()
                 if k not in want or tuple(v.shape) != tuple(want[k].shape)
                 or not np.array_equal(v, want[k]))
    if not bad:
        return []
    return [f"tensors {bad}: the model ties lm_head to {emb}, so the head can only carry "
            f"the embedding's own adapter (PEFT's ensure_weight_tying=true), not one of its own"]


def _assemble(base: Any, by_layer: dict, shape: tuple, use_dora: bool, build: Any) -> Any:
    """One (possibly layer- or expert-stacked) adapter leaf from per-slot PEFT factors.

    by_layer: {index: (a [.., in, r], b [.., r, out], scale, magnitude)} with index None (an
    unstacked leaf), a layer, or (layer, expert) (per-expert modules); a layer's factors may
    carry an expert axis themselves (fused experts). Slots share one rank and scale: factors
    are zero-padded to the largest rank and each slot's scale is folded into its b, which
    leaves every slot's update s_i * a_i @ b_i. build: the reading codec's (LoRA or DoRA).
    """
    n_idx = {hf.n_index(k) for k in by_layer}
    if len(n_idx) != 1:
        raise PeftFormatError(f"adapter factors for one weight of shape {list(shape)} come "
                              f"both per layer and per expert: {sorted(map(str, by_layer))}")
    index_shape = tuple(shape[:n_idx.pop()])
    n_in, n_out = shape[-2], shape[-1]
    r = max(v[0].shape[-1] for v in by_layer.values())
    scale = most_common([v[2] for v in by_layer.values()])
    a = np.zeros(tuple(shape[:-2]) + (n_in, r), np.float32)
    b = np.zeros(tuple(shape[:-2]) + (r, n_out), np.float32)
    m = np.zeros(tuple(shape[:-2]) + (n_out,), np.float32) if use_dora else None
    for ti in np.ndindex(*index_shape):
        key = None if not ti else ti[0] if len(ti) == 1 else ti
        if key not in by_layer:
            if use_dora:  # no adapter: the magnitude that makes DoRA the identity
                m[ti] = row_norms(host_slice(materialize(base), key))
            continue
        ai, bi, si, mi = by_layer[key]
        a[ti][..., :ai.shape[-1]] = ai
        b[ti][..., :bi.shape[-2], :] = bi if si == scale else bi * np.float32(si / scale)
        if use_dora:
            m[ti] = mi
    if use_dora:
        return build(base, a=a, b=b, m=m, scale=scale)
    return build(base, a=a, b=b, scale=scale)
