"""LoRA as a transform on the param tree: identity at init, only adapters train, merge equals
unmerged, parameter counts, sharding, checkpoints without the frozen base."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.peft import core
from ftjax.peft.lora import LoRAWeight, apply_lora
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

apply = jax.jit(models.apply, static_argnums=1)


def _setup(init="default", **kw):
    c = tiny_config()
    mcfg = model_cfg_of(c)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    lora = apply_lora(params, jax.random.PRNGKey(1), init=init, **kw)
    return mcfg, params, lora


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
def test_lora_starts_equal_to_base(init):
    mcfg, params, lora = _setup(init, rank=4, alpha=8.0)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    np.testing.assert_allclose(apply(lora, mcfg, toks)[0], apply(params, mcfg, toks)[0],
                               atol=2e-5)
    if init == "pissa":  # the adapter holds the top singular directions, the base the rest
        w = lora["layers"]["attn"]["q_proj"]["kernel"]
        assert float(jnp.abs(w.a).max()) > 0 and float(jnp.abs(w.b).max()) > 0


def test_trainable_count_and_axes():
    mcfg, _, lora = _setup(rank=4, targets=(r"layers/attn/(q|v)_proj/kernel",))
    mask = core.trainable_mask(lora, train_patterns=())
    trainable, frozen = core.partition(lora, mask)
    d, L = mcfg.hidden_size, mcfg.num_layers
    assert core.count(trainable) == L * 4 * ((d + mcfg.q_size) + (d + mcfg.kv_size))
    assert core.count(trainable) + core.count(frozen) == core.count(lora)
    axes = core.axes_like(lora, models.param_axes(mcfg))
    q = axes["layers"]["attn"]["q_proj"]["kernel"]
    assert q.a == ("layers", "embed", "lora_rank") and q.b == ("layers", "lora_rank", "heads")
    assert jax.tree.structure(core.combine(trainable, frozen)) == jax.tree.structure(lora)


def test_merge_equals_unmerged_and_rslora_scale():
    mcfg, _, lora = _setup(rank=4, alpha=8.0, rslora=True, init="gaussian")
    lora = jax.tree.map(lambda x: x + 0.05, lora)  # make b non-zero
    assert lora["layers"]["attn"]["q_proj"]["kernel"].scale == pytest.approx(8.0 / 2.0)
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, mcfg.vocab_size)
    merged = core.merge(lora)
    assert not any(isinstance(x, LoRAWeight) for x in jax.tree.leaves(merged, is_leaf=core.is_structured))
    np.testing.assert_allclose(apply(merged, mcfg, toks)[0], apply(lora, mcfg, toks)[0],
                               atol=1e-4)


def test_lora_on_embeddings_and_head():
    mcfg, params, lora = _setup(rank=2, targets=(r"embed/embedding", r"lm_head/kernel"))
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)
    np.testing.assert_allclose(apply(lora, mcfg, toks)[0], apply(params, mcfg, toks)[0], atol=1e-5)
    bumped = jax.tree.map(lambda x: x + 0.1, lora)
    np.testing.assert_allclose(apply(core.merge(bumped), mcfg, toks)[0],
                               apply(bumped, mcfg, toks)[0], atol=1e-4)


def test_no_target_match_is_an_error():
    with pytest.raises(ValueError, match="match no weight"):
        _setup(targets=(r"nothing/here",))


def _lora_train(c, workdir, it, rank=4):
    mcfg = model_cfg_of(c)
    return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                             init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                             transform=functools.partial(apply_lora, rank=rank, alpha=16.0),
                             train_patterns=()),
                      sft_loss(mcfg), it)


def test_lora_training_changes_only_adapters_and_resumes(tmp_path):
    c = tiny_config(steps=6, checkpoint_every=3)
    c.optimizer.learning_rate = 1e-2
    full = _lora_train(c, tmp_path / "a", _loader(c))
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    base = models.init(model_cfg_of(c), jax.random.PRNGKey(0))
    q = full.params["layers"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q.base, base["layers"]["attn"]["q_proj"]["kernel"])
    assert float(jnp.abs(q.b).max()) > 0  # B started at zero and moved
    np.testing.assert_array_equal(full.params["embed"]["embedding"], base["embed"]["embedding"])
    # The optimizer state holds only adapter leaves.
    n_opt = core.count(full.state.opt_state)
    assert n_opt < 3 * core.count(full.state.params) + 10
    # Checkpoints hold only what was trained; resume rebuilds the frozen base.
    from tests.test_train import _CrashAfter
    with pytest.raises(KeyboardInterrupt):
        _lora_train(c, tmp_path / "b", _CrashAfter(_loader(c), 4))
    # What orbax stored, read from its metadata: the LoRA factors, their two Adam moments and
    # a few scalars (step, rng, Adam's count): nothing of the base. A checkpoint that also held
    # the base (24,992 elements here, 6x the factors) or its Adam state could not pass.
    import orbax.checkpoint as ocp
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["3"]
    stored = ocp.StandardCheckpointer().metadata(
        tmp_path / "b" / "checkpoints" / "3" / "state").item_metadata
    leaves = jax.tree_util.tree_leaves_with_path(stored)
    n_stored = sum(int(np.prod(m.shape)) for _, m in leaves)
    n_train = core.count(full.state.params)
    assert 3 * n_train <= n_stored <= 3 * n_train + 16 < core.count(base)
    assert sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for _, m in leaves) \
        <= 3 * n_train * 4 + 64
    assert {jax.tree_util.keystr(p[-1:]) for p, m in leaves if m.shape and len(p) > 2} \
        == {"['a']", "['b']"}
    resumed = _lora_train(c, tmp_path / "b", _loader(c))
    assert resumed.resumed_from == 3
    ref = {h["step"]: h["loss"] for h in full.history}
    for h in resumed.history:
        assert h["loss"] == pytest.approx(ref[h["step"]], rel=1e-6)


def test_lora_sharded_equals_single_device(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    c = tiny_config(steps=3)
    c.mesh.data, c.mesh.fsdp = 2, 4
    sharded = _lora_train(c, tmp_path / "s", _loader(c))
    one = tiny_config(steps=3)
    one.mesh.data = 1
    mcfg = model_cfg_of(one)
    single = loop.train(Run.of(one, str(tmp_path / "o"), model_cfg=mcfg,
                               init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                               transform=functools.partial(apply_lora, rank=4, alpha=16.0),
                               train_patterns=(), devices=jax.devices()[:1]),
                        sft_loss(mcfg), _loader(one))
    np.testing.assert_allclose([h["loss"] for h in sharded.history],
                               [h["loss"] for h in single.history], rtol=1e-5)


def test_resume_with_other_trainable_set_is_refused(tmp_path):
    c = tiny_config(steps=3, checkpoint_every=3)
    _lora_train(c, tmp_path, _loader(c), rank=4)
    c2 = tiny_config(steps=6, checkpoint_every=3)
    with pytest.raises(ValueError, match="different set of trainable params"):
        _lora_train(c2, tmp_path, _loader(c2), rank=8)


def test_lora_dropout_only_in_training_steps():
    from ftjax.peft.lora import bind_dropout
    from ftjax.train.step import make_eval_step
    mcfg, _, lora = _setup(init="gaussian", rank=4, dropout=0.5)
    bump = lambda w: w.replace(b=w.b + 0.5) if isinstance(w, LoRAWeight) else w
    lora = core.map_weights(lambda _, w: bump(w), lora)
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 0, mcfg.vocab_size)
    plain, _ = apply(lora, mcfg, toks)  # no key bound: no dropout (eval, generation)
    k1 = bind_dropout(lora, jax.random.PRNGKey(1))
    assert k1["layers"]["attn"]["q_proj"]["kernel"].dropout_key.shape == (mcfg.num_layers, 2)
    d1, _ = apply(k1, mcfg, toks)
    d1b, _ = apply(bind_dropout(lora, jax.random.PRNGKey(1)), mcfg, toks)
    d2, _ = apply(bind_dropout(lora, jax.random.PRNGKey(2)), mcfg, toks)
    np.testing.assert_array_equal(d1, d1b)  # same key, same mask
    assert float(jnp.abs(d1 - plain).max()) > 1e-4 and float(jnp.abs(d1 - d2).max()) > 1e-4
    # The loss binds keys only when it gets an rng; evaluation passes None.
    from tests.test_train import random_batch
    b = jax.tree.map(jnp.asarray, random_batch(0))
    loss = sft_loss(mcfg, bind_rng=bind_dropout)
    e1 = make_eval_step(loss)(lora, b)
    e2 = make_eval_step(loss)(lora, b)
    assert float(e1["nll"]) == float(e2["nll"])
    t1, _ = loss(lora, b, jax.random.PRNGKey(5))
    t2, _ = loss(lora, b, jax.random.PRNGKey(6))
    assert abs(float(t1) - float(e1["nll"])) > 1e-2 and abs(float(t1) - float(t2)) > 1e-2
