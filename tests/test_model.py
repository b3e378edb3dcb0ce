"""Invariants of the functional transformer (every family): causality, packing isolation,
KV-cache decoding, scan vs unrolled, remat, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models

FAMILIES = sorted(models.FAMILIES)
# Jitted once per (config, shapes): much faster than op-by-op execution.
apply = jax.jit(models.apply, static_argnums=1)


def tiny(family, **kw):
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=64)
    if family == "mistral":
        base["sliding_window"] = 3
    base.update(kw)
    return models.preset(family, **base)


def rand_tokens(seed, shape, vocab=61):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    cfg = tiny(family)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(1, (2, 9))
    base, _ = apply(params, cfg, toks)
    for t in (0, 4, 7):
        changed = toks.at[:, t + 1].set((toks[:, t + 1] + 1) % cfg.vocab_size)
        out, _ = apply(params, cfg, changed)
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6)
        assert np.abs(np.asarray(out[:, t + 1:] - base[:, t + 1:])).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_isolate_packed_documents(family):
    cfg = tiny(family)
    params = models.init(cfg, jax.random.PRNGKey(0))
    a, b = rand_tokens(2, (1, 5)), rand_tokens(3, (1, 4))
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 2])
    pos = jnp.array([list(range(5)) + list(range(4)) + [0, 0]])
    out, _ = apply(params, cfg, packed, positions=pos, segment_ids=seg)
    ref_a, _ = apply(params, cfg, a)
    ref_b, _ = apply(params, cfg, b)
    np.testing.assert_allclose(out[:, :5], ref_a, atol=2e-5)
    np.testing.assert_allclose(out[:, 5:9], ref_b, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_forward(family):
    cfg = tiny(family)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(4, (2, 10))
    full, _ = apply(params, cfg, toks)
    cache = models.init_cache(cfg, 2, 12)
    outs = []
    out, aux = apply(params, cfg, toks[:, :4], cache=cache)  # prefill
    outs.append(out)
    for t in range(4, 10):  # one token at a time
        out, aux = apply(params, cfg, toks[:, t:t + 1], cache=aux["cache"])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    assert int(aux["cache"]["index"]) == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_equals_unrolled(family):
    cfg = tiny(family)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(5, (2, 8))
    a, _ = apply(params, cfg, toks)
    b, _ = apply(params, cfg.replace(scan_layers=False), toks)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("remat,scan", [("full", True), ("dots", True), ("dots_no_batch", True),
                                        ("save_attn_out", True), ("full", False)])
def test_remat_leaves_gradients_unchanged(remat, scan):
    cfg = tiny("llama", scan_layers=scan)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(6, (2, 8))

    def loss(p, c):
        logits, _ = models.apply(p, c, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=remat))
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)


def test_remat_policies_keep_what_their_names_say():
    # The projections are peft.core.dense custom VJPs, which jax.checkpoint sees as opaque
    # calls: the "dots" policies must still save them (by name), so their compiled temp sits
    # between nothing saved (full) and everything saved (none).
    cfg = tiny("llama", hidden_size=64, intermediate_size=256, num_layers=2)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(8, (4, 64))

    def temp(remat):
        c = cfg.replace(remat=remat)

        def loss(p):
            logits, _ = models.apply(p, c, toks)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    t = {r: temp(r) for r in ("none", "full", "dots", "dots_no_batch", "save_attn_out")}
    assert t["save_attn_out"] < t["none"], t
    # (were the products not saved, dots_no_batch would compile to full's program)
    assert 1.05 * t["full"] < t["dots_no_batch"] <= t["dots"] < t["none"], t


def test_sliding_window_limits_attention():
    cfg = tiny("mistral", sliding_window=2)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(7, (1, 8))
    base, _ = apply(params, cfg, toks)
    # With 2 layers and window 2 the receptive field of position 7 is positions 5..7.
    changed = toks.at[:, 4].set((toks[:, 4] + 1) % cfg.vocab_size)
    out, _ = apply(params, cfg, changed)
    np.testing.assert_allclose(out[:, 7], base[:, 7], atol=1e-6)
    assert np.abs(np.asarray(out[:, 5] - base[:, 5])).max() > 1e-4


@pytest.mark.parametrize("dtype,param_dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16")])
def test_bf16_compute_close_to_fp32(dtype, param_dtype):
    cfg = tiny("llama")
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = rand_tokens(8, (2, 8))
    ref, _ = apply(params, cfg, toks)
    low_cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype)
    low_params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    out, _ = apply(low_params, low_cfg, toks)
    assert out.dtype == jnp.float32
    assert jax.tree.leaves(models.init(low_cfg, jax.random.PRNGKey(0)))[0].dtype == jnp.dtype(param_dtype)
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()) + 1e-3)


def test_param_axes_match_params_and_rope_scaling():
    for fam in FAMILIES:
        cfg = tiny(fam)
        params = models.init(cfg, jax.random.PRNGKey(0))
        axes = models.param_axes(cfg)
        is_t = lambda x: isinstance(x, tuple)
        assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_t)
        for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_t)):
            assert len(a) == p.ndim
    # llama3 scaling keeps high frequencies and divides the lowest by the factor.
    from ftjax.models.layers import rope_inv_freq
    base = tiny("llama", head_dim=64, rope_theta=500000.0)
    scaled = base.replace(rope_scaling="llama3", rope_factor=8.0, rope_original_max_position=8192)
    f0, f1 = rope_inv_freq(base), rope_inv_freq(scaled)
    assert np.isclose(f1[0], f0[0]) and np.isclose(f1[-1], f0[-1] / 8.0)
    lin = base.replace(rope_scaling="linear", rope_factor=4.0)
    np.testing.assert_allclose(rope_inv_freq(lin), f0 / 4.0, rtol=1e-6)


def test_invalid_config_lists_every_problem():
    with pytest.raises(ValueError) as e:
        models.ModelConfig(num_heads=6, num_kv_heads=4, norm="batch", remat="sometimes")
    msg = str(e.value)
    for part in ("norm='batch'", "remat='sometimes'", "num_kv_heads=4"):
        assert part in msg
