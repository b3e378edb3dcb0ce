"""The sparse MoE layer: routing, dropless and capacity dispatch against a per-token reference,
losses and metrics, padding, the full model (scan, cache, jitter), sharded training, monitoring."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ftjax import models, monitor
from ftjax.models import moe
from ftjax.train import loop, optim
from ftjax.train.run import Run
from ftjax.train.state import create_state
from ftjax.train.step import jit_train_step, make_eval_step, make_train_step, sft_loss
from tests.test_train import _loader, random_batch

LAYER = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
             num_kv_heads=1, num_experts=8, num_experts_per_tok=2)


def layer_setup(seed=0, b=2, t=12, **kw):
    """(layer-0 moe params, cfg, x [B, T, d]) with a router scaled up so routing is spread."""
    cfg = models.preset("mixtral", **{**LAYER, **kw})
    p = jax.tree.map(lambda a: a[0], models.init(cfg, jax.random.PRNGKey(seed))["layers"]["moe"])
    p["router"]["kernel"] = p["router"]["kernel"] * 50.0
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, t, cfg.hidden_size))
    return p, cfg, x


def np_act(z):
    return z / (1.0 + np.exp(-z))  # silu


def np_route(p, x, cfg):
    """Per-token reference router: (indices [N, k], weights [N, k]) in float64."""
    logits = np.asarray(x, np.float64) @ np.asarray(p["router"]["kernel"], np.float64)
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    top = np.take_along_axis(logits, idx, -1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if cfg.router == "topk_softmax":
        w = np.exp(top - top.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
    else:
        w = np.take_along_axis(probs, idx, -1)
        if cfg.router_renormalize:
            w = w / w.sum(-1, keepdims=True)
    return idx, w


def np_expert(p, e, v, cfg):
    """Expert e's MLP on one token vector v, in float64."""
    g = lambda name: np.asarray(p[name]["kernel"][e], np.float64)
    if cfg.mlp == "gated":
        h = np_act(v @ g("gate_proj")) * (v @ g("up_proj"))
    else:
        h = np_act(v @ g("up_proj"))
    return h @ g("down_proj")


def np_moe(p, x, cfg, keep=None):
    """Dense reference: every token through its chosen (and kept) experts, weighted."""
    xs = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    idx, w = np_route(p, xs, cfg)
    out = np.zeros_like(xs)
    for n in range(xs.shape[0]):
        for j in range(cfg.num_experts_per_tok):
            if keep is None or keep[n, j]:
                out[n] += w[n, j] * np_expert(p, idx[n, j], xs[n], cfg)
    return out.reshape(x.shape)


def np_capacity_keep(idx, valid, cfg, b, t):
    """Which assignments fit: per sequence, first choices before second, in token order."""
    c = moe.capacity(cfg, t)
    k = cfg.num_experts_per_tok
    idx = idx.reshape(b, t, k)
    keep = np.zeros((b, t, k), bool)
    for r in range(b):
        used = np.zeros(cfg.num_experts, int)
        for j in range(k):
            for s in range(t):
                if valid[r, s] and used[idx[r, s, j]] < c:
                    keep[r, s, j] = True
                    used[idx[r, s, j]] += 1
    return keep.reshape(b * t, k)


block = jax.jit(moe.moe_block, static_argnums=3)


# ------------------------------------------------------------------------------------------
# Config and params.

def test_config_validation_and_preset():
    cfg = models.preset("mixtral", "tiny", expert_intermediate_size=512)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) \
        == (8192, 256, 4, 4, 2)
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.expert_width == 512
    assert cfg.router_aux_loss_coef == 0.02 and cfg.rope_theta == 1e6
    with pytest.raises(ValueError) as e:
        models.preset("mixtral", num_experts_per_tok=9, router="hash", moe_dispatch="drop",
                      capacity_factor=0.0, router_jitter=1.5, mlp_bias=True)
    for part in ("num_experts_per_tok=9", "router='hash'", "moe_dispatch='drop'",
                 "capacity_factor=0.0", "router_jitter=1.5", "mlp_bias=True"):
        assert part in str(e.value)
    models.ModelConfig(num_experts=0, num_experts_per_tok=9)  # unused by dense models
    with pytest.raises(ValueError, match="router='top2'"):  # but a misspelt name still fails
        models.ModelConfig(num_experts=0, router="top2")


def test_param_layout_and_axes():
    cfg = models.preset("mixtral", **{**LAYER, "num_layers": 2, "num_shared_experts": 2,
                                      "expert_intermediate_size": 20})
    params = models.init(cfg, jax.random.PRNGKey(0))
    lp, axes = params["layers"], models.param_axes(cfg)["layers"]
    assert "mlp" not in lp and "mlp_norm" in lp
    shapes = {k: lp["moe"][k]["kernel"].shape for k in ("router", "gate_proj", "up_proj",
                                                          "down_proj")}
    assert shapes == {"router": (2, 16, 8), "gate_proj": (2, 8, 16, 20),
                      "up_proj": (2, 8, 16, 20), "down_proj": (2, 8, 20, 16)}
    assert axes["moe"]["router"]["kernel"] == ("layers", "embed", None)
    assert axes["moe"]["up_proj"]["kernel"] == ("layers", "expert", "embed", "mlp")
    assert axes["moe"]["down_proj"]["kernel"] == ("layers", "expert", "mlp", "embed")
    assert lp["moe"]["shared"]["up_proj"]["kernel"].shape == (2, 16, 40)
    assert axes["moe"]["shared"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
    plain = models.param_specs(cfg.replace(mlp="plain", activation="gelu"))["layers"]["moe"]
    assert "gate_proj" not in plain and "gate_proj" not in plain["shared"]


# ------------------------------------------------------------------------------------------
# Routing and dispatch against the per-token reference.

@pytest.mark.parametrize("router,renorm", [("topk_softmax", False), ("softmax_topk", False),
                                           ("softmax_topk", True)])
def test_router_picks_k_distinct_experts(router, renorm):
    p, cfg, x = layer_setup(router=router, router_renormalize=renorm, num_experts_per_tok=3)
    xs = x.reshape(-1, cfg.hidden_size)
    r = moe.route(p["router"]["kernel"], xs, cfg)
    idx = np.asarray(r.indices)
    assert idx.shape == (xs.shape[0], 3)
    assert all(len(set(row)) == 3 for row in idx)  # exactly k distinct experts per token
    ref_idx, ref_w = np_route(p, xs, cfg)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(r.weights, ref_w, rtol=1e-5, atol=1e-6)
    sums = np.asarray(r.weights).sum(-1)
    if router == "topk_softmax" or renorm:
        np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    else:
        assert (sums < 1.0).all()


@pytest.mark.parametrize("router,renorm,mlp,shared", [
    ("topk_softmax", False, "gated", 0), ("softmax_topk", False, "gated", 0),
    ("softmax_topk", True, "gated", 1), ("topk_softmax", False, "plain", 0)])
def test_dropless_equals_per_token_reference(router, renorm, mlp, shared):
    kw = dict(router=router, router_renormalize=renorm, mlp=mlp, num_shared_experts=shared)
    if mlp == "plain":
        kw["activation"] = "silu"
    p, cfg, x = layer_setup(**kw)
    y, stats = block(p, x, jnp.ones(x.shape[:2], bool), cfg)
    ref = np_moe(p, x, cfg)
    if shared:
        from ftjax.models import layers
        ref = ref + np.asarray(layers.mlp(p["shared"], x, cfg), np.float64)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)
    assert float(stats["dropped"]) == 0.0
    idx, _ = np_route(p, x.reshape(-1, cfg.hidden_size), cfg)
    load = np.bincount(idx.reshape(-1), minlength=cfg.num_experts) / idx.size
    np.testing.assert_allclose(stats["load"], load, atol=1e-6)


def test_capacity_with_room_equals_dropless():
    p, cfg, x = layer_setup(b=3, t=10)
    valid = jnp.ones(x.shape[:2], bool)
    ref, ref_stats = block(p, x, valid, cfg)
    big = cfg.replace(moe_dispatch="capacity", capacity_factor=float(cfg.num_experts))
    assert moe.capacity(big, 10) == 10
    out, stats = block(p, x, valid, big)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert float(stats["dropped"]) == 0.0
    for k in ("aux_loss", "z_loss", "load", "entropy"):
        np.testing.assert_allclose(stats[k], ref_stats[k], rtol=1e-6)


def test_capacity_drops_exactly_what_it_reports():
    b, t = 3, 16
    p, cfg, x = layer_setup(b=b, t=t, moe_dispatch="capacity", capacity_factor=0.5)
    # A skewed router (one popular expert) makes drops certain.
    p["router"]["kernel"] = p["router"]["kernel"].at[:, 3].add(2.0 * jnp.sign(x[0, 0]))
    valid = np.ones((b, t), bool)
    valid[1, 11:] = False  # padding takes no capacity
    out, stats = block(p, x, jnp.asarray(valid), cfg)
    idx, _ = np_route(p, x.reshape(b * t, -1), cfg)
    keep = np_capacity_keep(idx, valid, cfg, b, t)
    real = valid.reshape(-1)
    n_dropped = int((~keep[real]).sum())
    assert n_dropped > 0
    np.testing.assert_allclose(float(stats["dropped"]), n_dropped / (real.sum() * 2), rtol=1e-6)
    ref = np_moe(p, x, cfg, keep=keep).reshape(b * t, -1)
    ref[~real] = 0.0  # padding gets no expert output
    np.testing.assert_allclose(out.reshape(b * t, -1), ref, atol=2e-5, rtol=1e-4)
    all_dropped = real & ~keep.any(-1)
    assert all_dropped.any()
    assert np.abs(np.asarray(out).reshape(b * t, -1)[all_dropped]).max() == 0.0


# ------------------------------------------------------------------------------------------
# Losses and metrics.

def test_balance_loss_is_one_at_uniform_routing_and_grows_with_skew():
    p, cfg, x = layer_setup()
    valid = jnp.ones(x.shape[:2], bool)
    zero = dict(p, router={"kernel": jnp.zeros_like(p["router"]["kernel"])})
    _, s = block(zero, x, valid, cfg)
    e = cfg.num_experts
    assert float(s["aux_loss"]) == pytest.approx(1.0, abs=1e-6)
    assert float(s["z_loss"]) == pytest.approx(math.log(e) ** 2, rel=1e-6)  # logsumexp(0) = log E
    assert float(s["entropy"]) == pytest.approx(math.log(e), rel=1e-6)
    _, spread = block(p, x, valid, cfg)
    skewed = dict(p, router={"kernel": p["router"]["kernel"].at[:, 0].add(
        5.0 * jnp.sign(jnp.mean(x.reshape(-1, cfg.hidden_size), 0)))})
    _, sk = block(skewed, x, valid, cfg)
    assert float(sk["aux_loss"]) > float(spread["aux_loss"]) > 1.0
    assert float(sk["load"][0]) > 2.0 / e
    np.testing.assert_allclose(np.asarray(sk["load"]).sum(), 1.0, rtol=1e-6)
    assert float(sk["entropy"]) < float(spread["entropy"]) < math.log(e)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_padding_changes_no_loss_or_metric(dispatch):
    p, cfg, x = layer_setup(b=2, t=10, moe_dispatch=dispatch, capacity_factor=1.0)
    valid = np.ones((2, 10), bool)
    valid[0, 6:] = False
    valid[1, 8:] = False
    junk = jax.random.normal(jax.random.PRNGKey(9), x.shape) * 3.0
    x2 = jnp.where(jnp.asarray(valid)[..., None], x, junk)
    y1, s1 = block(p, x, jnp.asarray(valid), cfg)
    y2, s2 = block(p, x2, jnp.asarray(valid), cfg)
    for k in s1:
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(y1)[valid], np.asarray(y2)[valid], atol=1e-6)
    assert np.abs(np.asarray(y1)[~valid]).max() == 0.0
    # The same real tokens as separate unpadded sequences give the same statistics.
    r1 = moe.route(p["router"]["kernel"], x.reshape(20, -1), cfg)
    real = valid.reshape(-1)
    sub = moe.Routing(*(a[real] for a in r1))
    ref = moe.routing_stats(sub, jnp.ones(int(real.sum())), cfg, jnp.zeros(()))
    for k in ("aux_loss", "z_loss", "load", "entropy"):
        np.testing.assert_allclose(s1[k], ref[k], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# The full model.

MODEL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64, num_experts=4,
             expert_intermediate_size=24)
apply = jax.jit(models.apply, static_argnums=1)


@pytest.mark.parametrize("dispatch,shared", [("dropless", 1), ("capacity", 0)])
def test_model_scan_equals_unrolled_with_stats(dispatch, shared):
    cfg = models.preset("mixtral", **MODEL, moe_dispatch=dispatch, num_shared_experts=shared)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 61)
    seg = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
    a, aux_a = apply(params, cfg, toks, segment_ids=seg)
    b, aux_b = apply(params, cfg.replace(scan_layers=False), toks, segment_ids=seg)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert set(aux_a["moe"]) == {"aux_loss", "z_loss", "load", "dropped", "entropy"}
    assert aux_a["moe"]["load"].shape == (2, 4)
    for k in ("aux_loss", "z_loss", "dropped", "entropy"):
        assert aux_a["moe"][k].shape == (2,)
    for x, y in zip(jax.tree.leaves(aux_a["moe"]), jax.tree.leaves(aux_b["moe"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert "moe" not in apply(models.init(models.preset("llama", **{**MODEL, "num_experts": 0}),
                                          jax.random.PRNGKey(0)),
                              models.preset("llama", **{**MODEL, "num_experts": 0}), toks)[1]


def test_kv_cache_decoding_equals_full_forward():
    cfg = models.preset("mixtral", **MODEL, router="softmax_topk", num_shared_experts=1)
    params = models.init(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, 61)
    full, _ = apply(params, cfg, toks)
    out, aux = apply(params, cfg, toks[:, :4], cache=models.init_cache(cfg, 2, 10))
    outs = [out]
    for t in range(4, 9):
        out, aux = apply(params, cfg, toks[:, t:t + 1], cache=aux["cache"])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    assert aux["moe"]["load"].shape == (2, 4)


def test_router_jitter_only_with_rng():
    cfg = models.preset("mixtral", **MODEL, router_jitter=0.3)
    params = models.init(cfg, jax.random.PRNGKey(0))
    params["layers"]["moe"]["router"]["kernel"] *= 30.0
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 61)
    f = jax.jit(models.apply, static_argnums=1)
    plain, _ = f(params, cfg, toks)
    no_jitter, _ = f(params, cfg.replace(router_jitter=0.0), toks)
    np.testing.assert_array_equal(plain, no_jitter)          # no rng: no noise
    j1, _ = f(params, cfg, toks, rng=jax.random.PRNGKey(1))
    j1b, _ = f(params, cfg, toks, rng=jax.random.PRNGKey(1))
    j2, _ = f(params, cfg, toks, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(j1, j1b)
    assert np.abs(np.asarray(j1 - plain)).max() > 1e-4
    assert np.abs(np.asarray(j1 - j2)).max() > 1e-4
    z, _ = f(params, cfg.replace(router_jitter=0.0), toks, rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(z, plain)                  # rng without jitter: unchanged
    u, _ = f(params, cfg.replace(scan_layers=False), toks, rng=jax.random.PRNGKey(1))
    np.testing.assert_allclose(u, j1, atol=1e-5)             # same noise in both layer paths


# ------------------------------------------------------------------------------------------
# Training: losses in the objective, metrics, sharding.

TRAIN_MODEL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=64, num_experts=4,
                   expert_intermediate_size=32, router_aux_loss_coef=0.02,
                   router_z_loss_coef=1e-3)


def moe_config(steps=4, **model_kw):
    c = common.base("sft")
    c.model = common.model("mixtral", **{**TRAIN_MODEL, **model_kw})
    c.optimizer = common.optimizer("adamw", learning_rate=3e-3, warmup_steps=1)
    c.train = common.train(steps=steps, batch_size=8, seq_len=32, log_every=1, progress=False,
                           tensorboard=False, async_checkpoint=False)
    return c


def test_objective_adds_weighted_router_losses():
    from ftjax.train.run import model_config
    mcfg = model_config(moe_config().model)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    batch = jax.tree.map(jnp.asarray, random_batch(0))
    obj, s = jax.jit(sft_loss(mcfg))(params, batch, None)
    _, aux = models.apply(params, mcfg, batch["inputs"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"])
    n = float(s["tokens"])
    extra = 0.02 * float(jnp.mean(aux["moe"]["aux_loss"])) + 1e-3 * float(
        jnp.mean(aux["moe"]["z_loss"]))
    assert float(obj) / n == pytest.approx(float(s["nll"]) / n + extra, rel=1e-6)
    np.testing.assert_allclose(np.asarray(s["moe_load"]) / n, aux["moe"]["load"], rtol=1e-6)
    # Eval stats are sums: the halves of a batch add up to the whole batch's nll and tokens,
    # and each half's MoE stats are its token count times its own per-layer means.
    ev = jax.jit(make_eval_step(sft_loss(mcfg)))
    whole = ev(params, batch)
    halves = [jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch) for i in range(2)]
    parts = [ev(params, h) for h in halves]
    for key in ("nll", "tokens"):
        np.testing.assert_allclose(parts[0][key] + parts[1][key], whole[key], rtol=1e-5)
    for half, part in zip(halves, parts):
        _, aux_h = models.apply(params, mcfg, half["inputs"], positions=half["positions"],
                                segment_ids=half["segment_ids"])
        for key in ("aux_loss", "load", "entropy"):
            np.testing.assert_allclose(part[f"moe_{key}"] / part["tokens"], aux_h["moe"][key],
                                       rtol=1e-5)


def run_moe_steps(c, batches, devices=None, rules="fsdp", mesh=None):
    """The jitted, sharded MoE step over `batches`: (losses, aux losses, final params)."""
    c = ml_collections.ConfigDict(c.to_dict())
    c.sharding.rules = rules
    if mesh:
        c.mesh.update(mesh)
    from ftjax import sharding
    from ftjax.train.run import model_config
    mcfg = model_config(c.model)
    placement = loop.Placement(c, mcfg, devices=devices)
    tx, sched = optim.make_optimizer(c.optimizer, c.train.steps)
    params = jax.device_put(models.init(mcfg, jax.random.PRNGKey(0)), placement.params)
    abstract = jax.eval_shape(lambda p: create_state(p, tx, 0), params)
    state_sh = sharding.state_shardings(abstract, params, placement.params, placement.mesh)
    state = jax.jit(lambda p: create_state(p, tx, 0), out_shardings=state_sh)(params)
    step = jit_train_step(make_train_step(sft_loss(mcfg), tx, schedule=sched), state_sh,
                          placement.batch)
    losses, aux = [], []
    for b in batches:
        state, m = step(state, placement.put_batch(b))
        losses.append(float(m["loss"]))
        aux.append(np.asarray(m["moe_aux_loss"]))
    return np.array(losses), np.array(aux), jax.device_get(state.params)


@pytest.mark.slow
@pytest.mark.parametrize("rules,mesh,dispatch", [
    ("ep", {"data": 2, "expert": 4}, "dropless"),             # expert blocks (auto on CPU)
    ("ep", {"data": 2, "expert": 4}, "dropless:ragged_dot"),
    ("ep", {"data": 2, "expert": 4}, "capacity"),
    ("fsdp", {"data": 1, "fsdp": 8}, "dropless")])
def test_sharded_moe_training_equals_single_device(rules, mesh, dispatch):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    dispatch, _, impl = dispatch.partition(":")
    c = moe_config(steps=3, moe_dispatch=dispatch, capacity_factor=1.0,
                   moe_grouped_impl=impl or "auto")
    batches = [random_batch(20 + i) for i in range(3)]
    ref, ref_aux, pref = run_moe_steps(c, batches, devices=jax.devices()[:1], mesh={"data": 1})
    out, out_aux, pout = run_moe_steps(c, batches, rules=rules, mesh=mesh)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    np.testing.assert_allclose(out_aux, ref_aux, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pref), jax.tree.leaves(pout)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_ep_rules_shard_experts():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    c = moe_config()
    c.sharding.rules = "ep"
    c.mesh.update({"data": 2, "expert": 4})
    from ftjax.train.run import model_config
    placement = loop.Placement(c, model_config(c.model))
    spec = placement.params["layers"]["moe"]["up_proj"]["kernel"].spec
    assert tuple(spec)[:2] == (None, "expert")
    assert placement.batch.spec[0] == ("data", "fsdp", "expert")


@pytest.mark.slow
def test_training_with_aux_loss_learns_and_logs_routing(tmp_path):
    c = moe_config(steps=14, router_aux_loss_coef=0.1)
    c.optimizer.learning_rate = 1e-2
    c.train.eval_every = 14
    from ftjax.train.run import fixed_batches as eval_batches, model_config
    from ftjax import data as ftdata
    mcfg = model_config(c.model)
    tr, te = ftdata.make_splits("reverse", 100, seed=0)
    res = loop.train(Run.of(c, str(tmp_path), model_cfg=mcfg,
                            init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                     sft_loss(mcfg), _loader(c), eval_batches=eval_batches(te[:16], ftdata.CharTokenizer(), 8, 32))
    first, last = res.history[0], res.history[-1]
    assert last["loss"] < first["loss"] - 0.5
    assert len(last["moe_load"]) == 2 and len(last["moe_load"][0]) == 4
    np.testing.assert_allclose(np.sum(last["moe_load"], -1), 1.0, rtol=1e-5)
    assert all(a >= 1.0 - 1e-5 for a in last["moe_aux_loss"])  # the loss's minimum is 1
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train_row = [r for r in rows if r["split"] == "train"][-1]
    for key in ("moe/load_max/layer0", "moe/load_max/layer1", "moe/dropped/layer1",
                "moe/entropy/layer0", "moe/aux_loss", "moe_load"):
        assert key in train_row, key
    assert train_row["moe/load_max/layer1"] == pytest.approx(max(train_row["moe_load"][1]))
    eval_row = [r for r in rows if r["split"] == "train_eval"][-1]
    assert len(eval_row["eval_moe_load"]) == 2 and "eval_moe/entropy/layer0" in eval_row


def test_writer_vectors_and_moe_scalars(tmp_path):
    metrics = {"moe_dropped": [0.0, 0.25], "moe_entropy": [1.0, 0.5],
               "moe_load": [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]}
    sc = monitor.moe_scalars(metrics)
    assert sc["moe/dropped/layer1"] == 0.25 and sc["moe/dropped"] == 0.125
    assert sc["moe/load_max/layer0"] == 0.5 and sc["moe/load_min/layer1"] == 0.25
    with monitor.MetricWriter(tmp_path) as w:
        w.write(3, sc, vectors=metrics)
        with pytest.raises(ValueError, match="also a scalar"):
            w.write(4, {"moe_load": 1.0}, vectors={"moe_load": [1.0]})
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["moe_load"][0] == [0.5, 0.5, 0.0, 0.0] and rec["moe/entropy/layer1"] == 0.5


def test_flops_count_active_experts_only():
    dense = models.preset("llama", **{**TRAIN_MODEL, "num_experts": 0, "intermediate_size": 64})
    sparse = models.preset("mixtral", **{**TRAIN_MODEL, "expert_intermediate_size": 32,
                                         "num_experts": 4, "num_experts_per_tok": 2})
    # top-2 of 4 experts of width 32 = the compute of one dense MLP of width 64, plus router.
    router = 2 * 3 * TRAIN_MODEL["num_layers"] * 32 * 4
    assert loop.flops_per_token(sparse, 32) == pytest.approx(
        loop.flops_per_token(dense, 32) + router)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["dispatch=capacity", "peft=lora"])
def test_moe_config_runs_from_the_command_line(tmp_path, arg):
    from ftjax import main as ftmain
    from tests.test_cli import SMALL
    out = ftmain.main(["--config", f"configs/moe_sft.py:tasks=reverse,steps=3,{arg}",
                       "--workdir", str(tmp_path), "--config.model.expert_intermediate_size=16",
                       "--config.train.tensorboard=False"] + SMALL)
    assert out["final_loss"] is not None and np.isfinite(out["final_loss"])
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model"]["num_experts"] == 8 and cfg["model"]["family"] == "mixtral"
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 3 and len(train[-1]["moe_load"]) == 1  # SMALL: one layer
    assert "moe/dropped/layer0" in train[-1] and "moe/entropy/layer0" in train[-1]
