"""Preference training (DPO family): losses against numpy references of the published formulas,
masked log-probs, the reference model, sharding, and a short run that must learn."""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ftjax import data as ftdata
from ftjax import models
from ftjax.align import dpo, logps, objective, precompute, reference
from ftjax.align.data import PreferenceLoader, corrupt, synthetic_pairs
from ftjax.data.synthetic import DeterministicRng
from ftjax.peft import core as peft_core
from ftjax.peft import get_method, quant
from ftjax.train import loop
from ftjax.train.run import Run

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)
SEQ = 48
TOK = ftdata.CharTokenizer()


# --------------------------------------------------------------------------------------------
# numpy references, written from the formulas (docs/alignment.md; TRL DPOTrainer/CPOTrainer)
# --------------------------------------------------------------------------------------------

def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_losses(t, pc, pr, rc, rr, nc, nr, beta, eps, nll, gamma=0.5, tau=0.05):
    dc, dr = pc - rc, pr - rr
    h = dc - dr
    lc, lr = pc / nc, pr / nr
    if t == "sigmoid":
        return -(1 - eps) * np_logsig(beta * h) - eps * np_logsig(-beta * h)
    if t == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if t == "ipo":
        return ((dc / nc - dr / nr) - 1 / (2 * beta)) ** 2
    if t == "robust":
        return (-(1 - eps) * np_logsig(beta * h) + eps * np_logsig(-beta * h)) / (1 - 2 * eps)
    if t == "sigmoid_norm":
        return -np_logsig(beta * (dc / nc - dr / nr))
    if t == "apo_zero":
        return (1 - np_sig(beta * dc)) + np_sig(beta * dr)
    if t == "apo_down":
        return np_sig(beta * dc) + (1 - np_sig(beta * h))
    if t == "bco_pair":
        return -np_logsig(beta * dc) - np_logsig(-beta * dr)
    if t == "nca_pair":
        return -np_logsig(beta * dc) - 0.5 * np_logsig(-beta * dc) - 0.5 * np_logsig(-beta * dr)
    if t == "sppo_hard":
        return (dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        z = beta * h
        return (np_sig(z) * (np_logsig(z) - np.log(1 - eps))
                + np_sig(-z) * (np_logsig(-z) - np.log(eps)))
    if t == "discopop":
        z = beta * h
        m = np_sig(z / tau)
        return (1 - m) * -np_logsig(z) + m * np.exp(-z)
    if t == "sft":
        return np.full_like(pc, nll)
    if t == "orpo":
        log_odds = (lc - lr) - (np.log(1 - np.exp(lc)) - np.log(1 - np.exp(lr)))
        return nll - beta * np_logsig(log_odds)
    if t == "simpo":
        z = beta * (lc - lr) - gamma
        return -(1 - eps) * np_logsig(z) - eps * np_logsig(-z)
    raise KeyError(t)


def random_pairs(seed, b=16):
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 12, b).astype(np.float64)
    nr = rng.integers(1, 12, b).astype(np.float64)
    pc = -nc * rng.uniform(0.05, 3.0, b)  # summed log-probs: negative, ~ length
    pr = -nr * rng.uniform(0.05, 3.0, b)
    rc = pc + rng.normal(0, 2.0, b)
    rr = pr + rng.normal(0, 2.0, b)
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("loss_type", dpo.LOSS_TYPES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 1e-3)])
def test_loss_matches_numpy_reference(loss_type, beta, eps):
    if loss_type == "exo_pair" and eps == 0:
        pytest.skip("exo_pair needs label smoothing > 0")
    pc, pr, rc, rr, nc, nr = random_pairs(hash((loss_type, beta)) % 1000)
    nll = 1.7
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    pairs = dpo.Pairs(f32(pc), f32(pr), f32(nc), f32(nr), f32(rc), f32(rr), f32(nll))
    got = dpo.per_type_losses(pairs, (loss_type,), beta, eps, simpo_gamma=0.5)[loss_type]
    want = np_losses(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, nll)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_log1mexp_is_accurate_at_both_ends():
    x = np.array([-1e-6, -1e-3, -0.5, -np.log(2), -1.0, -10.0, -40.0])
    want = np.log(-np.expm1(x))  # float64
    np.testing.assert_allclose(np.asarray(dpo.log1mexp(jnp.asarray(x, jnp.float32))), want,
                               rtol=1e-5, atol=1e-12)
    naive = np.log(1 - np.exp(np.float32(-1e-6)))  # what the stable form avoids
    assert abs(naive - want[0]) > 1e-3
    assert np.isfinite(np.asarray(dpo.log1mexp(jnp.float32(0.0))))


def test_objective_combines_weighted_means_over_real_pairs():
    """Σ_k w_k·mean(loss_k) over real pairs; padding rows (both halves empty) count nowhere;
    the sft term is the token-mean NLL over the batch's chosen completions (TRL)."""
    pc, pr, rc, rr, nc, nr = random_pairs(3, b=12)
    nc[-2:] = nr[-2:] = 0  # two padding rows
    pc[-2:] = pr[-2:] = 0
    types, weights, beta = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0), 0.1
    s = objective.Settings(loss_types=types, loss_weights=weights, beta=beta, reference="batch")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    pol = {"chosen": f32(pc), "rejected": f32(pr), "chosen_counts": f32(nc),
           "rejected_counts": f32(nr)}
    total, stats = objective.pair_stats(pol, f32(rc), f32(rr), s)
    real = slice(0, 10)
    nll = -pc[real].sum() / nc[real].sum()
    want = sum(w * np_losses(t, pc[real], pr[real], rc[real], rr[real], nc[real], nr[real],
                             beta, 0.0, nll).mean() for t, w in zip(types, weights))
    assert float(stats["tokens"]) == 10
    np.testing.assert_allclose(float(total) / 10, want, rtol=1e-5)
    np.testing.assert_allclose(float(stats["nll"]), float(total), rtol=1e-6)
    rew_c, rew_r = beta * (pc - rc)[real], beta * (pr - rr)[real]
    np.testing.assert_allclose(float(stats["correct"]), np.sum(rew_c > rew_r))
    np.testing.assert_allclose(float(stats["margin"]) / 10, np.mean(rew_c - rew_r), rtol=1e-5)
    assert float(stats["broken_pairs"]) == 0


# --------------------------------------------------------------------------------------------
# Log-probs of completion tokens
# --------------------------------------------------------------------------------------------

def test_sequence_logps_counts_only_masked_tokens():
    rng = np.random.default_rng(0)
    b, t, v = 3, 10, 7
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[0, 3:8] = 1
    mask[1, 0:2] = 1  # row 2: no completion at all
    out = logps.sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(lsm[i, j, targets[i, j]] for j in range(t) if mask[i, j]) for i in range(b)]
    np.testing.assert_allclose(np.asarray(out["logps"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["counts"]), [5, 2, 0])
    # Anything outside the mask (prompt, padding) may change without changing the result,
    # even to -inf logits.
    logits2 = logits.copy()
    logits2[mask == 0] = rng.normal(size=(int((mask == 0).sum()), v)) * 50
    logits2[2, :, :] = -np.inf
    targets2 = np.where(mask > 0, targets, (targets + 1) % v)
    out2 = logps.sequence_logps(jnp.asarray(logits2), jnp.asarray(targets2), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out2["logps"]), np.asarray(out["logps"]), rtol=1e-6)


def test_preference_batch_masks_prompt_and_padding():
    pairs = [{"prompt": "add 12+30", "chosen": "42", "rejected": "43000"},
             {"prompt": "reverse abc", "chosen": "cba", "rejected": "cab"}]
    b = PreferenceLoader(pairs, TOK, 2, SEQ, 0, shuffle=False).batch_at(0)
    # Completion tokens: the answer's characters plus eos, nothing of the prompt or padding.
    np.testing.assert_array_equal(b["chosen_loss_mask"].sum(1), [3, 4])
    np.testing.assert_array_equal(b["rejected_loss_mask"].sum(1), [6, 4])
    for h in ("chosen", "rejected"):
        np.testing.assert_array_equal(b[f"{h}_inputs"][:, :3], b["chosen_inputs"][:, :3])
        assert np.all(b[f"{h}_loss_mask"][b[f"{h}_segment_ids"] == 0] == 0)


# --------------------------------------------------------------------------------------------
# Models, params and the reference
# --------------------------------------------------------------------------------------------

def tiny_cfg(steps=3, batch=8, peft="lora", lr=3e-3, **dpo_kw):
    c = common.base("dpo")
    c.model = common.model("llama", **TINY)
    c.optimizer = common.optimizer("adamw", learning_rate=lr, warmup_steps=0, schedule="constant")
    c.train = common.train(steps=steps, batch_size=batch, seq_len=SEQ, log_every=1,
                           progress=False, tensorboard=False, async_checkpoint=False)
    from ftjax.peft import method_defaults
    c.peft = method_defaults(peft)  # the method's settings; small adapters where it has a rank
    c.peft.update({k: v for k, v in dict(rank=4, alpha=8.0).items() if k in c.peft})
    c.dpo = ml_collections.ConfigDict(dict(loss_type=("sigmoid",), loss_weights=(), beta=0.1,
                                           label_smoothing=0.0, simpo_gamma=0.5,
                                           discopop_tau=0.05, reference="auto"))
    c.dpo.update(dpo_kw)
    return c


def mcfg_of(c):
    from ftjax.train.run import model_config
    return model_config(c.model)


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(("reverse", "add"), 64, seed=0, test_frac=0.25)


def policy_params(c, key=0):
    mcfg = mcfg_of(c)
    m = get_method(c.peft)
    def build():
        params = models.init(mcfg, jax.random.PRNGKey(key))
        return m.transform(params, loop.transform_key(int(c.seed))) if m.transform else params
    return mcfg, m, jax.jit(build)()


def one_batch(train_pairs, n=8):
    return PreferenceLoader(train_pairs, TOK, n, SEQ, 0).batch_at(0)


def every_pair_once(pairs, n=8):
    return PreferenceLoader(pairs, TOK, n, SEQ, 0, shuffle=False, drop_remainder=False,
                            num_epochs=1)


@pytest.mark.parametrize("peft", ["lora", "qlora", "dora", "ia3"])
def test_at_init_loss_is_log2_and_rewards_zero(peft, pairs):
    """Adapters start as a no-op, so policy == stripped reference: -log σ(0) = log 2."""
    c = tiny_cfg(peft=peft)
    mcfg, m, params = policy_params(c)
    settings = objective.from_config(c.dpo, "strip")
    loss_fn = objective.preference_loss(mcfg, settings, m.apply_fn)
    total, s = jax.jit(loss_fn)(params, one_batch(pairs[0]), None)
    n = float(s["tokens"])
    assert n == 8
    np.testing.assert_allclose(float(total) / n, math.log(2), rtol=1e-5)
    for k in ("rewards_chosen", "rewards_rejected", "margin"):
        assert abs(float(s[k]) / n) < 1e-5, k
    if peft != "dora":  # DoRA's m/||W|| equals 1 only up to rounding
        assert float(s["correct"]) == 0  # exact ties are not wins
        assert float(s["reward_ties"]) == n  # ... and every pair ties, and says so


@pytest.mark.filterwarnings("ignore:LoRA. this MoE model")  # experts untargeted on purpose
def test_moe_policy_adds_router_losses_per_pair(pairs):
    """An MoE policy's objective is the preference loss plus the router losses of its forward
    (coefficient-weighted layer means), and the routing statistics come with the stats."""
    c = tiny_cfg(peft="lora")
    c.model = common.model("mixtral", **TINY, num_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.05, router_z_loss_coef=0.01)
    mcfg, m, params = policy_params(c)
    loss_fn = objective.preference_loss(mcfg, objective.from_config(c.dpo, "strip"), m.apply_fn)
    total, s = jax.jit(loss_fn)(params, one_batch(pairs[0]), None)
    n = float(s["tokens"])
    router = (0.05 * np.mean(np.asarray(s["moe_aux_loss"]) / n)
              + 0.01 * np.mean(np.asarray(s["moe_z_loss"]) / n))
    assert router > 0 and np.asarray(s["moe_load"]).shape == (2, 4)
    np.testing.assert_allclose(float(total) / n, math.log(2) + router, rtol=1e-5)


def test_strip_adapters_keeps_nested_bases():
    c = tiny_cfg(peft="qlora")
    _, _, qparams = policy_params(c)
    stripped = reference.strip_adapters(qparams)
    q = stripped["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, quant.NF4Weight)  # LoRA removed, the 4-bit base stays 4-bit
    assert not any(isinstance(w, peft_core.StructuredWeight) and w.trainable_fields()
                   for w in jax.tree.leaves(stripped, is_leaf=peft_core.is_structured))
    # LoRA over a dense base gives back exactly the original arrays.
    c = tiny_cfg(peft="lora")
    mcfg, _, lparams = policy_params(c)
    base = models.init(mcfg, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(reference.strip_adapters(lparams)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Full fine-tuning: nothing to strip.
    assert reference.strip_adapters(base) is not None
    for a, b in zip(jax.tree.leaves(reference.strip_adapters(base)), jax.tree.leaves(base)):
        assert a is b


def test_reference_mode_resolution():
    def resolve(peft, mode, **pcfg):
        c = tiny_cfg(peft=peft)
        c.peft.update(pcfg)
        mcfg = mcfg_of(c)
        m = get_method(c.peft)
        ab = models.param_shapes(mcfg)
        if m.transform:
            ab = jax.eval_shape(m.transform, ab, jax.random.PRNGKey(1))
        return reference.resolve_mode(mode, ab, m.train_patterns, c.peft)
    assert resolve("lora", "auto") == "strip"
    assert resolve("qlora", "auto") == "strip"
    assert resolve("full", "auto") == "precompute"
    assert resolve("lora", "auto", init="pissa") == "precompute"
    assert resolve("lora", "auto", train_patterns=("lm_head/.*",)) == "precompute"
    assert resolve("adapter", "auto", bottleneck=8) == "precompute"  # folded bias (frozen)
    with pytest.raises(ValueError, match="plain params train"):
        resolve("full", "strip")
    with pytest.raises(ValueError, match="pissa"):
        resolve("lora", "strip", init="pissa")
    with pytest.raises(ValueError, match="choose one of"):
        resolve("lora", "stripped")


def test_pissa_reference_is_the_starting_policy_not_the_residual(pairs):
    """PiSSA moves W's top singular part into the adapter: the starting policy (precompute's
    reference) equals the original model, the stripped residual does not."""
    c = tiny_cfg(peft="lora")
    c.peft.init = "pissa"
    mcfg, m, params = policy_params(c)
    batch = one_batch(pairs[0])
    fn = reference.make_ref_logps_fn(mcfg)
    orig = fn(models.init(mcfg, jax.random.PRNGKey(0)), batch)[0]
    start = fn(params, batch)[0]
    residual = fn(reference.strip_adapters(params), batch)[0]
    gap = lambda x: float(np.max(np.abs(np.asarray(x) - np.asarray(orig))))
    assert gap(start) < 1e-3          # rounding of W_res + s·A·B
    assert gap(residual) > 0.02       # 0.07 on this random model (near-uniform outputs)


def test_reference_term_sends_no_gradient(pairs):
    """Gradients of the strip-mode loss equal those with the same reference log-probs given
    as constants: nothing flows through the reference forward (w.r.t. every leaf, the frozen
    bases included)."""
    c = tiny_cfg(peft="lora")
    mcfg, m, params = policy_params(c)
    # Make the adapters non-trivial so policy != reference.
    params = peft_core.map_weights(
        lambda p, w: w.replace(b=0.05 * jnp.ones_like(w.b)) if hasattr(w, "b") and hasattr(w, "a")
        else w, params)
    batch = one_batch(pairs[0])
    c_ref, r_ref = reference.make_ref_logps_fn(mcfg)(reference.strip_adapters(params), batch)
    batch_ref = dict(batch, ref_chosen_logps=np.asarray(c_ref), ref_rejected_logps=np.asarray(r_ref))
    strip_fn = objective.preference_loss(mcfg, objective.from_config(c.dpo, "strip"))
    const_fn = objective.preference_loss(mcfg, objective.from_config(c.dpo, "precompute"))
    g1, s1 = jax.jit(jax.grad(lambda p: strip_fn(p, batch, None), has_aux=True))(params)
    g2, s2 = jax.jit(jax.grad(lambda p: const_fn(p, batch_ref, None), has_aux=True))(params)
    np.testing.assert_allclose(float(s1["nll"]), float(s2["nll"]), rtol=1e-6)
    assert abs(float(s1["margin"])) > 1e-4  # the adapters do change the policy
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_precomputed_columns_follow_shuffled_pairs(pairs):
    """The precomputed reference log-probs attached to a batch belong to the rows they sit on,
    for shuffled batches across epochs; the eval padding rows get nothing; the copy mode
    attaches the same numbers."""
    c = tiny_cfg(peft="full")
    mcfg = mcfg_of(c)
    run = Run.of(c, "", model_cfg=mcfg,
                 init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                 devices=jax.devices()[:1])
    placement, ref = run.placement, run.starting_params()
    train = pairs[0][:37]
    table = precompute.compute_table(ref, mcfg, every_pair_once(train, 16), placement)
    assert len(table["keys"]) == 37  # the padding rows of the last batch are not in it
    ld = precompute.Precomputed(PreferenceLoader(train, TOK, 8, SEQ, seed=5), table)
    fn = reference.make_ref_logps_fn(mcfg)
    for _ in range(6):  # crosses an epoch boundary (4 batches per epoch)
        b = next(ld)
        c_ref, r_ref = fn(ref, b)
        np.testing.assert_allclose(b["ref_chosen_logps"], np.asarray(c_ref), rtol=1e-5)
        np.testing.assert_allclose(b["ref_rejected_logps"], np.asarray(r_ref), rtol=1e-5)
    last = list(every_pair_once(train, 16))[-1]
    attached = ld.attach(last)
    np.testing.assert_array_equal(attached["ref_chosen_logps"][5:], 0.0)  # 37 = 2*16 + 5
    copy = precompute.WithReference(iter([last]), ref, mcfg, placement)
    np.testing.assert_allclose(next(copy)["ref_chosen_logps"][:5],
                               attached["ref_chosen_logps"][:5], rtol=1e-5)
    other = one_batch(pairs[1])  # pairs the table has never seen
    with pytest.raises(ValueError, match="did not see"):
        ld.attach(other)


def test_precompute_cache_roundtrip(tmp_path):
    table = {"keys": np.array([b"a" * 16, b"b" * 16], "S16"),
             "chosen": np.arange(2, dtype=np.float32), "rejected": -np.arange(2, dtype=np.float32)}
    path = str(tmp_path / "ref.npz")
    assert precompute.load_cache(path) is None
    precompute.save_cache(path, table)
    got = precompute.load_cache(path)
    for k in table:
        np.testing.assert_array_equal(got[k], table[k])
    np.savez(path, keys=table["keys"])
    with pytest.raises(ValueError, match="not a reference log-prob table"):
        precompute.load_cache(path)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def test_synthetic_pairs_are_deterministic_and_split(pairs):
    train, test = pairs
    assert (train, test) == synthetic_pairs(("reverse", "add"), 64, seed=0, test_frac=0.25)
    assert len(train) == 96 and len(test) == 32
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    for p in train + test:
        assert p["chosen"] != p["rejected"] and len(p["chosen"]) == len(p["rejected"])
    rng = DeterministicRng("t")
    assert corrupt("2023-04-05", "perturb", rng).count("-") == 2
    assert len(corrupt("abcdef", "truncate", rng)) < 6
    with pytest.raises(ValueError, match="corruption"):
        synthetic_pairs(("add",), 10, 0, corruption="scramble")


def test_loader_resumes_exactly(pairs):
    a = PreferenceLoader(pairs[0], TOK, 8, SEQ, seed=1)
    for _ in range(3):
        next(a)
    b = PreferenceLoader(pairs[0], TOK, 8, SEQ, seed=1)
    b.set_state(a.get_state())
    x, y = next(a), next(b)
    assert set(x) == set(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_bad_inputs_get_clear_errors(pairs):
    with pytest.raises(ValueError, match="unknown"):
        objective.from_config(ml_collections.ConfigDict(dict(loss_type=("sigmod",))), "strip")
    with pytest.raises(ValueError, match="one weight per"):
        objective.from_config(ml_collections.ConfigDict(
            dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,))), "strip")
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        objective.from_config(ml_collections.ConfigDict(dict(loss_type=("exo_pair",))), "strip")
    with pytest.raises(ValueError, match="beta"):
        objective.from_config(ml_collections.ConfigDict(dict(beta=0.0)), "strip")
    with pytest.raises(ValueError, match="identical"):
        PreferenceLoader([{"prompt": "p", "chosen": "a", "rejected": "a"}] * 8, TOK, 8, SEQ, 0)
    with pytest.raises(ValueError, match="lacks"):
        PreferenceLoader([{"prompt": "p", "chosen": "a"}] * 8, TOK, 8, SEQ, 0)
    c = tiny_cfg()
    mcfg, m, params = policy_params(c)
    fn = objective.preference_loss(mcfg, objective.from_config(c.dpo, "strip"))
    sft_batch = {k[len("chosen_"):]: v for k, v in one_batch(pairs[0]).items()
                 if k.startswith("chosen_")}
    with pytest.raises(ValueError, match="chosen_\\*/rejected_\\*"):
        fn(params, sft_batch, None)


def test_reference_free_objectives_need_no_reference(pairs):
    c = tiny_cfg(peft="full", loss_type=("orpo",))
    s = objective.from_config(c.dpo, "precompute")
    assert s.reference == "none" and not s.uses_reference
    mcfg = mcfg_of(c)
    params = models.init(mcfg, jax.random.PRNGKey(0))
    total, st = objective.preference_loss(mcfg, s)(params, one_batch(pairs[0]), None)  # no ref cols
    assert np.isfinite(float(total)) and float(st["tokens"]) == 8


# --------------------------------------------------------------------------------------------
# Training: sharding, a learning run, the reference unchanged
# --------------------------------------------------------------------------------------------

def _train(c, train_pairs, workdir, devices=None, table=None):
    mcfg = mcfg_of(c)
    m = get_method(c.peft)
    mode = "strip" if table is None else "precompute"
    loss_fn = objective.preference_loss(mcfg, objective.from_config(c.dpo, mode), m.apply_fn,
                                        m.bind_rng)
    it = PreferenceLoader(train_pairs, TOK, int(c.train.batch_size), SEQ, 0)
    if table is not None:
        it = precompute.Precomputed(it, table)
    run = Run.build(c, str(workdir), name="dpo", tokenizer=TOK, model_cfg=mcfg, method=m,
                    init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)),
                    devices=devices)
    return loop.train(run, loss_fn, it)


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "full"])
def test_eight_devices_equal_one(peft, pairs, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    train = pairs[0][:32]
    table = None
    if peft == "full":  # the reference log-probs travel in the batch ([B, 1] columns)
        c = tiny_cfg(peft="full")
        mcfg = mcfg_of(c)
        run = Run.of(c, "", model_cfg=mcfg, devices=jax.devices()[:1],
                     init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)))
        pl, ref = run.placement, run.starting_params()
        table = precompute.compute_table(ref, mcfg, every_pair_once(train), pl)
    results = []
    for devices, mesh in ((jax.devices()[:1], {"data": 1}), (None, {"data": 2, "fsdp": 4})):
        c = tiny_cfg(steps=2, peft=peft)
        c.mesh.update(mesh)
        r = _train(c, train, tmp_path / str(len(results)), devices, table)
        results.append(r)
    one, eight = results
    np.testing.assert_allclose([h["loss"] for h in eight.history],
                               [h["loss"] for h in one.history], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(eight.state.params)),
                    jax.tree.leaves(jax.device_get(one.state.params))):
        # Adam divides by sqrt(v): where a gradient is ~0 its summation order shows; 1e-4 is
        # a few percent of one step's update (lr 3e-3).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_short_dpo_run_learns_preferences_on_heldout_pairs(tmp_path):
    """LoRA on the shipped quickstart base, task dmy2iso (never pretrained): after 40 steps the
    held-out pairs' reward accuracy and margin rise from 0, the policy prefers more correct
    answers than before, the loss falls, and the stripped reference is bit-identical."""
    from configs.quickstart import SHIPPED_BASE, base_model
    from ftjax.trainers.dpo import make_evaluator
    from ftjax.paths import root
    from ftjax.train.run import initial_params
    train, test = synthetic_pairs(("dmy2iso",), 640, seed=0, test_frac=0.2)
    c = tiny_cfg(steps=40, batch=16, peft="lora", lr=2e-3)
    c.model = base_model()
    c.model.init_from = os.path.join(root(), SHIPPED_BASE)
    c.peft.rank, c.peft.alpha = 8, 16.0
    mcfg = mcfg_of(c)
    m = get_method(c.peft)
    init = initial_params(c, mcfg)
    loss_fn = objective.preference_loss(mcfg, objective.from_config(c.dpo, "strip"))
    it = PreferenceLoader(train, TOK, 16, SEQ, 0)
    run = Run.build(c, str(tmp_path), name="dpo", tokenizer=TOK, model_cfg=mcfg, method=m,
                    init_params=init, devices=jax.devices()[:1])
    placement = run.placement
    evals = list(PreferenceLoader(test, TOK, 16, SEQ, 0, shuffle=False, drop_remainder=False,
                                  num_epochs=1))
    evaluate = make_evaluator(loss_fn, placement, evals)
    p0 = run.starting_params()
    before = evaluate(0, p0)
    res = run.train(loss_fn, it)
    after = evaluate(40, res.params)
    print("before", before, "\nafter", after)
    assert before["eval_pairs"] == len(test) == 128
    np.testing.assert_allclose(before["eval_loss"], math.log(2), rtol=1e-5)
    assert before["eval_accuracy"] == 0 and abs(before["eval_margin"]) < 1e-6
    assert before["eval_reward_ties"] == 1 and after["eval_reward_ties"] < 0.05
    assert after["eval_accuracy"] > 0.65      # 0.75 when written
    assert after["eval_margin"] > 0.5         # 0.90
    assert after["eval_logps_accuracy"] > before["eval_logps_accuracy"] + 0.1  # 0.48 -> 0.65
    losses = [h["loss"] for h in res.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    for a, b in zip(jax.tree.leaves(reference.strip_adapters(jax.device_get(res.params))),
                    jax.tree.leaves(reference.strip_adapters(jax.device_get(p0)))):
        np.testing.assert_array_equal(a, b)


def test_before_line_explains_tied_reward_accuracy():
    """Reward accuracy 0 beside logps accuracy 1 at the start is explained, not left bare."""
    from ftjax.trainers.dpo import _fmt
    start = _fmt({"eval_loss": math.log(2), "eval_accuracy": 0.0, "eval_reward_ties": 1.0,
                  "eval_margin": 0.0, "eval_logps_accuracy": 1.0})
    assert "eval_accuracy=0.0000 eval_reward_ties=1.0000" in start
    assert "100.0% of the pairs tie, which is no win since both rewards are 0 while the " \
        "policy equals the reference" in start and "as TRL counts it" in start
    later = _fmt({"eval_loss": 0.3, "eval_accuracy": 0.9, "eval_reward_ties": 0.0,
                  "eval_margin": 1.0, "eval_logps_accuracy": 0.95})
    assert "\n" not in later and "tie" not in later.replace("eval_reward_ties", "")


# --------------------------------------------------------------------------------------------
# The trainer end to end (python -m ftjax.main)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trainer_on_a_preference_file_resumes_with_cached_reference(tmp_path):
    """configs/dpo_file.py on the shipped sample (data pipeline, full fine-tuning, reference
    precomputed and cached); a longer second run resumes and reads the cache."""
    from ftjax.main import main
    args = ["--config", "configs/dpo_file.py:steps=6,peft=full", "--workdir", str(tmp_path),
            "--config.optimizer.warmup_steps=0", "--config.train.eval_every=3",
            "--config.train.checkpoint_every=3", "--config.train.progress=False",
            "--config.train.tensorboard=False"]
    first = main(args)
    assert first["reference"] == "precompute" and first["data"]["source"] == "files"
    assert first["before"]["eval_loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert first["after"]["eval_margin"] > 0 and first["after"]["eval_accuracy"] > 0.9
    caches = [f for f in os.listdir(tmp_path) if f.startswith("ref_logps_")]
    assert len(caches) == 1 and os.path.exists(tmp_path / "data_report.json")
    args[1] = "configs/dpo_file.py:steps=9,peft=full"
    second = main(args + ["--config.dpo.eval_before=False"])
    assert second["resumed_from"] == 6
    assert [f for f in os.listdir(tmp_path) if f.startswith("ref_logps_")] == caches


@pytest.mark.slow
def test_trainer_on_synthetic_pairs(tmp_path):
    from ftjax.main import main
    out = main(["--config", "configs/dpo_synthetic.py:steps=8,tasks=reverse,loss=sigmoid+sft",
                "--workdir", str(tmp_path), "--config.data.n_per_task=160",
                "--config.data.eval_examples=8", "--config.train.batch_size=16",
                "--config.optimizer.warmup_steps=0", "--config.train.eval_every=4",
                "--config.train.progress=False", "--config.train.tensorboard=False"])
    assert out["reference"] == "strip" and out["eval_pairs"] == 32
    assert out["loss_type"] == ["sigmoid", "sft"]
    assert out["after"]["eval_margin"] > out["before"]["eval_margin"] == 0
    assert out["before"]["exact_match"] is not None and out["after"]["exact_match"] is not None
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["after"]["eval_accuracy"] == out["after"]["eval_accuracy"]
