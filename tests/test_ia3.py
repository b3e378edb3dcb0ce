"""IA3 as a transform: identity at init (scan and unrolled), L·(2·kv_size + intermediate)
trainable numbers, merge equals unmerged, output vs input scaling, only the scales train,
8 fake devices like one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ia3_sft
from ftjax import models
from ftjax.peft import core, get_method
from ftjax.peft.ia3 import IA3Weight, apply_ia3
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

apply = jax.jit(models.apply, static_argnums=1)


def _setup(**kw):
    mcfg = model_cfg_of(tiny_config())
    params = models.init(mcfg, jax.random.PRNGKey(0))
    return mcfg, params, apply_ia3(params, jax.random.PRNGKey(1), **kw)


def test_ia3_starts_equal_to_base_scan_and_unrolled():
    mcfg, params, ia3 = _setup()
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    ref = apply(params, mcfg, toks)[0]
    np.testing.assert_array_equal(apply(ia3, mcfg, toks)[0], ref)
    unrolled = dataclasses.replace(mcfg, scan_layers=False)
    np.testing.assert_allclose(apply(ia3, unrolled, toks)[0], ref, atol=2e-5)


def test_ia3_counts_axes_and_scaling_sides():
    mcfg, params, ia3 = _setup()
    mask = core.trainable_mask(ia3, train_patterns=())
    trainable, frozen = core.partition(ia3, mask)
    L = mcfg.num_layers
    assert core.count(trainable) == L * (2 * mcfg.kv_size + mcfg.intermediate_size)
    assert core.count(trainable) + core.count(frozen) == core.count(ia3)
    axes = core.axes_like(ia3, models.param_axes(mcfg))
    assert axes["layers"]["attn"]["k_proj"]["kernel"].ia3_l == ("layers", "kv_heads")
    assert axes["layers"]["mlp"]["down_proj"]["kernel"].ia3_l == ("layers", "mlp")
    assert not isinstance(ia3["layers"]["attn"]["q_proj"]["kernel"], IA3Weight)
    # l_v scales the output columns of v_proj, l_ff the input rows of down_proj.
    v, dn = ia3["layers"]["attn"]["v_proj"]["kernel"], ia3["layers"]["mlp"]["down_proj"]["kernel"]
    lv = jax.random.uniform(jax.random.PRNGKey(5), v.ia3_l.shape, minval=0.5, maxval=1.5)
    lf = jax.random.uniform(jax.random.PRNGKey(6), dn.ia3_l.shape, minval=0.5, maxval=1.5)
    v, dn = v.replace(ia3_l=lv), dn.replace(ia3_l=lf)
    x = jax.random.normal(jax.random.PRNGKey(7), (3, mcfg.hidden_size))
    h = jax.random.normal(jax.random.PRNGKey(8), (3, mcfg.intermediate_size))
    v0, d0 = params["layers"]["attn"]["v_proj"]["kernel"], params["layers"]["mlp"]["down_proj"]["kernel"]
    sl = lambda w: jax.tree.map(lambda f: f[1], w)  # noqa: E731  (layer 1, as scan sees it)
    np.testing.assert_allclose(sl(v).matmul(x), (x @ v0[1]) * lv[1], atol=1e-5)
    np.testing.assert_allclose(sl(dn).matmul(h), (h * lf[1]) @ d0[1], atol=1e-5)
    np.testing.assert_allclose(v.materialize(), v0 * lv[:, None, :], atol=1e-6)
    np.testing.assert_allclose(dn.materialize(), d0 * lf[:, :, None], atol=1e-6)
    with pytest.raises(ValueError, match="feedforward targets must be targets"):
        apply_ia3(params, None, targets=(r"layers/attn/k_proj/kernel",))
    with pytest.raises(ValueError, match="match no weight"):
        apply_ia3(params, None, targets=(r"nothing",), feedforward=())


def test_ia3_merge_equals_unmerged_and_gradients_reach_scales():
    mcfg, _, ia3 = _setup()
    mask = core.trainable_mask(ia3, train_patterns=())
    trainable, frozen = core.partition(ia3, mask)
    trainable = jax.tree.map(
        lambda x: x * jax.random.uniform(jax.random.PRNGKey(x.size), x.shape, minval=0.5,
                                         maxval=1.5), trainable)
    bumped = core.combine(trainable, frozen)
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, mcfg.vocab_size)
    merged = core.merge(bumped)
    np.testing.assert_allclose(apply(merged, mcfg, toks[:, :-1])[0],
                               apply(bumped, mcfg, toks[:, :-1])[0], atol=1e-4)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "loss_mask": jnp.ones((2, 8), jnp.float32)}
    g = jax.grad(lambda t: sft_loss(mcfg)(core.combine(t, frozen), batch, None)[0])(trainable)
    for grp, name in (("attn", "k_proj"), ("attn", "v_proj"), ("mlp", "down_proj")):
        w = g["layers"][grp][name]["kernel"]
        assert w.base is None and float(jnp.abs(w.ia3_l).max()) > 0, name


def test_ia3_trains_only_scales_sharded_like_single_device(tmp_path):
    def run(c, workdir, devices=None):
        mcfg = model_cfg_of(c)
        return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                                 init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                                 transform=get_method(c.peft).transform, train_patterns=(),
                                 devices=devices),
                          sft_loss(mcfg), _loader(c))

    def cfg():
        c = tiny_config(steps=6)
        c.peft = ia3_sft.get_config().peft
        c.optimizer.learning_rate = 3e-2
        return c

    one = cfg()
    one.mesh.data = 1
    single = run(one, tmp_path / "o", devices=jax.devices()[:1])
    assert single.history[-1]["loss"] < single.history[0]["loss"]
    base = models.init(model_cfg_of(one), jax.random.PRNGKey(0))
    got = single.state.full_params()
    for grp, name in (("attn", "k_proj"), ("attn", "v_proj"), ("mlp", "down_proj")):
        w = got["layers"][grp][name]["kernel"]
        np.testing.assert_array_equal(w.base, base["layers"][grp][name]["kernel"])
        assert float(jnp.abs(w.ia3_l - 1).max()) > 0, name
    for path in (("embed", "embedding"), ("final_norm", "scale")):
        np.testing.assert_array_equal(got[path[0]][path[1]], base[path[0]][path[1]])
    np.testing.assert_array_equal(got["layers"]["attn"]["q_proj"]["kernel"],
                                  base["layers"]["attn"]["q_proj"]["kernel"])
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    c = cfg()
    c.mesh.data, c.mesh.fsdp = 2, 4
    sharded = run(c, tmp_path / "s")
    np.testing.assert_allclose([h["loss"] for h in sharded.history],
                               [h["loss"] for h in single.history], rtol=1e-5)
