"""DoRA as a transform: identity at init (scan and unrolled), forward and gradients equal to
PEFT's DoRA layer (detached norm), merge equals unmerged, counts and axes, only a/b/m train,
8 fake devices like one."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dora_sft
from ftjax import models
from ftjax.peft import core, get_method, quant
from ftjax.peft.dora import DoRAWeight, apply_dora
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

apply = jax.jit(models.apply, static_argnums=1)


def _setup(**kw):
    mcfg = model_cfg_of(tiny_config())
    params = models.init(mcfg, jax.random.PRNGKey(0))
    return mcfg, params, apply_dora(params, jax.random.PRNGKey(1), **kw)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_dora_starts_equal_to_base_scan_and_unrolled(init):
    mcfg, params, dora = _setup(rank=4, alpha=8.0, init=init)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    ref = apply(params, mcfg, toks)[0]
    np.testing.assert_allclose(apply(dora, mcfg, toks)[0], ref, atol=2e-5)
    if init == "default":
        unrolled = dataclasses.replace(mcfg, scan_layers=False)
        np.testing.assert_allclose(apply(dora, unrolled, toks)[0], ref, atol=2e-5)
    w = dora["layers"]["attn"]["q_proj"]["kernel"]
    w0 = params["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(w.m, jnp.linalg.norm(w0, axis=-2), rtol=1e-5)  # [L, out]


def test_dora_matches_peft_forward_and_gradients():
    """One kernel against PEFT's DoraLinearLayer: same output and the same gradients for A,
    B and m, which holds only if the column norm is detached as in PEFT (paper §4.3)."""
    import torch
    import peft
    n_in, n_out, r, alpha = 12, 10, 4, 8.0
    w0 = jax.random.normal(jax.random.PRNGKey(0), (n_in, n_out))
    dw = apply_dora({"lin": {"kernel": w0}}, jax.random.PRNGKey(1), rank=r, alpha=alpha,
                    targets=("lin/kernel",))["lin"]["kernel"]
    ka, kb, km = jax.random.split(jax.random.PRNGKey(2), 3)
    dw = dw.replace(a=jax.random.normal(ka, dw.a.shape) * 0.3,
                    b=jax.random.normal(kb, dw.b.shape) * 0.3,
                    m=dw.m * (1 + 0.1 * jax.random.normal(km, dw.m.shape)))
    x = jax.random.normal(jax.random.PRNGKey(3), (5, n_in))
    g = jax.random.normal(jax.random.PRNGKey(4), (5, n_out))

    def loss(t):
        return jnp.sum(dw.replace(**t).matmul(x) * g)
    grads = jax.grad(loss)({"a": dw.a, "b": dw.b, "m": dw.m})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n_in, n_out, bias=False)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        net.lin.weight.copy_(t(w0).T)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, use_dora=True,
                                                  target_modules=["lin"]))
    lin = pm.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(t(dw.a).T)
        lin.lora_B["default"].weight.copy_(t(dw.b).T)
        lin.lora_magnitude_vector["default"].weight.copy_(t(dw.m))
    y = pm(t(x))
    np.testing.assert_allclose(y.detach().numpy(), dw.matmul(x), rtol=1e-4, atol=1e-5)
    (y * t(g)).sum().backward()
    np.testing.assert_allclose(lin.lora_A["default"].weight.grad.numpy().T, grads["a"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lin.lora_B["default"].weight.grad.numpy().T, grads["b"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lin.lora_magnitude_vector["default"].weight.grad.numpy(),
                               grads["m"], rtol=1e-4, atol=1e-5)


def test_dora_counts_axes_and_gradients():
    mcfg, _, dora = _setup(rank=4, targets=(r"layers/attn/(q|v)_proj/kernel",))
    mask = core.trainable_mask(dora, train_patterns=())
    trainable, frozen = core.partition(dora, mask)
    d, L = mcfg.hidden_size, mcfg.num_layers
    lora_count = L * 4 * ((d + mcfg.q_size) + (d + mcfg.kv_size))
    assert core.count(trainable) == lora_count + L * (mcfg.q_size + mcfg.kv_size)  # + m
    assert core.count(trainable) + core.count(frozen) == core.count(dora)
    axes = core.axes_like(dora, models.param_axes(mcfg))
    q = axes["layers"]["attn"]["q_proj"]["kernel"]
    assert q.m == ("layers", "heads") and q.a == ("layers", "embed", "lora_rank")
    assert q.base == ("layers", "embed", "heads")
    # Gradients reach a, b and m (a once b is non-zero); the base is not a trainable leaf.
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, mcfg.vocab_size)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "loss_mask": jnp.ones((2, 8), jnp.float32)}
    g = jax.grad(lambda t: sft_loss(mcfg)(core.combine(t, frozen), batch, None)[0])(trainable)
    for name in ("q_proj", "v_proj"):
        w = g["layers"]["attn"][name]["kernel"]
        assert w.base is None
        for f in ("a", "b", "m"):
            assert float(jnp.abs(getattr(w, f)).max()) > 0, (name, f)


def test_dora_merge_equals_unmerged_and_qdora():
    mcfg, params, dora = _setup(rank=4, alpha=8.0, rslora=True, init="gaussian")
    dora = jax.tree.map(lambda x: x + 0.05, dora)  # non-zero b, m away from the norm
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, mcfg.vocab_size)
    merged = core.merge(dora)
    assert not any(core.is_structured(x) for x in jax.tree.leaves(merged, is_leaf=core.is_structured))
    np.testing.assert_allclose(apply(merged, mcfg, toks)[0], apply(dora, mcfg, toks)[0],
                               atol=1e-4)
    w = dora["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(jnp.linalg.norm(w.materialize(), axis=-2), w.m, rtol=1e-5)
    # DoRA over an NF4 base (QDoRA): starts equal to the dequantized base.
    q = apply_dora(quant.quantize_params(params), jax.random.PRNGKey(1), rank=4)
    qw = q["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(qw, DoRAWeight) and isinstance(qw.base, quant.NF4Weight)
    np.testing.assert_allclose(qw.materialize(), qw.base.materialize(), atol=1e-6)
    x = jax.random.normal(jax.random.PRNGKey(4), (3, mcfg.hidden_size))
    layer0 = jax.tree.map(lambda f: f[0], qw)  # as lax.scan slices it
    np.testing.assert_allclose(layer0.matmul(x), x @ qw.base.materialize()[0], atol=1e-5)
    axes = core.axes_like(q, models.param_axes(mcfg))
    assert axes["layers"]["attn"]["q_proj"]["kernel"].base.codes == ("layers", "embed", "heads")


def test_dora_trains_only_adapters_sharded_like_single_device(tmp_path):
    def run(c, workdir, devices=None):
        mcfg = model_cfg_of(c)
        return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                                 init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                                 transform=get_method(c.peft).transform, train_patterns=(),
                                 devices=devices),
                          sft_loss(mcfg), _loader(c))

    def cfg():
        c = tiny_config(steps=6)
        c.peft = dora_sft.get_config("rank=4").peft
        c.peft.targets = (r"layers/attn/(k|v)_proj/kernel", r"layers/mlp/down_proj/kernel")
        c.optimizer.learning_rate = 1e-2
        return c

    one = cfg()
    one.mesh.data = 1
    single = run(one, tmp_path / "o", devices=jax.devices()[:1])
    assert single.history[-1]["loss"] < single.history[0]["loss"]
    base = models.init(model_cfg_of(one), jax.random.PRNGKey(0))
    start = get_method(one.peft).transform(base, loop.transform_key(one.seed))
    got = single.state.full_params()
    for grp, name in (("attn", "k_proj"), ("mlp", "down_proj")):
        w, w0 = got["layers"][grp][name]["kernel"], start["layers"][grp][name]["kernel"]
        np.testing.assert_array_equal(w.base, base["layers"][grp][name]["kernel"])
        for f in ("a", "b", "m"):
            assert not np.array_equal(getattr(w, f), getattr(w0, f)), (name, f)
    np.testing.assert_array_equal(got["embed"]["embedding"], base["embed"]["embedding"])
    np.testing.assert_array_equal(got["final_norm"]["scale"], base["final_norm"]["scale"])
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    c = cfg()
    c.mesh.data, c.mesh.fsdp = 2, 4
    sharded = run(c, tmp_path / "s")
    np.testing.assert_allclose([h["loss"] for h in sharded.history],
                               [h["loss"] for h in single.history], rtol=1e-5)
