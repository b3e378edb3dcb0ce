"""Which Hugging Face tensor fills which (stacked) ftjax leaf, and how, per family.

Tensor names come from the family table (`families.HF_FAMILIES`): the base-model prefix, the
tensors before, inside and after the layer stack. Mixtral experts come in two file layouts
(see `ftjax.io.hf`): "hub" (per expert `block_sparse_moe.experts.M.w1/w2/w3`) and "fused"
(transformers 5's `mlp.experts.gate_up_proj` / `down_proj`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Optional

import numpy as np

from ftjax.io.hf.families import EXPERTS, HF_FAMILIES
from ftjax.models.config import ModelConfig

__all__ = ["Entry", "Index", "MOE_LAYOUTS", "n_index", "leaf_shapes", "tensor_layout",
           "detect_prefix", "detect_moe_layout", "ignorable"]

MOE_LAYOUTS = ("hub", "fused")


Index = Optional[Any]  # None (an unstacked leaf), a layer int, or (layer, expert)


def n_index(index: Index) -> int:
    """How many leading axes of the leaf an index selects."""
    if index is None:
        return 0
    return len(index) if isinstance(index, tuple) else 1


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor and the ftjax leaf slot(s) it maps to.

    kind: "copy" (same layout), "T" (nn.Linear [.., out, in] <-> kernel [.., in, out]: the last
    two axes swap), "split" (GPT-2's fused c_attn: the last axis is q|k|v, one target each) or
    "Tsplit" (Mixtral's fused experts.gate_up_proj [E, 2f, d]: swapped, then gate|up on the
    last axis).
    targets: (leaf path "a/b/c", index) per part; index None, a layer, or (layer, expert).
    """
    key: str
    kind: str
    targets: tuple[tuple[str, Index], ...]

    def hf_shape(self, leaf_shapes: dict[str, tuple]) -> tuple[int, ...]:
        shapes = [tuple(leaf_shapes[p][n_index(i):]) for p, i in self.targets]
        if self.kind == "split":
            return shapes[0][:-1] + (sum(s[-1] for s in shapes),)
        if self.kind == "Tsplit":
            return shapes[0][:-2] + (sum(s[-1] for s in shapes), shapes[0][-2])
        if self.kind == "T":
            return shapes[0][:-2] + (shapes[0][-1], shapes[0][-2])
        return shapes[0]

    def to_ftjax(self, t: np.ndarray) -> list[np.ndarray]:
        if self.kind in ("T", "Tsplit"):
            t = np.swapaxes(t, -1, -2)
        if self.kind in ("split", "Tsplit"):
            return np.split(t, len(self.targets), axis=-1)
        return [t]

    def to_hf(self, parts: list[np.ndarray]) -> np.ndarray:
        t = np.concatenate(parts, axis=-1) if self.kind in ("split", "Tsplit") else parts[0]
        return np.swapaxes(t, -1, -2) if self.kind in ("T", "Tsplit") else t

def leaf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every param leaf of cfg by '/'-joined path, with its (stacked) shape."""
    import jax
    from ftjax.io.params_file import flatten
    from ftjax.models.transformer import Spec, param_specs
    specs = jax.tree.map(lambda s: s.shape, param_specs(cfg), is_leaf=lambda x: isinstance(x, Spec))
    return {k: tuple(v) for k, v in flatten(specs).items()}


def tensor_layout(cfg: ModelConfig, prefix: Optional[str] = None,
                  moe_layout: str = "hub") -> list[Entry]:
    """Every HF tensor of cfg's family, in file order, with its ftjax targets.

    prefix: the base-model prefix ("model." for Llama-style, "transformer." or "" for GPT-2);
    defaults to what transformers writes. moe_layout (Mixtral): "hub" (per-expert w1/w2/w3
    under block_sparse_moe, as transformers saves) or "fused" (transformers 5's stacked
    mlp.experts.gate_up_proj / down_proj).
    """
    if moe_layout not in MOE_LAYOUTS:
        raise ValueError(f"moe_layout={moe_layout!r}; use one of {MOE_LAYOUTS}")
    fam = HF_FAMILIES[cfg.family]
    leaves = leaf_shapes(cfg)
    out: list[Entry] = []

    def add(key: str, kind: str, *targets: tuple[str, Index]):
        if all(p in leaves for p, _ in targets):
            out.append(Entry(key, kind, tuple(targets)))

    p = fam.prefix if prefix is None else prefix
    for name, kind, paths in fam.head:
        add(p + name, kind, *[(leaf, None) for leaf in paths])
    n_experts = cfg.num_experts if "layers/moe/router/kernel" in leaves else 0
    for i in range(cfg.num_layers):
        h = f"{p}{fam.layer_prefix}{i}."
        for name, kind, paths in fam.layer:
            if name == EXPERTS:
                _add_experts(add, h, i, n_experts, moe_layout)
            else:
                add(h + name, kind, *[(leaf, i) for leaf in paths])
    for name, kind, paths in fam.tail:
        add(p + name, kind, *[(leaf, None) for leaf in paths])
    add("lm_head.weight", "T", ("lm_head/kernel", None))
    covered = {t for e in out for t, _ in e.targets}
    assert covered == set(leaves), f"layout misses {sorted(set(leaves) - covered)}"
    return out


def _add_experts(add: Callable, h: str, i: int, n_experts: int, moe_layout: str) -> None:
    """Mixtral's router and experts of layer i (h: the layer's key prefix)."""
    if not n_experts:
        return
    moe = "layers/moe/"
    if moe_layout == "fused":
        add(h + "mlp.gate.weight", "T", (moe + "router/kernel", i))
        add(h + "mlp.experts.gate_up_proj", "Tsplit", (moe + "gate_proj/kernel", i),
            (moe + "up_proj/kernel", i))
        add(h + "mlp.experts.down_proj", "T", (moe + "down_proj/kernel", i))
        return
    add(h + "block_sparse_moe.gate.weight", "T", (moe + "router/kernel", i))
    for e in range(n_experts):
        for w, n in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            add(f"{h}block_sparse_moe.experts.{e}.{w}.weight", "T",
                (f"{moe}{n}_proj/kernel", (i, e)))


def detect_moe_layout(cfg: ModelConfig, keys: Iterable[str]) -> str:
    """"fused" when the file holds transformers 5's stacked expert tensors, else "hub"."""
    if not getattr(cfg, "num_experts", 0):
        return "hub"
    return "fused" if any(".mlp.experts.gate_up_proj" in k for k in keys) else "hub"


def ignorable(key: str, cfg: ModelConfig) -> bool:
    """Buffers and aliases that carry no parameters of their own."""
    ignored = HF_FAMILIES[cfg.family].ignored
    if ignored and re.fullmatch(ignored, key):
        return True
    return key == "lm_head.weight" and cfg.tie_embeddings  # alias of the tied embedding


def detect_prefix(cfg: ModelConfig, keys: Iterable[str]) -> Optional[str]:
    """The base-model prefix a file uses: the family's ("model.", "transformer."), or "" when
    its first tensor appears only without it (a base model saved without the LM class)."""
    keys = set(keys)
    fam = HF_FAMILIES[cfg.family]
    first = fam.head[0][0]
    return "" if first in keys and fam.prefix + first not in keys else fam.prefix
