"""Half Fine-Tuning: half of every block's matrices move in a round, the half is re-drawn each
round from the seed (same seed, same draw) without recompiling, the rest always trains."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ftjax import models
from ftjax.peft import get_method, hft
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_param_groups import _leaf_paths, _tiny, direct_steps
from tests.test_train import _loader, model_cfg_of, tiny_config

L = 4


def _tables(params, step, **kw):
    sel = hft.selection(params, jnp.int32(step), **kw)
    return sel.names, [np.asarray(t) for t in sel.tables]


def test_selection_halves_every_category_per_layer():
    _, params = _tiny(num_layers=L)
    names, tabs = _tables(params, 0)
    assert names == [["k_proj", "o_proj", "q_proj", "v_proj"],
                     ["down_proj", "gate_proj", "up_proj"], ["attn_norm", "mlp_norm"]]
    for step in range(4):
        attn, mlp, norm = _tables(params, step, steps_per_round=1)[1]
        assert (attn.sum(1) == 2).all() and (norm.sum(1) == 1).all()
        assert set(mlp.sum(1)) <= {1, 2} and mlp.sum() == L * 3 // 2  # balanced across layers
    for gran in ("layer", "model"):
        _, tabs = _tables(params, 0, granularity=gran)
        joint = np.concatenate(tabs, axis=1)  # [L, 9 units]
        assert joint.sum() == L * 9 // 2
        if gran == "layer":
            assert set(joint.sum(1)) <= {4, 5}


def test_draw_is_a_function_of_round_and_seed():
    _, params = _tiny(num_layers=L)
    draw = lambda step, **kw: np.concatenate(_tables(params, step, steps_per_round=3, **kw)[1], 1)
    np.testing.assert_array_equal(draw(0), draw(2))          # same round
    np.testing.assert_array_equal(draw(4), draw(4))          # deterministic
    assert not np.array_equal(draw(0), draw(3))              # the next round differs
    assert not np.array_equal(draw(0, seed=1), draw(0))      # another seed differs
    assert len({draw(3 * r).tobytes() for r in range(6)}) > 3
    one_round = lambda step: np.concatenate(_tables(params, step)[1], 1)  # steps_per_round=0
    np.testing.assert_array_equal(one_round(0), one_round(1000))


def test_exactly_the_drawn_half_moves_each_round():
    mcfg, params = _tiny(num_layers=L)
    kw = dict(seed=3, steps_per_round=1)
    tx = hft.hft_optimizer(optax.adamw(1e-2, weight_decay=0.1), **kw)
    trees, losses, state, step_fn = direct_steps(mcfg, params, tx, 2)
    if hasattr(step_fn, "_cache_size"):
        assert step_fn._cache_size() == 1  # the round changed without recompiling
    assert int(state.opt_state.count) == 2
    draws = []
    for t in range(2):
        before, after = _leaf_paths(trees[t]), _leaf_paths(trees[t + 1])
        names, tables = _tables(params, t, **kw)
        plan = hft.selection(params, jnp.int32(t), **kw).plan
        for p, x in before.items():
            if p in plan:
                c, u = plan[p]
                moved = [not np.array_equal(after[p][l], x[l]) for l in range(L)]
                assert moved == list(tables[c][:, u]), (t, p)
            else:  # embeddings, lm_head and the final norm train in every round
                assert not np.array_equal(after[p], x), p
        draws.append(np.concatenate(tables, 1))
        assert sum(t_.sum() for t_ in tables) == L * 9 // 2
    assert not np.array_equal(draws[0], draws[1])


def test_method_config_and_loop(tmp_path):
    from ftjax.config_utils import load_config
    cfg = load_config("configs/hft_sft.py:rounds=3,steps=30")
    method = get_method(cfg.peft)
    assert method.name == "hft" and method.wrap_optimizer is not None
    assert cfg.peft.steps_per_round == 10
    c = tiny_config(steps=6)
    c.optimizer.learning_rate = 1e-2
    pcfg = ml_collections.ConfigDict(dict(method="hft", steps_per_round=2, seed=1))
    method = get_method(pcfg)
    mcfg = model_cfg_of(c)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                            train_patterns=method.train_patterns,
                            wrap_optimizer=method.wrap_optimizer),
                     sft_loss(mcfg), _loader(c))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert int(jax.device_get(res.state.opt_state.count)) == 6


def test_bad_settings_fail_early():
    _, params = _tiny()
    with pytest.raises(ValueError, match="granularity"):
        hft.hft_optimizer(optax.sgd(1.0), granularity="block")
    with pytest.raises(ValueError, match="ratio"):
        hft.hft_optimizer(optax.sgd(1.0), ratio=0.0)
    with pytest.raises(ValueError, match="no param path matches"):
        hft.hft_optimizer(optax.sgd(1.0), categories=(r"blocks/(.*)",)).init(params)


def test_loop_refuses_to_drop_the_optimizer_hook(tmp_path):
    """A trainer that forgets `wrap_optimizer` would silently run full fine-tuning."""
    c = tiny_config(steps=4)
    c.peft = ml_collections.ConfigDict(dict(method="hft", steps_per_round=1))
    mcfg = model_cfg_of(c)
    with pytest.raises(ValueError, match="wrap_optimizer"):
        loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                          init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                   sft_loss(mcfg), _loader(c))
