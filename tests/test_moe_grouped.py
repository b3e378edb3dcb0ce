"""The dropless expert product in expert blocks (`moe_grouped_impl="blocks"`, the CPU default)
against `jax.lax.ragged_dot` and a loop reference: the layout, the product and its gradients,
the MoE layer, the model, and LoRA / DoRA / QLoRA on expert kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.models import moe
from ftjax.peft import core, dora, lora, qlora
from tests.test_moe import MODEL, layer_setup, np_moe

IMPLS = ("ragged_dot", "blocks")


def loop_grouped(x, w, group_sizes):
    """Rows of expert e times w[e], in float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    return np.concatenate([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])])


def to_blocks(x, flat, e, block):
    """x [R, in] rows of the assignments `flat` [R] -> (blocked rows, ExpertBlocks, position)."""
    position, source, block_expert = moe.block_layout(jnp.asarray(flat), e, block)
    xs = jnp.take(x, source, axis=0, mode="fill", fill_value=0)
    return xs, core.ExpertBlocks(block_expert), position


@pytest.mark.parametrize("counts,block", [((3, 0, 5, 2), 2), ((10, 0, 0, 0), 4),
                                          ((0, 0, 0, 7), 3), ((4, 4, 4, 4), 4),
                                          ((1, 2, 3, 4), 1), ((3, 0, 5, 2), 16)])
def test_block_layout(counts, block):
    e = len(counts)
    rng = np.random.default_rng(sum(counts) + block)
    flat = rng.permutation(np.repeat(np.arange(e), counts)).astype(np.int32)
    r = len(flat)
    position, source, block_expert = map(np.asarray, moe.block_layout(jnp.asarray(flat), e, block))
    n_blocks = -(-r // block) + e
    assert source.shape == (n_blocks * block,) and block_expert.shape == (n_blocks,)
    assert len(set(position.tolist())) == r                      # distinct rows
    np.testing.assert_array_equal(source[position], np.arange(r))  # source inverts position
    assert (source == r).sum() == n_blocks * block - r           # every other row is zero
    # every assignment sits in a block of its expert, in its order within the expert
    np.testing.assert_array_equal(block_expert[position // block], flat)
    for x in range(e):
        np.testing.assert_array_equal(np.sort(position[flat == x]), position[flat == x])
    assert (np.diff(block_expert) >= 0).all()                    # blocks sorted by expert


def test_block_size_shrinks_for_small_batches():
    cfg = models.preset("mixtral", **MODEL)  # 4 experts
    assert moe.block_size(cfg, 4096) == 128
    assert moe.block_size(cfg.replace(moe_block_size=64), 4096) == 64
    assert moe.block_size(cfg, 100) == 32   # 25 rows per expert -> 32
    assert moe.block_size(cfg, 4) == 1      # a decode step: one row per expert
    assert moe.block_size(cfg, 1) == 1


def test_auto_picks_blocks_on_cpu_and_config_checks():
    cfg = models.preset("mixtral", **MODEL)
    assert cfg.moe_grouped_impl == "auto"
    assert moe.grouped_impl(cfg) == ("blocks" if jax.default_backend() == "cpu"
                                     else "ragged_dot")
    assert moe.grouped_impl(cfg.replace(moe_grouped_impl="ragged_dot")) == "ragged_dot"
    with pytest.raises(ValueError, match="moe_grouped_impl"):
        cfg.replace(moe_grouped_impl="megablox")
    with pytest.raises(ValueError, match="moe_block_size"):
        cfg.replace(moe_block_size=0)


@pytest.mark.parametrize("block", [1, 3, 8])
def test_blocked_product_and_gradients_equal_ragged_dot(block):
    e, d_in, d_out = 4, 24, 10
    counts = np.array([5, 0, 9, 3])
    flat = np.repeat(np.arange(e), counts).astype(np.int32)
    r = len(flat)
    x = jax.random.normal(jax.random.PRNGKey(0), (r, d_in))
    w = jax.random.normal(jax.random.PRNGKey(1), (e, d_in, d_out))
    ct = jax.random.normal(jax.random.PRNGKey(2), (r, d_out))
    gs = jnp.asarray(counts, jnp.int32)

    def ragged(x, w):
        return jnp.sum(jax.lax.ragged_dot(x, w, gs) * ct)

    def blocked(x, w):
        xs, groups, position = to_blocks(x, flat, e, block)
        return jnp.sum(jnp.take(core.grouped_matmul(xs, w, groups), position, axis=0) * ct)

    xs, groups, position = to_blocks(x, flat, e, block)
    y = jnp.take(core.grouped_matmul(xs, w, groups), position, axis=0)
    np.testing.assert_allclose(y, loop_grouped(x, w, counts), rtol=1e-5, atol=1e-5)
    ref = jax.jit(jax.value_and_grad(ragged, argnums=(0, 1)))(x, w)
    out = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1)))(x, w)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out[1][1][1]).max()) == 0.0  # the expert with no rows: zero gradient
    with pytest.raises(ValueError, match="n_blocks"):
        core.grouped_matmul(xs[:-1], w, groups)


def layer_grads(p, x, valid, cfg):
    def loss(p, x):
        y, stats = moe.moe_block(p, x, valid, cfg)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(p, x)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mlp,shared,block", [("gated", 0, 128), ("gated", 1, 2),
                                              ("plain", 0, 4)])
def test_layer_blocks_equal_ragged_dot_and_reference(mlp, shared, block):
    kw = dict(mlp=mlp, num_shared_experts=shared, moe_block_size=block)
    if mlp == "plain":
        kw["activation"] = "silu"
    p, cfg, x = layer_setup(b=3, t=10, **kw)
    valid = jnp.ones(x.shape[:2], bool).at[1, 6:].set(False)  # padding tokens
    outs = {}
    for impl in IMPLS:
        c = cfg.replace(moe_grouped_impl=impl)
        outs[impl] = (jax.jit(moe.moe_block, static_argnums=3)(p, x, valid, c),
                      layer_grads(p, x, valid, c))
    (y_r, st_r), g_r = outs["ragged_dot"]
    (y_b, st_b), g_b = outs["blocks"]
    assert_trees_close(y_r, y_b)
    assert_trees_close(st_r, st_b)
    assert_trees_close(g_r, g_b)
    if not shared:  # the per-token reference, padding rows zeroed
        ref = np_moe(p, x, cfg) * np.asarray(valid)[..., None]
        np.testing.assert_allclose(y_b, ref, atol=2e-5, rtol=1e-4)
    # experts that received no real token get exactly zero gradient in both
    for impl, (_, g) in (("ragged_dot", g_r), ("blocks", g_b)):
        up = np.abs(np.asarray(g[0]["up_proj"]["kernel"])).reshape(cfg.num_experts, -1).max(-1)
        np.testing.assert_array_equal(up > 0, np.asarray(st_r["load"]) > 0, err_msg=impl)


def model_loss_and_grads(params, cfg, toks):
    def loss(params):
        logits, aux = models.apply(params, cfg, toks)
        nll = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, jnp.roll(toks, -1, 1)[..., None], -1)[..., 0])
        return nll + 0.01 * jnp.mean(aux["moe"]["aux_loss"])
    return jax.jit(jax.value_and_grad(loss))(params)


def test_model_loss_and_gradients_equal_across_impls():
    cfg = models.preset("mixtral", **MODEL, moe_block_size=8)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, cfg.vocab_size)
    ref = model_loss_and_grads(params, cfg.replace(moe_grouped_impl="ragged_dot"), toks)
    out = model_loss_and_grads(params, cfg.replace(moe_grouped_impl="blocks"), toks)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
    assert_trees_close(ref[1], out[1])
    # (test_moe.py's KV-cache test runs the default, blocks on CPU, one row per expert
    # and decode step)


def perturbed(name, params):
    """Expert adapters (LoRA / DoRA / QLoRA) with nonzero factors, as after some training."""
    fn = {"lora": lora.apply_lora, "dora": dora.apply_dora, "qlora": qlora.apply_qlora}[name]
    q = fn(params, jax.random.PRNGKey(1), rank=4, targets=lora.EXPERT_TARGETS)

    def one(path, w):
        if not core.is_structured(w):
            return w
        out = w.replace(b=0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), w.b.shape))
        if isinstance(w, dora.DoRAWeight):
            out = out.replace(m=w.m * 1.1)
        return out
    return core.map_weights(one, q)


@pytest.mark.parametrize("name", ["lora", "dora", "qlora"])
def test_adapted_experts_equal_across_impls_with_factor_gradients(name):
    cfg = models.preset("mixtral", **MODEL, moe_block_size=4)
    q = perturbed(name, models.init(cfg, jax.random.PRNGKey(0)))
    train, frozen = core.partition(q, core.trainable_mask(q, ()))
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)

    def run(impl):
        c = cfg.replace(moe_grouped_impl=impl)

        def loss(t):
            logits, _ = models.apply(core.combine(t, frozen), c, toks)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
        return jax.jit(jax.value_and_grad(loss))(train)

    (l_r, g_r), (l_b, g_b) = run("ragged_dot"), run("blocks")
    np.testing.assert_allclose(l_b, l_r, rtol=1e-6)
    assert_trees_close(g_r, g_b)
    g = g_b["layers"]["moe"]["down_proj"]["kernel"]
    assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0
