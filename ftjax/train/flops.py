"""Model FLOPs per token, the figure every MFU is computed from (docs/performance.md, "FLOP
conventions"), and the adapter parameters a token passes through."""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from ftjax import models, monitor
from ftjax.models.config import ModelConfig
from ftjax.peft import core as peft_core

# How `flops_per_token` counts (docs/performance.md, "FLOP conventions"): the figure every
# MFU is computed from, named in the benchmark scripts' JSON lines.
FLOPS_FULL = "6N+attn (PaLM)"                     # training, every weight trains
FLOPS_FORWARD = "2N+attn (PaLM forward)"          # forward only (evaluation)
FLOPS_FROZEN_BASE = "4N_frozen+6N_trainable+attn"  # training over a frozen base (LoRA, QLoRA)


def flops_convention(training: bool = True, frozen_base: bool = False) -> str:
    """The name of the convention `flops_per_token` uses for these arguments."""
    if not training:
        return FLOPS_FORWARD
    return FLOPS_FROZEN_BASE if frozen_base else FLOPS_FULL


def _spec_leaves(cfg: ModelConfig) -> list[tuple[str, Any]]:
    return [(peft_core.path_str(p), s) for p, s in jax.tree_util.tree_flatten_with_path(
        models.param_specs(cfg), is_leaf=lambda x: isinstance(x, models.transformer.Spec))[0]]


def _layer_matmul_params(cfg: ModelConfig) -> float:
    """Matmul params a token passes through in the layers (k of E experts for MoE)."""
    layer_matmul = 0.0
    for path, s in _spec_leaves(cfg):
        if not path.startswith("layers/"):
            continue
        if "expert" in s.axes:  # stacked experts: only k of E run per token
            layer_matmul += np.prod(s.shape) * cfg.num_experts_per_tok / cfg.num_experts
        elif len(s.shape) == 3:
            layer_matmul += np.prod(s.shape)
    return float(layer_matmul)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, *,
                    adapter_params: Optional[float] = None) -> float:
    """Model FLOPs per token (see monitor.transformer_flops_per_token for N, P_head, L, T, A).

    adapter_params=None (full fine-tuning): PaLM appendix B, every weight trains,

        training = 6·(N + P_head) + 12·L·T·A          ("6N+attn (PaLM)")
        forward  = 2·(N + P_head) + 4·L·T·A

    adapter_params=n (a frozen base plus adapters, e.g. LoRA / QLoRA; n from
    `adapter_params_per_token`): what such a step computes. The forward runs every matmul,
    adapters included (x·A·B costs 2·n per token); the backward needs the activation
    gradients of every matmul (2·(N + P_head + n)) but weight gradients only for the adapters
    (2·n); attention has no weights, so its forward and backward stay as in PaLM:

        training = 4·(N + P_head) + 6·n + 12·L·T·A    ("4N_frozen+6N_trainable+attn")
        forward  = 2·(N + P_head + n) + 4·L·T·A

    Not counted: the embedding lookup, norms, activations, the optimizer, and the frozen-base
    shortcuts XLA may find (the first layer's input gradient is not needed when the
    embedding is frozen), so the frozen-base figure is an upper bound by a few percent.
    """
    layer_matmul = _layer_matmul_params(cfg)
    head = cfg.hidden_size * cfg.vocab_size
    attn_kw = dict(n_heads=cfg.num_heads, head_dim=cfg.dim_per_head, training=training)
    if adapter_params is None:
        return monitor.transformer_flops_per_token(
            layer_matmul, cfg.num_layers, cfg.hidden_size, seq_len, lm_head_params=head,
            **attn_kw)
    attention = monitor.transformer_flops_per_token(0, cfg.num_layers, cfg.hidden_size,
                                                    seq_len, **attn_kw)
    n = float(adapter_params)
    if not training:
        return 2.0 * (layer_matmul + head + n) + attention
    return 4.0 * (layer_matmul + head) + 6.0 * n + attention


def adapter_params_per_token(cfg: ModelConfig, params: Any) -> float:
    """Per-token matmul params of the trainable fields of the structured (adapter) weights in
    `params` (a transformed params tree, or its trainable partition; arrays or
    ShapeDtypeStructs): LoRA's A and B count fully, a stacked expert kernel's adapters
    k/E (only the routed experts run), adapters of the embedding table not at all (a lookup,
    not a matmul). Plain trainable leaves (norm scales, heads a trainer adds) are ignored.
    """
    specs = dict(_spec_leaves(cfg))
    total = 0.0

    def one(path, w):
        nonlocal total
        if not peft_core.is_structured(w):
            return w
        spec = specs.get(path)
        if spec is not None and spec.axes and spec.axes[0] == "vocab":
            return w  # the embedding table: looked up
        trainable = set(w.trainable_fields())
        n = float(sum(np.prod(x.shape) for name in w.array_fields() if name in trainable
                      for x in jax.tree.leaves(getattr(w, name))))
        if spec is not None and "expert" in spec.axes:
            n *= cfg.num_experts_per_tok / cfg.num_experts
        total += n
        return w

    peft_core.map_weights(one, params)
    return total
