"""Prompt tuning and prefix tuning through an apply_fn: parity with manual references (an
extended-vocabulary model; a real prefill of the prefix), packed segments, counts, gradients,
cached generation, training through the loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import models
from ftjax.peft import core, get_method
from ftjax.infer.generate import generate
from ftjax.peft import prompt as prompt_mod
from ftjax.peft.prompt import (PromptTable, apply_prefix_tuning, apply_prompt_tuning,
                               prefix_param_count, split_prefix)
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, model_cfg_of, tiny_config

N = 3
apply = jax.jit(models.apply, static_argnums=1)
# The method's apply functions wrap the model's apply (peft never imports the model).
prompt_apply = functools.partial(prompt_mod.prompt_apply, base_apply=models.apply)
prefix_apply = functools.partial(prompt_mod.prefix_apply, base_apply=models.apply)
p_apply = jax.jit(prompt_apply, static_argnums=1, static_argnames=("segments",))
x_apply = jax.jit(prefix_apply, static_argnums=1, static_argnames=("segments",))


def _setup(tie=False, scan=True):
    mcfg = model_cfg_of(tiny_config()).replace(tie_embeddings=tie, scan_layers=scan)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    return mcfg, params


def _toks(mcfg, b=2, t=6, seed=2):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 3, mcfg.vocab_size)


# ------------------------------------------------------------------------------------------
# Prompt tuning
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie,scan", [(False, True), (True, False)])
def test_prompt_equals_extended_vocab_reference(tie, scan):
    mcfg, params = _setup(tie, scan)
    pt = apply_prompt_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N, init_std=0.5)
    table = pt["embed"]["embedding"]
    assert isinstance(table, PromptTable) and table.materialize().shape == (mcfg.vocab_size,
                                                                             mcfg.hidden_size)
    toks = _toks(mcfg)
    got, _ = p_apply(pt, mcfg, toks)
    # Reference: a model whose vocabulary really has V + n rows (LM head padded with zero
    # columns, then cut back to V), fed the virtual ids explicitly.
    v = mcfg.vocab_size
    ref = dict(params, embed={"embedding": jnp.concatenate([params["embed"]["embedding"],
                                                            table.prompt])})
    if not tie:
        ref["lm_head"] = {"kernel": jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, N)))}
    ext = jnp.concatenate([jnp.broadcast_to(v + jnp.arange(N), (2, N)), toks], axis=1)
    want, _ = apply(ref, mcfg.replace(vocab_size=v + N), ext)
    assert got.shape == (2, 6, v)
    np.testing.assert_allclose(got, want[:, N:, :v], atol=1e-5)


def test_text_init_equals_model_on_the_text_and_counts():
    mcfg, params = _setup()
    text = [5, 9, 11, 7]  # cut to N ids
    pt = apply_prompt_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N, init="text",
                             init_token_ids=text)
    toks = _toks(mcfg)
    got, _ = p_apply(pt, mcfg, toks)
    full = jnp.concatenate([jnp.broadcast_to(jnp.asarray(text[:N]), (2, N)), toks], axis=1)
    np.testing.assert_allclose(got, apply(params, mcfg, full)[0][:, N:], atol=1e-5)
    trainable, _ = core.partition(pt, core.trainable_mask(pt, train_patterns=()))
    assert core.count(trainable) == N * mcfg.hidden_size
    axes = core.axes_like(pt, models.param_axes(mcfg))
    assert axes["embed"]["embedding"].prompt == (None, "embed")
    vocab_init = apply_prompt_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N,
                                     init="vocab")
    rows = vocab_init["embed"]["embedding"].prompt
    emb = params["embed"]["embedding"]
    assert all(bool(jnp.any(jnp.all(emb == r, axis=1))) for r in rows)


def test_packed_segments_each_see_the_prompt():
    """A row packing documents a (segment 1) and b (segment 2) equals a and b in rows of their
    own, when the prompt/prefix is repeated per segment (segments=2)."""
    mcfg, params = _setup()
    pt = apply_prompt_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N, init_std=0.5)
    pre = apply_prefix_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N)
    a, b = _toks(mcfg, 1, 4, seed=3), _toks(mcfg, 1, 4, seed=4)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 4 + [2] * 4])
    pos = jnp.asarray([list(range(4)) * 2])
    alone = jnp.concatenate([a, b], axis=0)  # [2, 4]: one document per row
    for fn, p in ((p_apply, pt), (x_apply, pre)):
        got, _ = fn(p, mcfg, packed, positions=pos, segment_ids=seg, segments=2)
        want, _ = fn(p, mcfg, alone)
        np.testing.assert_allclose(jnp.concatenate([got[:, :4], got[:, 4:]]), want, atol=1e-5)


def _greedy_reference(apply_fn, params, mcfg, prompts, steps):
    """Greedy decoding by re-running the full forward pass (no cache) for every token, on
    right-padded rows (padding after the real tokens cannot affect them: causal mask)."""
    width = max(len(p) for p in prompts) + steps
    buf = np.zeros((len(prompts), width), np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    lens = [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        buf[i, :len(p)], seg[i, :len(p)] = p, 1
    for _ in range(steps):
        logits, _ = apply_fn(params, mcfg, jnp.asarray(buf), segment_ids=jnp.asarray(seg))
        for i in range(len(prompts)):
            buf[i, lens[i]] = int(jnp.argmax(logits[i, lens[i] - 1]))
            seg[i, lens[i]] = 1
            lens[i] += 1
    return np.stack([buf[i, len(p):len(p) + steps] for i, p in enumerate(prompts)])


@pytest.mark.parametrize("which", ["prompt", "prefix"])
def test_cached_generation_equals_full_forward(which):
    mcfg, params = _setup()
    if which == "prompt":
        p = apply_prompt_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N,
                                init_std=0.5)
        fn = prompt_apply
    else:
        p = apply_prefix_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N)
        fn = prefix_apply
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    tokens = np.zeros((2, 5), np.int32)
    for i, q in enumerate(prompts):
        tokens[i, 5 - len(q):] = q
    out = generate(p, mcfg, tokens, [5, 2], apply_fn=fn, max_new_tokens=4, eos_id=-1)
    ref_fn = p_apply if which == "prompt" else x_apply
    np.testing.assert_array_equal(out, _greedy_reference(ref_fn, p, mcfg, prompts, 4))


# ------------------------------------------------------------------------------------------
# Prefix tuning
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False])
def test_prefix_equals_a_real_prefill(scan):
    """With the prefix set to the base model's own k/v of text P, prefix tuning over X must
    equal the base model on [P; X] (X at positions n.., since the prefix keys carry RoPE for
    positions 0..n-1)."""
    mcfg, params = _setup(scan=scan)
    pre = apply_prefix_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N)
    ptoks = [5, 9, 11]
    pre = prompt_mod.prefix_from_tokens(pre, mcfg, ptoks, base_apply=models.apply)
    toks = _toks(mcfg)
    got, aux = x_apply(
        pre, mcfg, toks, positions=N + jnp.broadcast_to(jnp.arange(6), (2, 6)))
    assert "cache" not in aux
    full = jnp.concatenate([jnp.broadcast_to(jnp.asarray(ptoks), (2, N)), toks], axis=1)
    np.testing.assert_allclose(got, apply(params, mcfg, full)[0][:, N:], atol=1e-5)
    with pytest.raises(ValueError, match="prefix_apply"):
        models.apply(pre, mcfg, toks)
    with pytest.raises(ValueError, match="no dense equivalent"):
        core.merge(pre)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_counts_and_gradients(projection):
    mcfg, params = _setup()
    pre = apply_prefix_tuning(params, jax.random.PRNGKey(1), num_virtual_tokens=N,
                              projection=projection, projection_hidden=16)
    trainable, frozen = core.partition(pre, core.trainable_mask(pre, train_patterns=()))
    want = prefix_param_count(mcfg, N, projection, hidden=16)
    L, kv = mcfg.num_layers, mcfg.kv_size
    if not projection:
        assert want == N * L * 2 * kv
    else:
        assert want == N * kv + kv * 16 + 16 + 16 * 2 * L * kv + 2 * L * kv
    assert core.count(trainable) == want
    _, k, v = split_prefix(pre)
    assert k.shape == v.shape == (L, N, kv)
    core.axes_like(pre, models.param_axes(mcfg))  # the trainer's sharding sees every field
    toks = _toks(mcfg)

    def loss(t):
        logits, _ = prefix_apply(core.combine(t, frozen), mcfg, toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    g = jax.jit(jax.grad(loss))(trainable)
    w = g["layers"]["attn"]["k_proj"]["kernel"]
    for name in w.trainable_fields():
        assert float(jnp.abs(getattr(w, name)).max()) > 0, name


# ------------------------------------------------------------------------------------------
# Training through the loop
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,lr", [("prompt_sft", 0.3), ("prefix_sft", 0.1)])
def test_training_lowers_loss_and_changes_only_the_prompt(tmp_path, config, lr):
    """Fits one fixed batch; the base is a random model with larger weights (init_std 0.2) so
    that a few virtual tokens have leverage over its outputs (a 0.02-std random model ignores
    them almost entirely)."""
    import importlib
    import itertools
    c = tiny_config(steps=6)
    c.model.init_std = 0.2
    c.peft = importlib.import_module(f"configs.{config}").get_config(
        "num_virtual_tokens=4").peft
    c.optimizer.learning_rate = lr
    mcfg = model_cfg_of(c)
    m = get_method(c.peft, apply_fn=models.apply)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                            transform=m.transform, train_patterns=m.train_patterns),
                     sft_loss(mcfg, 0.0, m.apply_fn), itertools.repeat(next(_loader(c))))
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.1
    init = m.transform(models.init(mcfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(c.seed + 1))
    mask = jax.tree.leaves(core.trainable_mask(init, m.train_patterns))
    assert any(mask)
    for t, i, trains in zip(jax.tree.leaves(res.params), jax.tree.leaves(init), mask):
        if trains:
            assert float(jnp.abs(t - i).max()) > 0
        else:
            np.testing.assert_array_equal(t, i)
