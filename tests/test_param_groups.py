"""Param groups: frozen groups do not move and keep no optimizer state, multipliers scale the
learning rate exactly, layer ranges train only their slices, LoRA+ moves B faster."""
import functools

import jax
import ml_collections
import numpy as np
import optax
import pytest

from ftjax import models
from ftjax.peft import core
from ftjax.peft.lora import apply_lora
from ftjax.train import loop, optim, param_groups
from ftjax.train.run import Run
from ftjax.train.state import create_state
from ftjax.train.step import make_train_step, sft_loss
from tests.test_train import _loader, model_cfg_of, random_batch, tiny_config


def direct_steps(mcfg, params, tx, n, mask=None, batch_fn=random_batch):
    """n jitted steps of the real train step on batches batch_fn(0..n-1), without a mesh.

    Returns (list of full param trees: initial, after step 1, ..., losses, final state).
    """
    trainable, frozen = core.partition(params, mask) if mask is not None else (params, None)
    state = create_state(trainable, tx, 0, frozen)
    step = jax.jit(make_train_step(sft_loss(mcfg), tx))
    trees, losses = [jax.device_get(state.full_params())], []
    for i in range(n):
        state, m = step(state, batch_fn(i))
        trees.append(jax.device_get(state.full_params()))
        losses.append(float(m["loss"]))
    return trees, losses, state, step


def _tiny(**model_kw):
    c = tiny_config()
    c.model.update(model_kw)
    mcfg = model_cfg_of(c)
    return mcfg, models.init(mcfg, jax.random.PRNGKey(0))


def _leaf_paths(tree):
    return {core.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parse_validates_specs():
    g = param_groups.parse([("a/.*", None), ("b", 2), ("c", dict(lr=0.5, layers=(-2, None)))])
    assert [x.lr for x in g] == [None, 2.0, 0.5] and g[2].layers == (-2, None)
    for bad in [("a",), ("a", "fast"), ("a", -1.0), ("a", dict(lr=1, layerz=(0, 1))),
                ("a", dict(layers=(0,))), ("(", 1.0)]:
        with pytest.raises(ValueError):
            param_groups.parse([bad])


def test_multipliers_scale_sgd_updates_exactly():
    """SGD without momentum: each group's update is the plain update times its multiplier."""
    k = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    params = {"layers": {"attn": {"w": jax.random.normal(next(k), (3, 4, 4))},
                         "norm": {"scale": jax.random.normal(next(k), (3, 4))}},
              "head": {"kernel": jax.random.normal(next(k), (4, 5))}}
    grads = jax.tree.map(lambda x: jax.random.normal(next(k), x.shape), params)
    cfg = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, schedule="constant",
                                         momentum=0.0, grad_clip_norm=0.0))
    base_tx, _ = optim.make_optimizer(cfg, 10)
    cfg.param_groups = ((r"layers/attn/.*", dict(layers=(1, None), lr=2.0)),
                        (r".*norm/.*", 3.0), (r"head/.*", 0.5))
    tx, _ = optim.make_optimizer(cfg, 10)
    base = base_tx.update(grads, base_tx.init(params), params)[0]
    got = tx.update(grads, tx.init(params), params)[0]
    w, wb = got["layers"]["attn"]["w"], base["layers"]["attn"]["w"]
    np.testing.assert_array_equal(w[0], 0.0)  # layer 0 outside the range
    np.testing.assert_allclose(w[1:], 2.0 * wb[1:], rtol=1e-6)
    np.testing.assert_allclose(got["layers"]["norm"]["scale"],
                               3.0 * base["layers"]["norm"]["scale"], rtol=1e-6)
    np.testing.assert_allclose(got["head"]["kernel"], 0.5 * base["head"]["kernel"], rtol=1e-6)


def test_frozen_groups_do_not_move_and_have_no_state():
    mcfg, params = _tiny()
    groups = ((r"embed/.*", None), (r"lm_head/.*", None))
    tx = param_groups.with_groups(optax.adamw(1e-2, weight_decay=0.1), groups)
    trees, losses, state, _ = direct_steps(mcfg, params, tx, 2)
    before, after = _leaf_paths(trees[0]), _leaf_paths(trees[-1])
    for p in before:
        moved = not np.array_equal(before[p], after[p])
        assert moved == (not p.startswith(("embed/", "lm_head/"))), p
    frozen_n = params["embed"]["embedding"].size + params["lm_head"]["kernel"].size
    # Adam keeps mu and nu for the trained leaves only (plus step counters).
    assert core.count(state.opt_state) < 2 * (core.count(params) - frozen_n) + 10
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state)}
    assert (mcfg.vocab_size, mcfg.hidden_size) not in shapes
    assert (mcfg.hidden_size, mcfg.vocab_size) not in shapes


def test_freeze_moves_frozen_groups_out_and_rejects_unmatched_patterns():
    mcfg, _ = _tiny()
    shapes = models.param_shapes(mcfg)
    mask = core.trainable_mask(shapes, (".*",))
    out = _leaf_paths(param_groups.freeze(mask, ((r"lm_head/.*", 1.0), (r".*", None))))
    assert [p for p, m in out.items() if m] == ["lm_head/kernel"]
    with pytest.raises(ValueError, match="match no param"):
        param_groups.freeze(mask, ((r"head/.*", None),))  # lm_head needs the prefix
    with pytest.raises(ValueError, match="not a stacked layer leaf"):
        param_groups.with_groups(optax.sgd(1.0), ((r"embed/.*", dict(layers=(0, 1))),)).init(
            shapes)
    desc = param_groups.describe(shapes, param_groups.last_layers(1) + ((r"embed/.*", None),))
    assert desc["embed/embedding"] == "frozen"
    assert desc["layers/attn/q_proj/kernel"] == "lr x 1, layers -1:"
    assert desc["lm_head/kernel"] == "lr x 1"


def test_last_layers_through_the_loop(tmp_path):
    """Only the last layer's slices (and the head) change; frozen embeddings leave the state."""
    c = tiny_config(steps=3)
    c.optimizer.weight_decay = 0.1  # decay must not move frozen slices either
    c.optimizer.param_groups = ((r"embed/.*", None),) + param_groups.last_layers(1)
    mcfg = model_cfg_of(c)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                     sft_loss(mcfg), _loader(c))
    assert all(np.isfinite(h["loss"]) for h in res.history)
    assert res.state.params["embed"]["embedding"] is None  # in the frozen partition
    before = _leaf_paths(models.init(mcfg, jax.random.PRNGKey(0)))
    after = _leaf_paths(jax.device_get(res.params))
    for p, x in before.items():
        if p.startswith("layers/"):
            np.testing.assert_array_equal(after[p][0], x[0], err_msg=p)
            assert not np.array_equal(after[p][1], x[1]), p
        elif p.startswith("embed/"):
            np.testing.assert_array_equal(after[p], x)
        else:
            assert not np.array_equal(after[p], x), p


def test_loraplus_moves_b_faster():
    mcfg, params = _tiny()
    lora = apply_lora(params, jax.random.PRNGKey(1), rank=4, alpha=8.0)
    mask = core.trainable_mask(lora, train_patterns=())
    moves = {}
    for ratio in (1.0, 16.0):
        tx = param_groups.with_groups(optax.adam(1e-3), param_groups.loraplus(ratio))
        trees, _, _, _ = direct_steps(mcfg, lora, tx, 3, mask=mask)
        q0 = trees[0]["layers"]["attn"]["q_proj"]["kernel"]
        q1 = trees[-1]["layers"]["attn"]["q_proj"]["kernel"]
        moves[ratio] = {f: float(np.abs(getattr(q1, f) - getattr(q0, f)).mean()) for f in "ab"}
    assert moves[16.0]["b"] > 8 * moves[1.0]["b"]
    assert moves[16.0]["b"] / moves[16.0]["a"] > 8 * moves[1.0]["b"] / moves[1.0]["a"]


@pytest.mark.parametrize("part", ["head", "norms", "last", "loraplus"])
def test_partial_sft_configs(part):
    from ftjax.config_utils import load_config
    from ftjax.peft import get_method
    cfg = load_config(f"configs/partial_sft.py:part={part}")
    mcfg = model_cfg_of(cfg)
    method = get_method(cfg.peft)
    shapes = models.param_shapes(mcfg)
    if method.transform is not None:
        shapes = jax.eval_shape(functools.partial(method.transform, key=jax.random.PRNGKey(0)),
                                shapes)
    mask = param_groups.freeze(core.trainable_mask(shapes, method.train_patterns),
                               cfg.optimizer.param_groups)
    trained = [p for p, m in _leaf_paths(mask).items() if m]
    if part == "head":
        assert trained == ["lm_head/kernel"]
    elif part == "norms":
        assert trained and all("norm/" in p for p in trained)
    elif part == "last":
        assert "embed/embedding" not in trained and "lm_head/kernel" in trained
        desc = param_groups.describe(shapes, cfg.optimizer.param_groups)
        assert desc["layers/mlp/up_proj/kernel"].endswith("layers -2:")
    else:
        assert trained and all(p.endswith(("/a", "/b")) for p in trained)
        assert param_groups.describe(shapes, cfg.optimizer.param_groups)[
            "layers/attn/q_proj/kernel/b"] == "lr x 16"
