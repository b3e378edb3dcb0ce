"""The attention cores (`ModelConfig.attention_impl`) compute the same function.

`xla` (full scores) is the reference; `blocked` skips the key blocks a causal / sliding-window
mask hides; `cudnn` calls `jax.nn.dot_product_attention` (XLA's implementation off GPU);
`splash` runs the Pallas TPU kernel (in interpret mode off TPU) from the mask's structure. All
must give the same logits and gradients, with packed segments, padding, GQA, a sliding window,
q/k-norm and sequence lengths that are not a multiple of the block.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.models import layers

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
            num_kv_heads=2, attention_block=8)
CASES = {
    "gqa": {},
    "mha_qknorm_window": dict(num_kv_heads=4, qk_norm=True, sliding_window=11),
    "window_lt_block": dict(sliding_window=3),
}


def _batch(t=29, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 97, (3, t)), jnp.int32)
    seg = np.ones((3, t), np.int32)
    seg[1, 12:] = 2          # two packed documents
    seg[2, t - 7:] = 0       # right padding
    return tokens, jnp.asarray(seg)


def _loss(cfg, params, tokens, seg):
    logits, _ = models.apply(params, cfg, tokens, segment_ids=seg)
    w = (seg != 0).astype(jnp.float32)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * w), logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_cores_agree_on_logits_and_grads(case):
    cfg = models.ModelConfig(**(BASE | CASES[case]), attention_impl="xla")
    params = models.init(cfg, jax.random.PRNGKey(1))
    tokens, seg = _batch()
    grad = jax.jit(jax.grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    g_ref, logits_ref = grad(cfg, params, tokens, seg)
    for impl in ("blocked", "cudnn"):
        c = dataclasses.replace(cfg, attention_impl=impl)
        g, logits = grad(c, params, tokens, seg)
        np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5, err_msg=impl)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            scale = float(jnp.max(jnp.abs(b)))  # round-off is relative to the leaf's scale
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=impl)


def test_key_spans_cover_exactly_what_the_mask_allows():
    """Every (query, key) pair the causal + window mask allows is inside its block's span, and
    the spans skip work: at T = 512, block 64, a causal mask computes 36 of 64 blocks."""
    for t, block, window in ((29, 8, None), (29, 8, 11), (40, 8, 3), (512, 64, None)):
        spans = layers.key_spans(t, block, window)
        covered = np.zeros((t, t), bool)
        for q0, q1, k0, k1 in spans:
            covered[q0:q1, k0:k1] = True
        i, j = np.arange(t)[:, None], np.arange(t)[None, :]
        allowed = (j <= i) & ((i - j) < window if window else True)
        assert not (allowed & ~covered).any()
    spans = layers.key_spans(512, 64, None)
    assert sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in spans) == 36 * 64 * 64


def test_auto_resolves_by_use():
    cfg = models.ModelConfig(**BASE)
    assert layers.attention_impl(cfg, 29, 29, cached=False) == "blocked"
    assert layers.attention_impl(cfg, 1, 40, cached=True) == "xla"       # decoding
    assert layers.attention_impl(cfg, 8, 8, cached=False) == "xla"        # one block
    for impl in ("blocked", "splash"):   # both assume T == S self-attention
        cfg = dataclasses.replace(cfg, attention_impl=impl)
        assert layers.attention_impl(cfg, 1, 40, cached=True) == "xla"


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_core_agrees_on_logits_and_grads(case):
    """The Pallas kernel (interpret mode here) against the reference core at T = 256: two
    blocks of 128, so the causal / window block skipping and the segment ids are exercised."""
    cfg = models.ModelConfig(**(BASE | CASES[case]), attention_impl="xla")
    params = models.init(cfg, jax.random.PRNGKey(1))
    tokens, seg = _batch(t=256)
    seg = seg.at[1, 150:].set(3)      # a third document across the block boundary
    grad = jax.jit(jax.grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    g_ref, logits_ref = grad(cfg, params, tokens, seg)
    g, logits = grad(dataclasses.replace(cfg, attention_impl="splash"), params, tokens, seg)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


def test_splash_block_sizes_and_mesh_names():
    from ftjax.models import splash
    from ftjax.sharding.rules import MESH_AXES
    assert set(splash.BATCH_AXES) | {splash.HEAD_AXIS} <= set(MESH_AXES)
    assert [splash.block_size(t) for t in (128, 384, 1024)] == [128, 128, 512]
    for t in (29, 200):
        with pytest.raises(ValueError, match="divisible by 128"):
            splash.block_size(t)
    assert splash.supported(512, 512, 128, cached=False)
    assert not splash.supported(512, 512, 64, cached=False)   # head_dim not lane-sized
    assert not splash.supported(1, 512, 128, cached=True)


def test_splash_core_sharded_equals_unsharded_reference():
    """Training with the splash core on a data x fsdp x tensor mesh (the kernel runs per
    shard through shard_map: batch over data/fsdp, kv heads over tensor) follows the
    single-device run with the reference core step for step."""
    from tests.test_train import random_batch, run_steps, tiny_config
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    batches = [random_batch(40 + i, t=128) for i in range(3)]
    ref_c = tiny_config(steps=3, seq=128)
    ref_c.model.attention_impl = "xla"
    ref, pref = run_steps(ref_c, batches, devices=jax.devices()[:1], mesh={"data": 1})
    c = tiny_config(steps=3, seq=128)
    c.model.attention_impl = "splash"
    out, pout = run_steps(c, batches, rules="fsdp_tp", mesh={"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(out, ref, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(pout), jax.tree.leaves(pref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3)


def test_cached_decoding_equals_full_forward_with_blocked_prefill():
    cfg = models.ModelConfig(**BASE, attention_impl="auto")
    params = models.init(cfg, jax.random.PRNGKey(2))
    tokens, _ = _batch(t=21)
    full, _ = models.apply(params, cfg, tokens)
    cache = models.init_cache(cfg, 3, 32)
    pre, aux = models.apply(params, cfg, tokens[:, :17], cache=cache)
    step, _ = models.apply(params, cfg, tokens[:, 17:], cache=aux["cache"])
    np.testing.assert_allclose(jnp.concatenate([pre, step], 1), full, rtol=1e-5, atol=1e-5)


def test_bad_impl_is_named():
    with pytest.raises(ValueError, match="attention_impl"):
        models.ModelConfig(**BASE | dict(attention_impl="flash"))


def test_blocked_core_sharded_fsdp_tp_equals_unsharded_reference():
    """Training with the blocked core on a data x fsdp x tensor mesh (heads split over
    `tensor`) follows the single-device run with the reference core step for step."""
    from tests.test_train import random_batch, run_steps, tiny_config
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    c = tiny_config(steps=3)
    c.model.attention_block = 8  # seq 32: four query blocks
    batches = [random_batch(20 + i) for i in range(3)]
    ref_c = tiny_config(steps=3)
    ref_c.model.attention_impl = "xla"
    ref, pref = run_steps(ref_c, batches, devices=jax.devices()[:1], mesh={"data": 1})
    out, pout = run_steps(c, batches, rules="fsdp_tp", mesh={"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(out, ref, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(pout), jax.tree.leaves(pref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-3)


def test_bf16_compute_float32_master_step():
    """The accelerator set-up on CPU: bfloat16 compute, float32 params, gradients, optimizer
    state and loss. Each core agrees with the float32 run to bfloat16 precision and the
    loss falls."""
    from tests.test_train import random_batch, run_steps, tiny_config
    batches = [random_batch(30 + i % 2) for i in range(6)]
    one = jax.devices()[:1]
    c = tiny_config(steps=6)
    ref, _ = run_steps(c, batches, devices=one, mesh={"data": 1})
    for impl in ("xla", "blocked", "cudnn"):
        c = tiny_config(steps=6)
        c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
        c.model.attention_impl, c.model.attention_block = impl, 8
        losses, params = run_steps(c, batches, devices=one, mesh={"data": 1})
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(params)), impl
        np.testing.assert_allclose(losses, ref, rtol=2e-2, err_msg=impl)
        assert losses[-1] < losses[0] - 0.05, (impl, losses)
