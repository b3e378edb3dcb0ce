"""LoRA, DoRA and QLoRA (NF4) on stacked MoE expert kernels [L, E, in, out]: the per-expert
product, identity at init, merge, gradients to every expert's factors, training, sharding."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import models
from ftjax.peft import core, dora, get_method, lora, qlora, quant
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_moe import MODEL, moe_config
from tests.test_train import _loader, random_batch

EXPERTS = lora.EXPERT_TARGETS
APPLY = {"lora": lora.apply_lora, "dora": dora.apply_dora, "qlora": qlora.apply_qlora}
apply = jax.jit(models.apply, static_argnums=1)


def ref_expert_linear(x, w, group_sizes):
    """Loop reference: rows of expert e times w[e]."""
    w = np.asarray(core.materialize(w), np.float64)
    x = np.asarray(x, np.float64)
    if group_sizes is None:
        return np.stack([x[e] @ w[e] for e in range(w.shape[0])])
    bounds = np.concatenate([[0], np.cumsum(group_sizes)])
    return np.concatenate([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])])


def test_expert_linear_dense_lora_and_nf4_both_modes():
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (4, 64, 12)) * 0.1
    x_ragged = jax.random.normal(jax.random.PRNGKey(1), (10, 64))
    gs = jnp.array([3, 0, 5, 2], jnp.int32)
    x_batched = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 64))
    lw = lora.apply_lora({"k": w}, key, rank=3, targets=("k",))["k"]
    lw = lw.replace(b=jax.random.normal(jax.random.PRNGKey(3), lw.b.shape))
    nf4 = quant.quantize_nf4(w)
    for weight in (w, lw, nf4):
        np.testing.assert_allclose(core.expert_linear(x_ragged, weight, gs),
                                   ref_expert_linear(x_ragged, weight, gs), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(core.expert_linear(x_batched, weight),
                                   ref_expert_linear(x_batched, weight, None), atol=1e-4,
                                   rtol=1e-4)
    # LoRA's factored product equals the default (materialising) path.
    default = core.StructuredWeight.expert_matmul
    np.testing.assert_allclose(lw.expert_matmul(x_ragged, gs), default(lw, x_ragged, gs),
                               atol=1e-5)
    with pytest.raises(ValueError, match="group_sizes"):
        core.expert_linear(x_ragged, w, jnp.array([10], jnp.int32))


def adapted(name, cfg, seed=0):
    params = models.init(cfg, jax.random.PRNGKey(seed))
    return params, APPLY[name](params, jax.random.PRNGKey(seed + 1), rank=4, targets=EXPERTS)


def perturb(w, key):
    """Nonzero adapter factors (and magnitude), as after some training."""
    ka, kb = jax.random.split(key)
    out = w.replace(b=0.05 * jax.random.normal(kb, w.b.shape))
    if isinstance(w, dora.DoRAWeight):
        out = out.replace(m=w.m * (1.0 + 0.1 * jax.random.normal(ka, w.m.shape)))
    return out


@pytest.mark.parametrize("name", ["lora", "dora", "qlora"])
def test_identity_at_init_merge_and_axes(name):
    cfg = models.preset("mixtral", **MODEL, num_shared_experts=1)
    params, q = adapted(name, cfg)
    kern = q["layers"]["moe"]["up_proj"]["kernel"]
    assert kern.a.shape == (2, 4, 32, 4) and kern.b.shape == (2, 4, 4, 24)
    if name == "qlora":
        assert isinstance(kern.base, quant.NF4Weight)
    assert not core.is_structured(q["layers"]["moe"]["router"]["kernel"])
    assert not core.is_structured(q["layers"]["moe"]["shared"]["up_proj"]["kernel"])
    axes = core.axes_like(q, models.param_axes(cfg))["layers"]["moe"]["down_proj"]["kernel"]
    assert axes.a == ("layers", "expert", "mlp", "lora_rank")
    assert axes.b == ("layers", "expert", "lora_rank", "embed")
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 61)
    base, _ = apply(params, cfg, toks)
    out, _ = apply(q, cfg, toks)
    if name == "qlora":  # the dequantized base, within NF4's error of the original
        np.testing.assert_allclose(out, apply(core.merge(q), cfg, toks)[0], atol=1e-5)
        assert np.abs(np.asarray(out - base)).max() < 0.05
    else:
        np.testing.assert_allclose(out, base, atol=1e-6)
    moved = core.map_weights(
        lambda p, w: perturb(w, jax.random.PRNGKey(len(p))) if core.is_structured(w) else w, q)
    merged = core.merge(moved)
    assert merged["layers"]["moe"]["up_proj"]["kernel"].shape == (2, 4, 32, 24)
    if name == "qlora":  # the QLoRA merge (onto the dequantized base) agrees
        merged_q, report = qlora.merge_qlora(moved)
        for a, b in zip(jax.tree.leaves(merged_q), jax.tree.leaves(merged)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    for dispatch in ("dropless", "capacity"):
        c = cfg.replace(moe_dispatch=dispatch)
        unmerged_out, _ = apply(moved, c, toks)
        np.testing.assert_allclose(unmerged_out, apply(merged, c, toks)[0], atol=2e-5)
        assert np.abs(np.asarray(unmerged_out - apply(q, c, toks)[0])).max() > 1e-3


def test_pissa_init_on_experts_keeps_the_model():
    cfg = models.preset("mixtral", **MODEL)
    params = models.init(cfg, jax.random.PRNGKey(0))
    q = lora.apply_lora(params, jax.random.PRNGKey(1), rank=4, targets=EXPERTS, init="pissa")
    w = q["layers"]["moe"]["down_proj"]["kernel"]
    assert np.abs(np.asarray(w.b)).max() > 0  # principal directions moved into the adapter
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 61)
    np.testing.assert_allclose(apply(q, cfg, toks)[0], apply(params, cfg, toks)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "dora", "qlora"])
def test_every_routed_expert_factor_gets_gradients(name):
    cfg = models.preset("mixtral", **MODEL)
    _, q = adapted(name, cfg)
    q = core.map_weights(
        lambda p, w: perturb(w, jax.random.PRNGKey(len(p))) if core.is_structured(w) else w, q)
    toks = jax.random.randint(jax.random.PRNGKey(6), (4, 16), 0, 61)
    mask = core.trainable_mask(q, ())
    train, frozen = core.partition(q, mask)

    def loss(t):
        logits, aux = models.apply(core.combine(t, frozen), cfg, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), aux["moe"]["load"]

    grads, load = jax.jit(jax.grad(loss, has_aux=True))(train)
    routed = np.asarray(load) > 0  # [L, E]: experts that received tokens
    assert routed.sum() >= 6
    fields = ("a", "b", "m") if name == "dora" else ("a", "b")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        g = grads["layers"]["moe"][proj]["kernel"]
        for f in fields:
            per_expert = np.abs(np.asarray(getattr(g, f))).reshape(2, 4, -1).max(-1)
            assert (per_expert[routed] > 0).all(), (proj, f)
            assert (per_expert[~routed] == 0).all(), (proj, f)  # unrouted experts: no signal


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora", "qlora"])
def test_adapter_training_on_experts_lowers_loss(name, tmp_path):
    c = moe_config(steps=8)
    c.optimizer.learning_rate = 5e-2
    c.peft = ml_collections.ConfigDict(dict(method=name, rank=4, alpha=8.0, targets=EXPERTS))
    from ftjax.train.run import model_config
    mcfg = model_config(c.model)
    m = get_method(c.peft)
    init = lambda: models.init(mcfg, jax.random.PRNGKey(0))
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg, init_params=init,
                            transform=m.transform, train_patterns=m.train_patterns),
                     sft_loss(mcfg, 0.0, m.apply_fn, m.bind_rng), iter([random_batch(0)] * 8))
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.1, losses
    toks = jax.random.randint(jax.random.PRNGKey(7), (2, 8), 0, 100)
    before, _ = apply(m.transform(init(), loop.transform_key(0)), mcfg, toks)
    after, _ = apply(res.params, mcfg, toks)
    assert np.abs(np.asarray(after - before)).max() > 1e-3
    trained = res.state.params["layers"]["moe"]["up_proj"]["kernel"]
    assert np.abs(np.asarray(trained.b)).max() > 0  # expert adapters moved off zero


def test_untargeted_experts_warn():
    cfg = models.preset("mixtral", **MODEL)
    shapes = models.param_shapes(cfg)
    with pytest.warns(UserWarning, match="EXPERT_TARGETS"):
        jax.eval_shape(lambda p: lora.apply_lora(p, jax.random.PRNGKey(0)), shapes)


def test_lora_dropout_on_experts():
    cfg = models.preset("mixtral", **MODEL)
    params = models.init(cfg, jax.random.PRNGKey(0))
    q = lora.apply_lora(params, jax.random.PRNGKey(1), rank=4, targets=EXPERTS, dropout=0.5)
    q = core.map_weights(lambda p, w: perturb(w, jax.random.PRNGKey(3))
                         if core.is_structured(w) else w, q)
    bound = lora.bind_dropout(q, jax.random.PRNGKey(2))
    assert bound["layers"]["moe"]["up_proj"]["kernel"].dropout_key.shape == (2, 4, 2)
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 61)
    plain, _ = apply(q, cfg, toks)
    dropped, _ = apply(bound, cfg, toks)
    assert np.abs(np.asarray(dropped - plain)).max() > 1e-4
    np.testing.assert_array_equal(dropped, apply(bound, cfg, toks)[0])


@pytest.mark.slow
def test_lora_on_experts_sharded_ep_equals_single_device(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")

    def run(devices, mesh, rules, wd):
        c = moe_config(steps=3)
        c.sharding.rules = rules
        c.mesh.update(mesh)
        c.peft = ml_collections.ConfigDict(dict(method="lora", rank=4, targets=EXPERTS))
        from ftjax.train.run import model_config
        mcfg = model_config(c.model)
        m = get_method(c.peft)
        res = loop.train(Run.of(c, str(wd), model_cfg=mcfg,
                                init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                                transform=m.transform, train_patterns=m.train_patterns,
                                devices=devices),
                         sft_loss(mcfg, 0.0, m.apply_fn, m.bind_rng), _loader(c))
        return [h["loss"] for h in res.history]

    one = run(jax.devices()[:1], {"data": 1}, "fsdp", tmp_path / "one")
    eight = run(None, {"data": 2, "expert": 4}, "ep", tmp_path / "eight")
    np.testing.assert_allclose(eight, one, rtol=1e-5)
