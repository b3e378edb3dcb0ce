"""Memory experts (ftjax/peft/memory.py): identity at init, exactly k experts per token, parity
with a naive per-token loop, gradients only into the chosen experts and the chosen layers,
scan == unrolled, 8 devices == 1, no merge, and fact recall that rises when trained."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ftjax import data as ftdata
from ftjax import main as ftmain
from ftjax import models
from ftjax.peft import core, get_method
from ftjax.peft.memory import MemoryExpertsWeight, apply_memory, memory_param_count
from ftjax.train import loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _loader, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
apply = jax.jit(models.apply, static_argnums=1)
M, K, R = 16, 3, 2
TINY3 = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64)


def _model(**kw):
    from ftjax.train.run import model_config
    mcfg = model_config(common.model("llama", **{**TINY3, **kw}))
    return mcfg, models.init(mcfg, jax.random.PRNGKey(0))


def _toks(mcfg, b=2, t=8):
    return jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, mcfg.vocab_size)


def _randomise(params, seed=5):
    """Random b (and null logits), so the memory path contributes."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))

    def one(_, w):
        if not isinstance(w, MemoryExpertsWeight):
            return w
        on = w.active.reshape(w.active.shape + (1, 1, 1))
        return w.replace(b=0.3 * jax.random.normal(next(keys), w.b.shape) * on,
                         null_logit=None if w.null_logit is None
                         else jax.random.normal(next(keys), w.null_logit.shape))
    return core.map_weights(one, params)


def _layer(w: MemoryExpertsWeight, i: int) -> MemoryExpertsWeight:
    return jax.tree.map(lambda x: x[i], w)


def _naive(w: MemoryExpertsWeight, x: np.ndarray) -> np.ndarray:
    """x W + s * sum over the top-k experts of g (x A_m) B_m, one token at a time."""
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    base, a, b = (np.asarray(v, np.float64) for v in (w.base, w.a, w.b))
    router = np.asarray(w.router, np.float64)
    out = x2 @ base
    if float(w.active) == 0:
        return out.reshape(x.shape[:-1] + (-1,))
    for n, tok in enumerate(x2):
        scores = tok @ router
        chosen = np.argsort(-scores)[:w.top_k]
        logits = list(scores[chosen]) + ([] if w.null_logit is None else [float(w.null_logit)])
        g = np.exp(np.array(logits) - max(logits))
        g = g / g.sum()
        for j, m in enumerate(chosen):
            out[n] += w.scale * g[j] * (tok @ a[m]) @ b[m]
    return out.reshape(x.shape[:-1] + (-1,))


def test_identity_at_init_and_layer_mask():
    mcfg, params = _model()
    mem = apply_memory(params, jax.random.PRNGKey(1), num_experts=M, top_k=K, rank=R,
                       layers=(0, -1))
    np.testing.assert_array_equal(apply(mem, mcfg, _toks(mcfg))[0],
                                  apply(params, mcfg, _toks(mcfg))[0])
    w = mem["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(w.active, [1.0, 0.0, 1.0])
    assert w.a.shape == (3, M, mcfg.intermediate_size, R)
    assert w.b.shape == (3, M, R, mcfg.hidden_size)
    assert w.router.shape == (3, mcfg.intermediate_size, M)
    # The unchosen layer holds an all-zero bank; chosen layers a non-zero A and router.
    for field in (w.a, w.b, w.router):
        assert not np.any(np.asarray(field[1]))
    assert np.all(np.abs(np.asarray(w.a[0])).sum(axis=(-1, -2)) > 0)
    axes = core.axes_like(mem, models.param_axes(mcfg))["layers"]["mlp"]["down_proj"]["kernel"]
    assert axes.a == ("layers", "expert", "mlp", "lora_rank")
    assert axes.b == ("layers", "expert", "lora_rank", "embed")
    assert axes.router == ("layers", "mlp", "expert")
    assert axes.active == ("layers",) and axes.null_logit == ("layers",)


def test_only_bank_and_router_train():
    mcfg, params = _model()
    mem = apply_memory(params, jax.random.PRNGKey(1), num_experts=M, top_k=K, rank=R)
    mask = core.trainable_mask(mem, train_patterns=())
    w = mask["layers"]["mlp"]["down_proj"]["kernel"]
    assert w.a and w.b and w.router and w.null_logit
    assert not w.base and not w.active
    plain = [m for m in jax.tree.leaves(core.map_weights(
        lambda _, x: False if isinstance(x, MemoryExpertsWeight) else x, mask))]
    assert not any(plain)  # every other leaf (embeddings, norms, attention, head) is frozen
    trainable, frozen = core.partition(mem, mask)
    n_in, n_out = mcfg.intermediate_size, mcfg.hidden_size
    assert core.count(trainable) == mcfg.num_layers * memory_param_count(
        n_in, n_out, M, R, null_expert=True)
    assert core.count(frozen) == core.count(params) + mcfg.num_layers  # + the active flags


@pytest.mark.parametrize("null_expert", [True, False])
def test_exactly_k_experts_and_naive_parity(null_expert):
    mcfg, params = _model()
    mem = _randomise(apply_memory(params, jax.random.PRNGKey(1), num_experts=M, top_k=K,
                                  rank=R, null_expert=null_expert))
    w = _layer(mem["layers"]["mlp"]["down_proj"]["kernel"], 1)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, mcfg.intermediate_size))
    ids, gates = w.route(x)
    assert ids.shape == (2, 5, K) and gates.shape == (2, 5, K)
    flat = np.asarray(ids).reshape(-1, K)
    assert all(len(set(row)) == K for row in flat)  # k distinct experts per token
    scores = np.asarray(x.reshape(-1, x.shape[-1]) @ w.router)
    for row, s in zip(flat, scores):
        assert set(row) == set(np.argsort(-s)[:K])  # ... and they are the k best scores
    total = np.asarray(gates).sum(-1)
    if null_expert:
        assert np.all(total < 1.0) and np.all(total > 0.0)  # the rest went to "no memory"
    else:
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    np.testing.assert_allclose(core.linear(x, w), _naive(w, np.asarray(x)), rtol=1e-4,
                               atol=1e-5)
    off = w.replace(active=jnp.asarray(0.0))
    np.testing.assert_allclose(core.linear(x, off), np.asarray(x) @ np.asarray(w.base),
                               rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_selected_experts_and_chosen_layers():
    mcfg, params = _model()
    mem = _randomise(apply_memory(params, jax.random.PRNGKey(1), num_experts=M, top_k=K,
                                  rank=R, layers=(1,)))
    w = mem["layers"]["mlp"]["down_proj"]["kernel"]
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 2, mcfg.intermediate_size))  # 2 tokens
    ct = jax.random.normal(jax.random.PRNGKey(4), (1, 2, mcfg.hidden_size))

    def loss(v, layer):
        return jnp.sum(core.linear(x, _layer(v, layer)) * ct)
    g = jax.tree.map(np.asarray, jax.jit(jax.grad(loss), static_argnums=1)(w, 1))
    chosen = set(np.asarray(_layer(w, 1).route(x)[0]).ravel().tolist())
    assert 0 < len(chosen) <= 2 * K
    per_expert = np.stack([np.abs(g.a[1]).sum(axis=(1, 2)), np.abs(g.b[1]).sum(axis=(1, 2)),
                           np.abs(g.router[1]).sum(axis=0)], axis=1)  # [M, 3]
    for m in range(M):
        if m in chosen:
            assert per_expert[m].min() > 0, (m, per_expert[m])
        else:
            assert per_expert[m].max() == 0.0, (m, per_expert[m])
    assert abs(g.null_logit[1]) > 0
    for f in (g.a, g.b, g.router, g.null_logit):  # the slices of layers 0 and 2: nothing
        assert not np.any(f[0]) and not np.any(f[2])
    assert not np.any(np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(w, 0).a))

    # Through the whole scanned model, too.
    def model_loss(v):
        p = dict(mem, layers=dict(mem["layers"], mlp=dict(
            mem["layers"]["mlp"], down_proj={"kernel": v})))
        return jnp.sum(models.apply(p, mcfg, _toks(mcfg))[0] ** 2)
    gm = jax.jit(jax.grad(model_loss))(w)
    assert float(jnp.abs(gm.b[1]).sum()) > 0
    assert not np.any(np.asarray(gm.b[0])) and not np.any(np.asarray(gm.b[2]))


def test_scan_equals_unrolled():
    mcfg, params = _model()
    mem = _randomise(apply_memory(params, jax.random.PRNGKey(1), num_experts=M, top_k=K,
                                  rank=R, layers=(0, 2)))
    out = apply(mem, mcfg, _toks(mcfg))[0]
    assert float(jnp.abs(out - apply(params, mcfg, _toks(mcfg))[0]).max()) > 1e-3
    unrolled = dataclasses.replace(mcfg, scan_layers=False)
    np.testing.assert_allclose(apply(mem, unrolled, _toks(mcfg))[0], out, rtol=1e-5, atol=1e-5)


def test_merge_and_bad_settings_fail_clearly():
    mcfg, params = _model()
    mem = apply_memory(params, jax.random.PRNGKey(1), num_experts=M, top_k=K, rank=R)
    with pytest.raises(ValueError, match="cannot be merged"):
        core.merge(mem)
    assert mem["layers"]["mlp"]["down_proj"]["kernel"].shape == (3, 64, 32)
    with pytest.raises(ValueError, match="out of range"):
        apply_memory(params, jax.random.PRNGKey(1), num_experts=M, layers=(3,))
    with pytest.raises(ValueError, match="top_k"):
        apply_memory(params, jax.random.PRNGKey(1), num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="match no weight"):
        apply_memory(params, jax.random.PRNGKey(1), targets=("layers/mlp/nope/kernel",))
    with pytest.raises(ValueError, match="not a dense kernel"):
        apply_memory(params, jax.random.PRNGKey(1), targets=("embed/embedding",))
    with pytest.raises(ValueError, match="not stacked"):
        apply_memory(params, jax.random.PRNGKey(1), targets=("lm_head/kernel",), layers=(0,))


def _train_tiny(tmp_path, devices, mesh, rules="fsdp", layers=(), steps=3):
    c = tiny_config(steps=steps)
    c.mesh = ml_collections.ConfigDict(mesh)
    c.sharding.rules = rules
    c.peft = ml_collections.ConfigDict(dict(method="memory", num_experts=8, top_k=2, rank=2,
                                            layers=layers))
    from ftjax.train.run import model_config
    mcfg = model_config(c.model)
    m = get_method(c.peft)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                            transform=m.transform, train_patterns=m.train_patterns,
                            devices=devices),
                     sft_loss(mcfg), _loader(c))
    return res


def test_trains_in_the_loop_and_unchosen_layers_stay_zero(tmp_path):
    res = _train_tiny(tmp_path, jax.devices()[:1], {"data": 1}, layers=(1,), steps=12)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    w = res.params["layers"]["mlp"]["down_proj"]["kernel"]
    assert float(jnp.abs(w.b[1]).sum()) > 0  # the chosen layer learned
    for f in (w.a, w.b, w.router, w.null_logit):
        assert not np.any(np.asarray(f[0]))  # layer 0 (not chosen): still exactly zero


@pytest.mark.slow
@pytest.mark.parametrize("rules,mesh", [("fsdp", {"data": 2, "fsdp": 4}),
                                        ("ep", {"data": 2, "fsdp": 2, "expert": 2})])
def test_sharded_equals_single_device(tmp_path, rules, mesh):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    one = _train_tiny(tmp_path / "one", jax.devices()[:1], {"data": 1})
    eight = _train_tiny(tmp_path / "eight", None, mesh, rules=rules)
    if rules == "ep":  # the bank really is split over the expert axis
        sh = eight.state.params["layers"]["mlp"]["down_proj"]["kernel"].a.sharding
        assert sh.spec[1] == "expert"
    np.testing.assert_allclose([h["loss"] for h in eight.history],
                               [h["loss"] for h in one.history], rtol=1e-5)


QS_BASE = os.path.join(ROOT, "experiments", "quickstart_base", "model.safetensors")


@pytest.mark.slow
def test_short_training_learns_unseen_facts(tmp_path):
    """Facts the base never saw (0% recall) are recalled after a short memory-tuning run."""
    from configs import quickstart as qs
    from ftjax.eval.harness import exact_match_eval
    from ftjax.io.params_file import load_params
    from ftjax.train.run import model_config
    facts = [f for f in ftdata.fact_examples()
             if ftdata.split_of("lookup", f["prompt"], 0.2) == "test"][:16]
    c = tiny_config(steps=80, batch=16, seq=48)
    c.model = qs.base_model()
    c.optimizer = common.optimizer("adamw", learning_rate=1e-2, warmup_steps=5)
    c.mesh = ml_collections.ConfigDict({"data": 1})
    c.peft = ml_collections.ConfigDict(dict(method="memory", num_experts=64, top_k=2, rank=4,
                                            layers=(2, 3)))
    mcfg = model_config(c.model)
    _, base = load_params(QS_BASE, expected_cfg=mcfg)
    tok = ftdata.CharTokenizer()
    score = lambda p: exact_match_eval(p, mcfg, tok, facts, max_new_tokens=12)["exact_match"]
    assert score(base) == 0.0
    m = get_method(c.peft)
    it = ftdata.SyntheticLoader(facts, tok, 16, 48, seed=0)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=loop.host_params(lambda: base), transform=m.transform,
                            train_patterns=m.train_patterns, devices=jax.devices()[:1]),
                     sft_loss(mcfg), it)
    assert score(res.params) >= 0.9


@pytest.mark.slow
def test_config_runs_end_to_end(tmp_path):
    workdir = tmp_path / "mem"
    summary = ftmain.main([
        "--config", os.path.join(ROOT, "configs", "memory_tuning.py") + ":steps=4,num_experts=32",
        "--workdir", str(workdir), "--config.train.progress=false",
        "--config.train.tensorboard=false", "--config.train.eval_every=2",
        "--config.optimizer.warmup_steps=1",
        "--config.data.other_loss_examples=16", "--config.data.other_eval_examples=4",
        "--config.data.other_tasks=add,sort"])
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["recall_after"] == summary["recall_after"]
    before = on_disk["before"]["facts"]
    assert before["n"] == 192 and before["recall_seen"] == 1.0 and before["recall_unseen"] == 0.0
    assert set(on_disk["other_loss_rel_change_per_task"]) == {"add", "sort", "all"}
    assert on_disk["method"] == "memory" and on_disk["steps"] == 4
    assert [e["step"] for e in on_disk["evals"]] == [2, 4]
    with pytest.raises(ValueError, match="no merged"):
        ftmain.main(["--config", os.path.join(ROOT, "configs", "memory_tuning.py"),
                     "--workdir", str(tmp_path / "x"), "--config.export.hf_dir=/tmp/nowhere"])


def test_merged_export_refused_before_training():
    """The run's early export check knows memory experts have no merged form
    (Method.mergeable)."""
    cfg = common.base(trainer="sft")
    cfg.model = common.model("llama", **TINY3)
    cfg.peft = ml_collections.ConfigDict(dict(method="memory"))
    cfg.export = ml_collections.ConfigDict(dict(hf_dir="/tmp/never_written"))
    assert get_method(cfg.peft).mergeable is False
    run = Run.build(cfg, "/tmp/never_written_workdir")
    with pytest.raises(ValueError, match="no merged Hugging Face form"):
        run.check_exportable()
    cfg.export.hf_dir = ""
    run.check_exportable()  # nothing to export: fine
