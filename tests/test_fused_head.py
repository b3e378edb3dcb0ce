"""The fused LM head + cross-entropy (`losses.head_cross_entropy`, the SFT loss's default)
gives the sums and gradients of logits-then-`token_cross_entropy`, for untied and tied heads,
with z-loss, time chunks, a frozen head (LoRA) and bfloat16 compute; and its backward keeps
no [B, T, V] logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.peft import core as peft_core
from ftjax.peft.lora import apply_lora
from ftjax.train import losses
from ftjax.train.step import sft_loss

CFG = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
           num_kv_heads=2)


def _batch(b=3, t=17, v=211, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
            "loss_mask": jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)}


def _both(cfg, params, z_loss=0.0):
    out = []
    for fused in (True, False):
        fn = sft_loss(cfg, z_loss=z_loss, fused_head=fused)
        (obj, stats), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, _batch(), None)
        out.append((obj, stats, g))
    return out


def _close_trees(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = float(jnp.max(jnp.abs(y))) + 1e-12
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("tied,z_loss", [(False, 0.0), (True, 1e-3)])
def test_fused_equals_unfused_sums_and_grads(tied, z_loss):
    cfg = models.ModelConfig(**CFG, tie_embeddings=tied)
    params = models.init(cfg, jax.random.PRNGKey(0))
    (o1, s1, g1), (o2, s2, g2) = _both(cfg, params, z_loss)
    np.testing.assert_allclose(o1, o2, rtol=1e-6)
    for k in ("nll", "z", "correct", "tokens"):
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-6, err_msg=k)
    _close_trees(g1, g2)


def test_time_chunks_do_not_change_the_result():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 13, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 29)) * 0.3, jnp.float32)
    tg = jnp.asarray(rng.integers(0, 29, (2, 13)))
    m = jnp.ones((2, 13))
    f = lambda c: jax.grad(lambda h, w: losses.head_cross_entropy(
        h, w, tg, m, chunks=c)["objective"], (0, 1))(h, w)
    ref = jax.grad(lambda h, w: losses.token_cross_entropy(h @ w, tg, m)["nll"], (0, 1))(h, w)
    for c in (1, 2, 5, 13, 40):
        _close_trees(f(c), ref)


def test_frozen_head_under_lora_matches_and_skips_the_head_gradient():
    cfg = models.ModelConfig(**CFG)
    params = apply_lora(models.init(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1), rank=4,
                        targets=(r"layers/attn/(q|v)_proj/kernel",))
    mask = peft_core.trainable_mask(params, ())
    trainable, frozen = peft_core.partition(params, mask)
    grads = []
    for fused in (True, False):
        fn = sft_loss(cfg, fused_head=fused)
        loss = lambda t: fn(peft_core.combine(t, frozen), _batch(), None)[0]
        grads.append(jax.jit(jax.grad(loss))(trainable))
        if fused:  # the head is frozen: no [D, V] product in the step's program
            hlo = jax.jit(jax.grad(loss)).lower(trainable).as_text()
    _close_trees(*grads)
    head_grad = f"-> tensor<{cfg.hidden_size}x{cfg.vocab_size}xf32>"
    assert not [ln for ln in hlo.splitlines() if "dot_general" in ln and head_grad in ln]
    # ... while a trainable head's step has one (the check can fail).
    full = jax.jit(jax.grad(lambda p: sft_loss(cfg)(p, _batch(), None)[0])).lower(
        models.init(cfg, jax.random.PRNGKey(0))).as_text()
    assert [ln for ln in full.splitlines() if "dot_general" in ln and head_grad in ln]


def test_bf16_compute_close_to_unfused():
    cfg = models.ModelConfig(**CFG, dtype="bfloat16")
    params = models.init(cfg, jax.random.PRNGKey(0))
    (o1, _, g1), (o2, _, g2) = _both(cfg, params)
    np.testing.assert_allclose(o1, o2, rtol=2e-2)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert x.dtype == y.dtype == jnp.float32
        np.testing.assert_allclose(x, y, atol=0.05 * float(jnp.max(jnp.abs(y))) + 1e-6)


def test_chunked_head_needs_less_memory(monkeypatch):
    """With the logits in 8 time chunks, XLA's temp memory of the step is smaller by at least
    the full [B, T, V] float32 logits, which the unfused step keeps for its backward."""
    from ftjax.train import step
    monkeypatch.setattr(step, "HEAD_CHUNK_BYTES", 4 * 64 * 4096 * 4 // 8)
    cfg = models.ModelConfig(**(CFG | dict(vocab_size=4096)))
    params = models.init(cfg, jax.random.PRNGKey(0))
    batch = _batch(b=4, t=64, v=4096)
    temps = []
    for fused in (True, False):
        fn = sft_loss(cfg, fused_head=fused)
        compiled = jax.jit(jax.grad(lambda p: fn(p, batch, None)[0])).lower(params).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    logits_bytes = 4 * 64 * 4096 * 4
    assert temps[1] - temps[0] >= logits_bytes, temps
