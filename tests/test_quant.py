"""Quantized bases (NF4, int8) and QLoRA: the published NF4 code, quantization error and
storage, packing, stacked/sliced layouts, sharding, starting equal to the dequantized base,
merge targets, and LoRA over NF4 training on 8 fake devices like on one."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import qlora_sft
from ftjax import models, sharding
from ftjax.peft import core, get_method, quant
from ftjax.peft.lora import LoRAWeight, apply_lora
from ftjax.peft.qlora import apply_qlora, merge_qlora
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

apply = jax.jit(models.apply, static_argnums=1)

# QLoRA paper appendix E / bitsandbytes' NF4 table.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_codebook_is_the_published_one():
    np.testing.assert_array_equal(quant.NF4_CODEBOOK, np.float32(PUBLISHED_NF4))
    # ... and is what bitsandbytes' create_normal_map(offset=0.9677083) derives: quantiles of
    # N(0, 1), 8 positive and 7 negative levels plus an exact zero, scaled to [-1, 1].
    import scipy.stats as stats
    off = 0.9677083
    pos = stats.norm.ppf(np.linspace(off, 0.5, 9)[:-1])
    neg = -stats.norm.ppf(np.linspace(off, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, neg, [0.0]]))
    np.testing.assert_allclose(quant.NF4_CODEBOOK, v / v.max(), atol=1e-6)
    dyn = quant.DYNAMIC_MAP  # the 8-bit code of the double quantization
    assert dyn.shape == (256,) and len(np.unique(dyn)) == 256 and np.all(np.diff(dyn) > 0)
    assert dyn[-1] == 1.0 and 0.0 in dyn and dyn[0] == pytest.approx(-0.99296875)


def test_quantization_error_and_bits_per_param():
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 256, 1024))
    nf4 = quant.quantize_nf4(w)
    nf4_plain = quant.quantize_nf4(w, double_quant=False)
    i8 = quant.quantize_int8(w)
    e_nf4, e_plain, e_i8 = (quant.relative_rms_error(w, q) for q in (nf4, nf4_plain, i8))
    # Measured: NF4 0.0921 (0.0921 without double quantization), int8 0.0070.
    assert 0.085 < e_nf4 < 0.10
    assert abs(e_nf4 - e_plain) < 1e-3  # double quantization costs next to nothing
    assert e_i8 < 0.01 and e_i8 < e_nf4 / 10
    # 4 + 8/64 + 32/(64*256) bits, plus one float32 offset per [256, 1024] matrix.
    assert quant.bits_per_param(nf4) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / 2**18)
    assert quant.bits_per_param(nf4) == pytest.approx(4.127, abs=1e-3)
    assert quant.bits_per_param(nf4_plain) == pytest.approx(4.5)
    assert quant.bits_per_param(i8) == pytest.approx(8 + 32 / 256)
    assert nf4.codes.dtype == jnp.uint8 and nf4.codes.shape == (2, 128, 1024)
    assert nf4.absmax.dtype == jnp.uint8 and nf4.absmax.shape == (2, 4, 1024)


def test_nf4_packing_exact_roundtrip_and_products():
    # Weights that are exactly codebook values times a block absmax survive unchanged.
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, (128, 8))
    idx[::64] = 15  # every block of 64 along `in` holds a +1.0, so absmax is exact
    scale = np.repeat(rng.uniform(0.5, 2.0, (2, 8)), 64, axis=0).astype(np.float32)
    w = jnp.asarray(quant.NF4_CODEBOOK[idx] * scale)
    q = quant.quantize_nf4(w, double_quant=False)
    np.testing.assert_array_equal(q.materialize(), w)
    np.testing.assert_array_equal(q.codes >> 4, idx[0::2])  # first element: high nibble
    np.testing.assert_array_equal(q.codes & 15, idx[1::2])
    # Padding (in % 64 != 0), products, row lookups, under jit.
    w = jax.random.normal(jax.random.PRNGKey(1), (40, 24))
    for q in (quant.quantize_nf4(w), quant.quantize_int8(w)):
        x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 40))
        dense = q.materialize()
        assert dense.shape == (40, 24) and dense.dtype == jnp.float32
        np.testing.assert_allclose(jax.jit(core.linear)(x, q), x @ dense, atol=1e-5)
        ids = jnp.array([[0, 1, 39], [17, 2, 63 % 40]])
        np.testing.assert_allclose(core.embed(ids, q), dense[ids], atol=1e-6)
        assert q.shape == (40, 24)


def test_backward_keeps_codes_not_the_dequantized_weight(capsys):
    from jax.ad_checkpoint import print_saved_residuals
    w = jax.random.normal(jax.random.PRNGKey(0), (128, 96))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 128))
    for q in (quant.quantize_nf4(w), quant.quantize_int8(w)):
        lw = LoRAWeight(base=q, a=jnp.ones((128, 2)), b=jnp.ones((2, 96)))
        print_saved_residuals(lambda x, a: lw.replace(a=a).matmul(x).sum(), x, lw.a)
        saved = capsys.readouterr().out
        assert "f32[128,96]" not in saved, saved  # no dense copy held for the backward pass
        assert ("u8[64,96]" if isinstance(q, quant.NF4Weight) else "i8[128,96]") in saved


def _quantized_cases():
    """(name, quantized weight, dense dequantized twin, group_sizes or None, x): plain and
    padded NF4, int8, and stacked experts (ragged and batched) of both kinds."""
    k = jax.random.split(jax.random.PRNGKey(7), 6)
    w = jax.random.normal(k[0], (128, 96)) * 0.1
    wp = jax.random.normal(k[1], (40, 24)) * 0.1
    we = jax.random.normal(k[2], (3, 64, 32)) * 0.1
    x, xp = jax.random.normal(k[3], (2, 5, 128)), jax.random.normal(k[4], (3, 40))
    xr, xb = jax.random.normal(k[5], (9, 64)), jax.random.normal(k[5], (3, 4, 64))
    gs = jnp.array([4, 0, 5], jnp.int32)
    for name, q, xx, g in (("nf4", quant.quantize_nf4(w), x, None),
                           ("nf4-pad-single", quant.quantize_nf4(wp, double_quant=False), xp, None),
                           ("int8", quant.quantize_int8(w), x, None),
                           ("nf4-experts-ragged", quant.quantize_nf4(we), xr, gs),
                           ("nf4-experts-batched", quant.quantize_nf4(we), xb, None),
                           ("int8-experts-ragged", quant.quantize_int8(we), xr, gs),
                           ("int8-experts-batched", quant.quantize_int8(we), xb, None)):
        yield name, q, q.materialize(), g, xx


@pytest.mark.parametrize("case", range(7))
def test_quantized_product_and_gradients_equal_dequantize_then_matmul(case):
    # Forward and every gradient (input, LoRA a and b) of the quantized product equal plain
    # autodiff through the dequantized dense weight, to float32 round-off.
    name, q, dense, gs, x = list(_quantized_cases())[case]
    experts = "experts" in name
    n_in, n_out = dense.shape[-2:]
    lead = dense.shape[:-2]
    a = jax.random.normal(jax.random.PRNGKey(1), lead + (n_in, 3)) * 0.1
    b = jax.random.normal(jax.random.PRNGKey(2), lead + (3, n_out)) * 0.1

    def loss(base, x, a, b):
        lw = LoRAWeight(base=base, a=a, b=b, scale=2.0)
        y = core.expert_linear(x, lw, gs) if experts else core.linear(x, lw)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1]) / y.shape[-1]), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True))
    (v, y), g = grad(q, x, a, b)
    (v_ref, y_ref), g_ref = grad(dense, x, a, b)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The bare base product too (no adapter), and its input gradient.
    bare = lambda w, x: jnp.sum(jnp.cos(core.expert_linear(x, w, gs) if experts
                                        else core.linear(x, w)))
    np.testing.assert_allclose(jax.jit(jax.grad(bare, argnums=1))(q, x),
                               jax.jit(jax.grad(bare, argnums=1))(dense, x), rtol=1e-5, atol=1e-6)


def test_frozen_base_gets_no_weight_gradient_product():
    # Differentiating with respect to the whole weight, quantized base included, still
    # computes no [in, out] weight-gradient product for the frozen base: its float fields
    # (block scales) get zero cotangents and the backward only dequantizes and multiplies.
    w = jax.random.normal(jax.random.PRNGKey(0), (128, 96))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 128))
    for q in (quant.quantize_nf4(w), quant.quantize_int8(w)):
        lw = LoRAWeight(base=q, a=jnp.ones((128, 2)), b=jnp.ones((2, 96)))
        f = jax.jit(jax.grad(lambda lw, x: lw.matmul(x).sum(), argnums=(0, 1), allow_int=True))
        hlo = f.lower(lw, x).compile().as_text()
        assert " f32[128,96]{1,0} dot(" not in hlo and " f32[96,128]{1,0} dot(" not in hlo
        g_lw, _ = f(lw, x)
        for leaf in jax.tree.leaves(g_lw.base):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert not np.any(np.asarray(leaf))
        assert float(jnp.abs(g_lw.a).max()) > 0


@pytest.mark.parametrize("kind", quant.KINDS)
def test_qlora_model_gradients_equal_lora_on_the_dequantized_base(kind):
    # The whole model (scanned layers): QLoRA's loss and adapter gradients equal LoRA's over
    # the dense dequantized base with the same factors.
    mcfg, params = _tiny()
    key = jax.random.PRNGKey(1)
    ql = apply_qlora(params, key, rank=4, quant_kind=kind)
    ref = apply_lora(core.merge(quant.quantize_params(params, kind=kind)), key, rank=4)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, mcfg.vocab_size)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "loss_mask": jnp.ones((2, 8), jnp.float32)}
    loss = sft_loss(mcfg)
    out = []
    for tree in (ql, ref):
        trainable, frozen = core.partition(tree, core.trainable_mask(tree, ()))
        trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # b != 0
        f = jax.jit(jax.value_and_grad(lambda t: loss(core.combine(t, frozen), batch, None)[0]))
        out.append(f(trainable))
    (v, g), (v_ref, g_ref) = out
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_stacked_quantization_slices_per_layer():
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 64, 48)).astype(jnp.bfloat16)
    for kind in quant.KINDS:
        q = quant.quantize(w, kind)
        dense = q.materialize()
        assert dense.dtype == jnp.bfloat16
        # What lax.scan sees: every field sliced on the layer axis; the same as quantizing
        # that layer alone (double quantization statistics are per matrix).
        qi = jax.tree.map(lambda x: x[1], q)
        np.testing.assert_array_equal(qi.materialize(), dense[1])
        np.testing.assert_array_equal(quant.quantize(w[1], kind).materialize(), dense[1])


def _tiny():
    mcfg = model_cfg_of(tiny_config())
    return mcfg, models.init(mcfg, jax.random.PRNGKey(0))


def test_quantized_params_shard_like_the_dense_weights():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mcfg, params = _tiny()
    q = quant.quantize_params(params)
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    placement = loop.Placement(c, mcfg, abstract_params=jax.eval_shape(lambda: q))
    ax = placement.axes["layers"]["attn"]["q_proj"]["kernel"]
    assert ax.codes == ("layers", "embed", "heads") and ax.absmax == ("layers", None, "heads")
    assert ax.absmax_scale == ("layers", None) and ax.absmax_offset == ("layers",)
    placed = placement.put_params(q)["layers"]["mlp"]["down_proj"]["kernel"]
    # The packed codes shard like the dense weight (here `mlp` is replicated, `embed` on fsdp).
    assert tuple(placed.codes.sharding.spec) == (None, None, "fsdp")
    assert tuple(placed.absmax.sharding.spec) == (None, None, "fsdp")


def test_qlora_starts_equal_to_dequantized_base_scan_and_unrolled():
    mcfg, params = _tiny()
    ql = apply_qlora(params, jax.random.PRNGKey(1), rank=4)
    lora = apply_lora(params, jax.random.PRNGKey(1), rank=4)
    q = ql["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(q, LoRAWeight) and isinstance(q.base, quant.NF4Weight)
    np.testing.assert_array_equal(q.a, lora["layers"]["mlp"]["down_proj"]["kernel"].a)
    deq = core.merge(quant.quantize_params(params))
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    ref = apply(deq, mcfg, toks)[0]
    np.testing.assert_allclose(apply(ql, mcfg, toks)[0], ref, atol=2e-5)
    unrolled = dataclasses.replace(mcfg, scan_layers=False)
    np.testing.assert_allclose(apply(ql, unrolled, toks)[0], ref, atol=2e-5)
    # The int8 variant through the config and the method registry.
    m = get_method(qlora_sft.get_config("quant=int8").peft)
    q8 = m.transform(params, jax.random.PRNGKey(1))
    w8 = q8["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(w8, LoRAWeight) and isinstance(w8.base, quant.Int8Weight)
    w0 = params["layers"]["attn"]["q_proj"]["kernel"]
    err8 = float(jnp.abs(core.merge(q8)["layers"]["attn"]["q_proj"]["kernel"] - w0).max())
    err4 = float(jnp.abs(deq["layers"]["attn"]["q_proj"]["kernel"] - w0).max())
    assert 0 < err8 < err4


def test_qlora_counts_masks_axes_and_gradients():
    mcfg, params = _tiny()
    ql = apply_qlora(params, jax.random.PRNGKey(1), rank=4,
                     targets=(r"layers/attn/(q|v)_proj/kernel",),
                     quantize_targets=(r"layers/mlp/.*_proj/kernel",))
    assert isinstance(ql["layers"]["mlp"]["up_proj"]["kernel"], quant.NF4Weight)  # no adapter
    mask = core.trainable_mask(ql, train_patterns=())
    trainable, frozen = core.partition(ql, mask)
    d, L = mcfg.hidden_size, mcfg.num_layers
    assert core.count(trainable) == L * 4 * ((d + mcfg.q_size) + (d + mcfg.kv_size))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
    # Parameter counts are logical: the NF4 model counts as many as its dense LoRA twin (an
    # int8 base too), while its storage (packed codes + block scales) holds fewer elements.
    lora = apply_lora(params, jax.random.PRNGKey(1), rank=4,
                      targets=(r"layers/attn/(q|v)_proj/kernel",))
    i8 = apply_qlora(params, jax.random.PRNGKey(1), rank=4, quant_kind="int8",
                     targets=(r"layers/attn/(q|v)_proj/kernel",),
                     quantize_targets=(r"layers/mlp/.*_proj/kernel",))
    n = core.count_params(lora)
    assert n == core.count(params) + core.count(trainable)
    assert core.count_params(ql) == core.count_params(i8) == n > core.count(ql)
    assert core.count_params(trainable) == core.count(trainable)
    assert core.count_params(trainable) + core.count_params(frozen) == n
    axes = core.axes_like(ql, models.param_axes(mcfg))
    q = axes["layers"]["attn"]["q_proj"]["kernel"]
    assert q.a == ("layers", "embed", "lora_rank") and q.base.codes == ("layers", "embed", "heads")
    assert jax.tree.structure(core.combine(trainable, frozen)) == jax.tree.structure(ql)
    # Gradients reach the adapters (a too, once b is non-zero), never the quantized base.
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, mcfg.vocab_size)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "loss_mask": jnp.ones((2, 8), jnp.float32)}
    loss = sft_loss(mcfg)
    g = jax.grad(lambda t: loss(core.combine(t, frozen), batch, None)[0])(trainable)
    for w in (g["layers"]["attn"]["q_proj"]["kernel"], g["layers"]["attn"]["v_proj"]["kernel"]):
        assert w.base is None or not jax.tree.leaves(w.base)
        assert float(jnp.abs(w.a).max()) > 0 and float(jnp.abs(w.b).max()) > 0


def test_merge_qlora_targets():
    mcfg, params = _tiny()
    ql = apply_qlora(params, jax.random.PRNGKey(1), rank=4)
    ql = jax.tree.map(lambda x: x + 0.02 if x.dtype == jnp.float32 else x, ql)  # b != 0
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, mcfg.vocab_size)
    merged, rep = merge_qlora(ql, "dequantized")
    assert rep["max_abs_error"] is None
    assert not any(core.is_structured(x) for x in jax.tree.leaves(merged, is_leaf=core.is_structured))
    np.testing.assert_allclose(apply(merged, mcfg, toks)[0], apply(ql, mcfg, toks)[0], atol=1e-4)
    with pytest.raises(ValueError, match="original_params"):
        merge_qlora(ql, "original")
    orig, rep = merge_qlora(ql, "original", original_params=params)
    w = ql["layers"]["attn"]["o_proj"]["kernel"]
    w0 = params["layers"]["attn"]["o_proj"]["kernel"]
    np.testing.assert_allclose(orig["layers"]["attn"]["o_proj"]["kernel"],
                               w0 + w.scale * w.a @ w.b, atol=1e-6)
    gap = float(jnp.abs(w0 - w.base.materialize()).max())
    assert rep["per_weight"]["layers/attn/o_proj/kernel"] == pytest.approx(gap, rel=1e-4)
    assert rep["max_abs_error"] == max(rep["per_weight"].values()) > 0
    assert len(rep["per_weight"]) == 7
    _, rep_d = merge_qlora(ql, "dequantized", original_params=params)
    assert rep_d["max_abs_error"] == pytest.approx(rep["max_abs_error"])


def _qlora_train(c, workdir, devices=None):
    mcfg = model_cfg_of(c)
    return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                             init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                             transform=functools.partial(apply_qlora, rank=4, alpha=16.0),
                             train_patterns=(), devices=devices),
                      sft_loss(mcfg), _loader(c))


def test_lora_over_nf4_trains_sharded_like_single_device(tmp_path):
    one = tiny_config(steps=6)
    one.optimizer.learning_rate = 1e-2
    one.mesh.data = 1
    single = _qlora_train(one, tmp_path / "o", devices=jax.devices()[:1])
    assert single.history[-1]["loss"] < single.history[0]["loss"]
    base = apply_qlora(models.init(model_cfg_of(one), jax.random.PRNGKey(0)),
                       loop.transform_key(one.seed), rank=4)
    got = single.state.full_params()
    for name in ("q_proj", "o_proj"):
        w, w0 = got["layers"]["attn"][name]["kernel"], base["layers"]["attn"][name]["kernel"]
        for f in ("codes", "absmax", "absmax_scale", "absmax_offset"):
            np.testing.assert_array_equal(getattr(w.base, f), getattr(w0.base, f))
        assert not np.array_equal(w.a, w0.a)
        assert float(jnp.abs(w.b).max()) > 0  # B started at zero and moved
    np.testing.assert_array_equal(got["embed"]["embedding"], base["embed"]["embedding"])
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    c = tiny_config(steps=6)
    c.optimizer.learning_rate = 1e-2
    c.mesh.data, c.mesh.fsdp = 2, 4
    sharded = _qlora_train(c, tmp_path / "s")
    np.testing.assert_allclose([h["loss"] for h in sharded.history],
                               [h["loss"] for h in single.history], rtol=1e-5)
