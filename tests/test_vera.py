"""VeRA, the worked example of docs/writing_a_transform.md: identity at init, merged equals
unmerged, L * sum(r + out) trainable params, shared random matrices, training under scan and
unrolled, and the doc quoting the real code."""
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ftjax import models
from ftjax.peft import core, get_method
from ftjax.peft.vera import VeRAWeight, apply_vera, shared_matrices
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_param_groups import _tiny, direct_steps
from tests.test_train import _loader, model_cfg_of, random_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
apply = jax.jit(models.apply, static_argnums=1)
R = 4


def _toks(mcfg):
    return jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, mcfg.vocab_size)


def test_identity_at_init_and_merge_equals_unmerged():
    mcfg, params = _tiny()
    vera = apply_vera(params, rank=R)
    np.testing.assert_array_equal(apply(vera, mcfg, _toks(mcfg))[0],
                                  apply(params, mcfg, _toks(mcfg))[0])
    k = iter(jax.random.split(jax.random.PRNGKey(5), 64))
    bumped = core.map_weights(  # random d and b, so the update is not zero
        lambda _, w: w.replace(d=jax.random.normal(next(k), w.d.shape),
                               b=0.5 * jax.random.normal(next(k), w.b.shape))
        if isinstance(w, VeRAWeight) else w, vera)
    out = apply(bumped, mcfg, _toks(mcfg))[0]
    assert float(jnp.abs(out - apply(params, mcfg, _toks(mcfg))[0]).max()) > 1e-2
    np.testing.assert_allclose(apply(core.merge(bumped), mcfg, _toks(mcfg))[0], out, atol=1e-4)
    unrolled = dataclasses.replace(mcfg, scan_layers=False)
    np.testing.assert_allclose(apply(bumped, unrolled, _toks(mcfg))[0], out, atol=1e-5)


def test_trainable_count_axes_and_shared_matrices():
    mcfg, params = _tiny()
    vera = apply_vera(params, rank=R)
    trainable, frozen = core.partition(vera, core.trainable_mask(vera, train_patterns=()))
    d, i = mcfg.hidden_size, mcfg.intermediate_size
    outs = [mcfg.q_size, mcfg.kv_size, mcfg.kv_size, d, i, i, d]  # q k v o gate up down
    assert core.count(trainable) == mcfg.num_layers * sum(R + o for o in outs)
    assert core.count(frozen) == core.count(params)  # A and B are not stored
    axes = core.axes_like(vera, models.param_axes(mcfg))["layers"]["mlp"]["up_proj"]["kernel"]
    assert axes.d == ("layers", "lora_rank") and axes.b == ("layers", "mlp")
    a1, b1 = shared_matrices(0, 32, R, 16)
    a2, b2 = shared_matrices(0, 32, R, 64)
    np.testing.assert_array_equal(a1, a2)  # A depends on (seed, in, r) only
    assert not np.array_equal(shared_matrices(1, 32, R, 16)[0], a1)
    assert float(jnp.abs(a1).max()) <= 1 / np.sqrt(32) and float(jnp.abs(b1).max()) <= 0.5


def test_trains_only_d_and_b_in_the_loop(tmp_path):
    """The real loop (scanned layers, 8-device mesh) on one repeated batch: the loss falls;
    only d and b move."""
    c = tiny_config(steps=8)
    c.optimizer.learning_rate = 0.1  # a random-init model and r=4 need a push to move quickly
    c.peft = ml_collections.ConfigDict(dict(method="vera", rank=R, d_init=1.0, seed=0))
    method = get_method(c.peft)
    mcfg = model_cfg_of(c)
    batch = next(_loader(c))
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                            transform=method.transform, train_patterns=method.train_patterns),
                     sft_loss(mcfg), iter([batch] * 8))
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.05 and np.all(np.diff(losses[2:]) < 0), losses
    q = res.params["layers"]["attn"]["q_proj"]["kernel"]
    base = models.init(mcfg, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(q.base, base["layers"]["attn"]["q_proj"]["kernel"])
    assert float(jnp.abs(q.b).max()) > 0 and not np.allclose(q.d, 1.0)
    np.testing.assert_array_equal(res.params["lm_head"]["kernel"], base["lm_head"]["kernel"])
    np.testing.assert_array_equal(res.params["embed"]["embedding"], base["embed"]["embedding"])


def test_trains_unrolled():
    mcfg, params = _tiny(scan_layers=False)
    vera = apply_vera(params, rank=R, d_init=1.0)
    mask = core.trainable_mask(vera, train_patterns=())
    _, losses, _, _ = direct_steps(mcfg, vera, optax.adam(0.1), 6, mask=mask,
                                   batch_fn=lambda i: random_batch(0))
    assert losses[-1] < losses[0] - 0.05 and np.all(np.diff(losses) < 0), losses


def test_doc_quotes_the_real_code():
    """Every ```python block of the doc that starts with "# ftjax/peft/vera.py" (or another
    file) is a verbatim excerpt of that file."""
    doc = open(os.path.join(ROOT, "docs", "writing_a_transform.md")).read()
    blocks = re.findall(r"```python\n# (\S+\.py)\n(.*?)```", doc, re.S)
    assert len(blocks) >= 5
    for path, body in blocks:
        src = open(os.path.join(ROOT, path)).read()
        assert body in src, f"docs/writing_a_transform.md quotes {path} out of date:\n{body}"


def test_doc_config_sketch_runs():
    doc = open(os.path.join(ROOT, "docs", "writing_a_transform.md")).read()
    (body,) = re.findall(r"```python\n# configs/vera_sft.py \(a sketch\)\n(.*?)```", doc, re.S)
    ns = {}
    exec(compile(body, "vera_sft_sketch", "exec"), ns)
    cfg = ns["get_config"]("rank=8")
    method = get_method(cfg.peft)
    assert method.name == "vera" and cfg.peft.rank == 8
    shapes = jax.eval_shape(method.transform, models.param_shapes(model_cfg_of(cfg)),
                            jax.random.PRNGKey(0))
    assert isinstance(shapes["layers"]["mlp"]["down_proj"]["kernel"], VeRAWeight)
