"""Bottleneck adapters: identity at init, the serial/parallel maths, trainable counts, scan vs
unrolled, gradients, training through the loop (only adapters change), 8 devices == 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.peft import core, get_method
from ftjax.peft.adapters import BottleneckAdapter, adapter_param_count, apply_adapters
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

apply = jax.jit(models.apply, static_argnums=1)


def _perturb(params, seed=5, amount=0.3):
    """Non-zero adapter weights (up starts at zero), base untouched."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))

    def one(_, w):
        if not isinstance(w, BottleneckAdapter):
            return w
        bump = lambda x: x + amount * jax.random.normal(next(keys), x.shape, x.dtype)
        return w.replace(up=bump(w.up), up_bias=bump(w.up_bias), down_bias=bump(w.down_bias))
    return core.map_weights(one, params)


@pytest.mark.parametrize("family,mode", [("llama", "serial"), ("llama", "parallel"),
                                         ("gpt2", "serial")])
def test_starts_equal_to_base_and_scan_equals_unrolled(family, mode):
    c = tiny_config()
    mcfg = model_cfg_of(c)
    if family == "gpt2":  # biases on o_proj/down_proj: folded into the serial adapter
        mcfg = mcfg.replace(**{k: v for k, v in models.config.FAMILIES["gpt2"].items()
                               if k != "max_position_embeddings"})
    params = models.init(mcfg, jax.random.PRNGKey(0))
    ad = apply_adapters(params, jax.random.PRNGKey(1), bottleneck=4, mode=mode)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    np.testing.assert_allclose(apply(ad, mcfg, toks)[0], apply(params, mcfg, toks)[0],
                               atol=1e-5)
    bumped = _perturb(ad)
    scanned = apply(bumped, mcfg, toks)[0]
    assert float(jnp.abs(scanned - apply(params, mcfg, toks)[0]).max()) > 1e-3
    unrolled = apply(bumped, mcfg.replace(scan_layers=False), toks)[0]
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)


def test_serial_and_parallel_maths_with_folded_bias():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(k[0], (6, 5))
    bias = jax.random.normal(k[1], (5,))
    x = jax.random.normal(k[2], (2, 3, 6))
    params = {"blk": {"kernel": w, "bias": bias}}
    for mode in ("serial", "parallel"):
        out = apply_adapters(params, k[3], bottleneck=3, mode=mode, activation="tanh",
                             scale=2.0, targets=("blk/kernel",))
        out = _perturb(out)
        a = out["blk"]["kernel"]
        f = lambda z: jnp.tanh(z @ a.down + a.down_bias) @ a.up + a.up_bias
        # What the model computes: linear(x, kernel) + the (possibly zeroed) plain bias.
        got = core.linear(x, a) + out["blk"]["bias"]
        y = x @ w + bias
        want = y + 2.0 * f(y) if mode == "serial" else y + 2.0 * f(x)
        np.testing.assert_allclose(got, want, atol=1e-5)
        if mode == "serial":
            np.testing.assert_array_equal(out["blk"]["bias"], 0.0)
    with pytest.raises(ValueError, match="cannot be merged"):
        core.merge(out)


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_trainable_count_matches_formula_and_axes(mode):
    mcfg = model_cfg_of(tiny_config())
    params = models.init(mcfg, jax.random.PRNGKey(0))
    ad = apply_adapters(params, jax.random.PRNGKey(1), bottleneck=4, mode=mode)
    trainable, frozen = core.partition(ad, core.trainable_mask(ad, train_patterns=()))
    d, f, L = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_layers
    want = L * (adapter_param_count(mcfg.q_size, d, 4, mode) + adapter_param_count(f, d, 4, mode))
    if mode == "serial":  # out*r + r + r*out + out per matrix, both outputs are d
        assert want == L * 2 * (d * 4 + 4 + 4 * d + d)
    assert core.count(trainable) == want
    axes = core.axes_like(ad, models.param_axes(mcfg))
    o = axes["layers"]["attn"]["o_proj"]["kernel"]
    read = "embed" if mode == "serial" else "heads"
    assert o.down == ("layers", read, "lora_rank") and o.up == ("layers", "lora_rank", "embed")


def test_gradients_reach_adapters_only():
    mcfg = model_cfg_of(tiny_config())
    params = models.init(mcfg, jax.random.PRNGKey(0))
    ad = apply_adapters(params, jax.random.PRNGKey(1), bottleneck=4)
    mask = core.trainable_mask(ad, train_patterns=())
    trainable, frozen = core.partition(ad, mask)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)

    def loss(t):
        logits, _ = models.apply(core.combine(t, frozen), mcfg, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    g = jax.grad(loss)(trainable)
    o = g["layers"]["attn"]["o_proj"]["kernel"]
    assert float(jnp.abs(o.up).max()) > 0 and float(jnp.abs(o.up_bias).max()) > 0
    # up == 0 at init, so nothing flows back into down yet (as for LoRA's A).
    assert float(jnp.abs(o.down).max()) == 0


def _train(c, workdir, it, devices=None):
    mcfg = model_cfg_of(c)
    m = get_method(c.peft)
    return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                             init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                             transform=m.transform, train_patterns=m.train_patterns,
                             devices=devices),
                      sft_loss(mcfg, 0.0, m.apply_fn), it)


def _adapter_config(steps, mode="serial"):
    from configs.adapter_sft import get_config
    c = tiny_config(steps=steps)
    c.peft = get_config(f"bottleneck=8,mode={mode}").peft
    c.optimizer.learning_rate = 1e-2
    return c


def test_training_lowers_loss_and_changes_only_adapters(tmp_path):
    c = _adapter_config(6, mode="parallel")
    res = _train(c, tmp_path, _loader(c))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    base = models.init(model_cfg_of(c), jax.random.PRNGKey(0))
    o = res.params["layers"]["attn"]["o_proj"]["kernel"]
    np.testing.assert_array_equal(o.base, base["layers"]["attn"]["o_proj"]["kernel"])
    assert float(jnp.abs(o.up).max()) > 0
    np.testing.assert_array_equal(res.params["layers"]["attn"]["q_proj"]["kernel"],
                                  base["layers"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(res.params["embed"]["embedding"], base["embed"]["embedding"])


def test_sharded_equals_single_device(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    c = _adapter_config(3)
    c.mesh.data, c.mesh.fsdp = 2, 4
    sharded = _train(c, tmp_path / "s", _loader(c))
    one = _adapter_config(3)
    one.mesh.data = 1
    single = _train(one, tmp_path / "o", _loader(one), devices=jax.devices()[:1])
    np.testing.assert_allclose([h["loss"] for h in sharded.history],
                               [h["loss"] for h in single.history], rtol=1e-5)
