"""Memory-lean fine-tuning: MeZO (zeroth-order), LOMO (fused per-layer SGD), DyLoRA (LoRA at a
rank sampled per step). docs/memory_lean.md has the measured memory."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from ftjax import models, peft
from ftjax.peft import core
from ftjax.peft.lora import LoRAWeight, truncate_rank
from ftjax.train import lomo, mezo, optim
from ftjax.train.step import sft_loss
from tests.test_train import TINY, model_cfg_of, random_batch, run_steps, tiny_config


def _quadratic(d=10, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, d))
    a = jnp.asarray(m @ m.T / d + np.eye(d), jnp.float32)
    params = {"x": jnp.asarray(rng.normal(size=4), jnp.float32),
              "y": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}

    def flat(p):
        return jnp.concatenate([p["x"], p["y"].ravel()])

    def loss_fn(p, batch, rng):  # f(x) = 0.5 x^T A x, as a "sum over one token"
        v = flat(p)
        f = 0.5 * v @ a @ v
        return f, {"nll": f, "tokens": jnp.ones(())}
    return a, params, flat, loss_fn


def test_mezo_estimate_is_unbiased_on_a_quadratic():
    a, params, flat, loss_fn = _quadratic()
    true = np.asarray(a @ flat(params))
    n = 20000

    def estimate(key):  # lr = 1: params - new params = g z, the step's gradient estimate
        new, _, info = mezo.mezo_update(loss_fn, params, {}, key, lr=1.0, eps=1e-2)
        return flat(params) - flat(new), info["projected_grad"]

    est, g = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.PRNGKey(0), n))
    est = np.asarray(est, np.float64)
    # The estimate is z z^T v (v = A x; central differences are exact on a quadratic):
    # Var of component i is |v|^2 + v_i^2 for Gaussian z, so the mean's std is that / sqrt(n).
    std = np.sqrt((true @ true + true ** 2) / n)
    assert np.all(np.abs(est.mean(0) - true) < 5 * std), (est.mean(0), true, std)
    # ... and single estimates are far from it (the test is not trivially satisfied).
    assert np.abs(est[0] - true).max() > 10 * std.max()
    # The projected gradient is z^T v with the z the update used (regenerated per leaf).
    z = mezo.perturbation(params, jax.random.PRNGKey(0))
    key0 = jax.random.split(jax.random.PRNGKey(0), n)[0]
    z0 = flat(mezo.perturbation(params, key0))
    np.testing.assert_allclose(g[0], z0 @ true, rtol=1e-3)
    assert jax.tree.structure(z) == jax.tree.structure(params)


def test_mezo_restores_params_and_leaves_them_alone_at_lr_zero():
    _, params, flat, loss_fn = _quadratic()
    new, _, _ = jax.jit(lambda p: mezo.mezo_update(loss_fn, p, {}, jax.random.PRNGKey(3),
                                                   lr=0.0, eps=1e-3))(params)
    np.testing.assert_allclose(flat(new), flat(params), atol=1e-6)


def _mezo_config(steps, lr):
    c = tiny_config(steps=steps)
    c.optimizer = common.optimizer("mezo", learning_rate=lr, schedule="constant",
                                   grad_clip_norm=0.0, mezo_eps=1e-3)
    return c


def _loss(mcfg, params, b, apply_fn=None):
    obj, s = sft_loss(mcfg, apply_fn=apply_fn)(params, jax.tree.map(jnp.asarray, b), None)
    return float(obj / s["tokens"])


def test_mezo_learns_in_the_jitted_sharded_step():
    c = _mezo_config(40, 1e-2)
    b = random_batch(0)
    mcfg = model_cfg_of(c)
    start = _loss(mcfg, models.init(mcfg, jax.random.PRNGKey(0)), b)
    losses, params = run_steps(c, [b] * 40, devices=jax.devices()[:1], mesh={"data": 1})
    end = _loss(mcfg, params, b)
    assert end < start - 0.03, (start, end, losses)
    assert np.all(np.isfinite(losses))


def test_mezo_step_function_with_donated_params():
    _, params, flat, loss_fn = _quadratic()
    step = jax.jit(mezo.make_mezo_step(loss_fn, eps=1e-3, learning_rate=0.02),
                   donate_argnums=0)
    p, key = jax.tree.map(jnp.array, params), jax.random.PRNGKey(1)
    start = float(loss_fn(p, None, None)[0])
    for i in range(300):
        p, m = step(p, {}, key, i)
    assert float(loss_fn(p, None, None)[0]) < 0.5 * start
    assert set(m) >= {"loss", "grad_norm", "projected_grad", "learning_rate", "tokens"}


def test_mezo_bad_settings_fail_clearly():
    from ftjax.trainers import validate_config
    with pytest.raises(ValueError, match="grad_clip_norm=1.0 does not apply to mezo"):
        optim.make_optimizer(common.optimizer("mezo"), 10)
    with pytest.raises(ValueError, match="param_groups are not supported"):
        optim.make_optimizer(common.optimizer("mezo", grad_clip_norm=0.0,
                                              param_groups=((".*", 2.0),)), 10)
    with pytest.raises(ValueError, match="mezo_eps=0.0 must be > 0"):
        mezo.mezo(lambda s: 1.0, eps=0.0)
    c = _mezo_config(4, 1e-3)
    c.optimizer.mezo_eps = -1.0
    with pytest.raises(ValueError, match="mezo_eps"):
        validate_config(c)
    tx, _ = optim.make_optimizer(common.optimizer("mezo", grad_clip_norm=0.0), 10)
    with pytest.raises(TypeError, match="no gradients"):
        tx.update({}, tx.init({}))
    with pytest.raises(ValueError, match="choose one of.*mezo"):
        optim.make_optimizer(common.optimizer("mezzo"), 10)


# ------------------------------------------------------------------------------------------
# LOMO


def _lomo_cfg(family):
    return models.preset(family, **TINY)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: tied head, learned positions
def test_lomo_step_equals_one_sgd_step(family):
    mcfg = _lomo_cfg(family)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    b = jax.tree.map(jnp.asarray, random_batch(1))
    lr = 0.3

    def mean_loss(p):
        obj, s = sft_loss(mcfg)(p, b, None)
        return obj / s["tokens"]
    grads = jax.grad(mean_loss)(params)
    want = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    got, m = jax.jit(lomo.make_lomo_step(mcfg, learning_rate=lr))(params, b, 0)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5, err_msg=str(path))
    assert float(m["loss"]) == pytest.approx(float(mean_loss(params)), rel=1e-5)
    # A tied table's two gradient parts are counted as separate blocks (lomo.py docstring).
    rel = 1e-4 if not mcfg.tie_embeddings else 1e-2
    assert float(m["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=rel)


def test_lomo_learns_with_donated_params():
    mcfg = _lomo_cfg("llama")
    b = jax.tree.map(jnp.asarray, random_batch(0))
    p = models.init(mcfg, jax.random.PRNGKey(0))
    start = _loss(mcfg, p, b)
    step = jax.jit(lomo.make_lomo_step(mcfg, learning_rate=0.5), donate_argnums=0)
    for i in range(15):
        p, m = step(p, b, i)
    assert _loss(mcfg, p, b) < start - 0.5


def test_lomo_refuses_what_it_does_not_handle():
    mcfg = _lomo_cfg("llama")
    params = models.init(mcfg, jax.random.PRNGKey(0))
    b = jax.tree.map(jnp.asarray, random_batch(0))
    lora = peft.get_method({"method": "lora", "rank": 2}).transform(params, jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="structured weights"):
        lomo.lomo_update(lora, b, mcfg, 0.1)
    moe_cfg = models.preset("mixtral", **TINY, num_experts=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="MoE"):
        lomo.check_supported(params, moe_cfg)
    with pytest.raises(ValueError, match="exactly one"):
        lomo.make_lomo_step(mcfg)
    with pytest.raises(ValueError, match="must be > 0"):
        lomo.make_lomo_step(mcfg, learning_rate=0.0)


# ------------------------------------------------------------------------------------------
# DyLoRA


def _dylora(dynamic=True, rank=8):
    mcfg = model_cfg_of(tiny_config())
    params = models.init(mcfg, jax.random.PRNGKey(0))
    s = peft.resolve({"method": "lora", "rank": rank, "alpha": float(rank),
                      "dynamic_rank": dynamic})
    m = peft.get_method(s)
    return mcfg, m, m.transform(params, jax.random.PRNGKey(1))


def test_dylora_is_a_lora_setting_only():
    assert peft.method_defaults("lora").dynamic_rank is False
    for other in ("lora_fa", "dora", "qlora"):
        assert "dynamic_rank" not in peft.method_defaults(other)
    assert peft.get_method({"method": "lora"}).bind_rng is None
    from ftjax.trainers import validate_config
    c = tiny_config()
    c.peft = peft.resolve({"method": "lora", "dynamic_rank": 3})
    with pytest.raises(ValueError, match="dynamic_rank"):
        validate_config(c)


def test_dylora_masks_the_gradient_beyond_the_sampled_rank():
    mcfg, m, params = _dylora()
    # Random B (at init B = 0 and A's gradient would be zero anyway).
    params = core.map_weights(
        lambda p, w: w.replace(b=0.1 * jax.random.normal(jax.random.PRNGKey(len(p)), w.b.shape))
        if isinstance(w, LoRAWeight) else w, params)
    mask = core.trainable_mask(params, m.train_patterns)
    train, frozen = core.partition(params, mask)
    b = jax.tree.map(jnp.asarray, random_batch(0))
    loss = sft_loss(mcfg, bind_rng=m.bind_rng)
    seen = set()
    for seed in range(6):
        rng = jax.random.PRNGKey(seed)
        rank = int(np.floor(float(jax.random.uniform(rng)) * 8)) + 1
        seen.add(rank)
        g = jax.grad(lambda t: loss(core.combine(t, frozen), b, rng)[0])(train)
        for w in jax.tree.leaves(g, is_leaf=lambda x: isinstance(x, LoRAWeight)):
            if not isinstance(w, LoRAWeight):
                continue
            assert float(jnp.abs(w.a[..., rank:]).max(initial=0.0)) == 0.0
            assert float(jnp.abs(w.b[..., rank:, :]).max(initial=0.0)) == 0.0
            assert float(jnp.abs(w.a[..., :rank]).max()) > 0
            assert float(jnp.abs(w.b[..., :rank, :]).max()) > 0
        # Evaluation (no rng) runs the full rank.
        assert jnp.isfinite(loss(params, b, None)[0])
    assert len(seen) > 2, seen


def _train_lora(dynamic, steps=60):
    mcfg, m, params = _dylora(dynamic)
    mask = core.trainable_mask(params, m.train_patterns)
    train, frozen = core.partition(params, mask)
    b = jax.tree.map(jnp.asarray, random_batch(0))
    loss = sft_loss(mcfg, bind_rng=m.bind_rng)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(t, s, rng):
        g = jax.grad(lambda t: (lambda o, st: o / st["tokens"])(
            *loss(core.combine(t, frozen), b, rng)))(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s

    t, s = train, tx.init(train)
    for i in range(steps):
        t, s = step(t, s, jax.random.PRNGKey(i))
    full = core.combine(t, frozen)
    return mcfg, b, _loss(mcfg, params, b), {r: _loss(mcfg, truncate_rank(full, r), b)
                                              for r in (1, 2, 4, 8)}


def test_dylora_works_truncated_at_every_rank():
    mcfg, b, start, dy = _train_lora(True)
    _, _, _, plain = _train_lora(False)
    # Every truncation of the DyLoRA adapter has learned (start: the base model's loss) ...
    # (more rank, lower loss: the components are nested).
    for r, v in dy.items():
        assert v < start - 0.05, (r, dy, start)
    assert dy[1] > dy[2] > dy[4] > dy[8], dy
    # ... and its small ranks are better than a plain LoRA adapter cut to the same rank.
    assert dy[1] < plain[1] and dy[2] < plain[2], (dy, plain)
    assert truncate_rank(_dylora()[2], 3)["layers"]["attn"]["q_proj"]["kernel"].a.shape[-1] == 3
    with pytest.raises(ValueError, match="rank=0"):
        truncate_rank({}, 0)
