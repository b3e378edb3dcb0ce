"""loop.flops_per_token: PaLM's 6N + attention for full training (unchanged), and what a step
over a frozen base computes (4·N_frozen + 6·N_trainable + attention) for LoRA, by hand."""

from __future__ import annotations

import functools

import jax
import pytest

from ftjax import models
from ftjax.peft import core as peft_core
from ftjax.peft.lora import apply_lora
from ftjax.train import loop

TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel", r"layers/mlp/(gate|up|down)_proj/kernel")
MOE_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel", r"layers/moe/(gate|up|down)_proj/kernel")
V, D, F, L, H, KV, T, R = 512, 64, 128, 2, 4, 2, 32, 8
HD = D // H
Q, K = H * HD, KV * HD


def _lora_trainable(cfg, targets, rank=R):
    transform = functools.partial(apply_lora, rank=rank, alpha=2.0 * rank, targets=targets)
    params = jax.eval_shape(transform, models.param_shapes(cfg), jax.random.PRNGKey(0))
    return peft_core.partition(params, peft_core.trainable_mask(params, ()))[0]


def test_full_training_is_palm_6n_plus_attention():
    cfg = models.preset("llama", vocab_size=V, hidden_size=D, intermediate_size=F,
                        num_layers=L, num_heads=H, num_kv_heads=KV)
    n = L * (D * Q + 2 * D * K + Q * D + 3 * D * F)  # layer matmuls
    head = D * V
    attn = 12 * L * T * Q
    assert loop.flops_per_token(cfg, T) == 6 * (n + head) + attn
    assert loop.flops_per_token(cfg, T, training=False) == 2 * (n + head) + attn // 3
    # The benchmark presets keep their documented figures (docs/performance.md).
    assert loop.flops_per_token(models.preset("llama", size="tiny"), 512) == 36_274_176
    assert loop.flops_convention() == "6N+attn (PaLM)"
    assert loop.flops_convention(training=False) == "2N+attn (PaLM forward)"


def test_lora_counts_frozen_base_4n_and_adapters_6n():
    cfg = models.preset("llama", vocab_size=V, hidden_size=D, intermediate_size=F,
                        num_layers=L, num_heads=H, num_kv_heads=KV)
    n = L * (D * Q + 2 * D * K + Q * D + 3 * D * F)
    head = D * V
    # x @ A [in, r] @ B [r, out] per target: r * (in + out) params, all matmuls.
    adapters = L * R * ((D + Q) + 2 * (D + K) + (Q + D) + 2 * (D + F) + (F + D))
    trainable = _lora_trainable(cfg, TARGETS)
    assert peft_core.count(trainable) == adapters
    assert loop.adapter_params_per_token(cfg, trainable) == adapters
    got = loop.flops_per_token(cfg, T, adapter_params=adapters)
    # forward 2(N + P + n) + backward: activation grads 2(N + P + n), weight grads 2n only for
    # the adapters; attention forward 4LTA and backward 8LTA as in PaLM.
    assert got == 2 * (n + head + adapters) + 2 * (n + head + adapters) + 2 * adapters \
        + 12 * L * T * Q
    assert got == 4 * (n + head) + 6 * adapters + 12 * L * T * Q
    assert got < loop.flops_per_token(cfg, T)  # less work than full fine-tuning
    assert loop.flops_per_token(cfg, T, training=False, adapter_params=adapters) == \
        2 * (n + head + adapters) + 4 * L * T * Q
    assert loop.flops_convention(frozen_base=True) == "4N_frozen+6N_trainable+attn"


def test_lora_on_experts_counts_only_routed_experts():
    e, k = 4, 2
    cfg = models.preset("mixtral", vocab_size=V, hidden_size=D, intermediate_size=F,
                        num_layers=L, num_heads=H, num_kv_heads=KV, num_experts=e,
                        num_experts_per_tok=k)
    attn_n = D * Q + 2 * D * K + Q * D
    n = L * (attn_n + D * e + k * 3 * D * F)         # attention, router, k of E experts
    attn_adapters = L * R * ((D + Q) + 2 * (D + K) + (Q + D))
    expert_adapters = L * e * R * (2 * (D + F) + (F + D))
    trainable = _lora_trainable(cfg, MOE_TARGETS)
    assert peft_core.count(trainable) == attn_adapters + expert_adapters
    per_token = attn_adapters + expert_adapters * k / e
    assert loop.adapter_params_per_token(cfg, trainable) == pytest.approx(per_token)
    assert loop.flops_per_token(cfg, T, adapter_params=per_token) == pytest.approx(
        4 * (n + D * V) + 6 * per_token + 12 * L * T * Q)
