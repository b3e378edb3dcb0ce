"""Distillation: the token-level divergences of `ftjax.align.distill` against closed forms
(numpy), and the "distill" trainer (frozen teacher inside the step, vocabulary check, a tiny
run that lowers the divergence)."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import models
from ftjax.align import distill as kd
from ftjax.data import CharTokenizer
from ftjax.io.params_file import save_params
from ftjax.models.config import preset
from ftjax.trainers import distill as trainer

B, T, V = 3, 5, 7


def _logits(seed, scale=2.0):
    r = np.random.default_rng(seed)
    return (scale * r.standard_normal((B, T, V))).astype(np.float32)


def _np_log_softmax(x, tau):
    z = x.astype(np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(p, q):  # KL(p || q) over the last axis, probabilities
    return (p * (np.log(p) - np.log(q))).sum(-1)


def _np_divergence(s, t, kind, beta=0.5, tau=1.0):
    ps, pt = np.exp(_np_log_softmax(s, tau)), np.exp(_np_log_softmax(t, tau))
    if kind == "forward_kl":
        return _np_kl(pt, ps)
    if kind == "reverse_kl":
        return _np_kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * _np_kl(pt, m) + (1 - beta) * _np_kl(ps, m)


MASK = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)


@pytest.mark.parametrize("kind", kd.KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.5, 0.5])
def test_losses_equal_closed_forms_with_temperature_and_mask(kind, tau):
    s, t = _logits(0), _logits(1)
    want_tok = _np_divergence(s, t, kind, 0.3, tau)
    got_tok = kd.token_divergence(jnp.asarray(s), jnp.asarray(t), kind=kind, beta=0.3,
                                  temperature=tau)
    np.testing.assert_allclose(np.asarray(got_tok), want_tok, rtol=1e-5, atol=1e-6)
    want = (want_tok * MASK).sum() / MASK.sum()  # mean over masked tokens only
    got = kd.distill_loss(s, t, MASK, kind=kind, beta=0.3, temperature=tau)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Hinton et al.'s tau^2 factor only when asked
    got2 = kd.distill_loss(s, t, MASK, kind=kind, beta=0.3, temperature=tau, t2_scale=True)
    np.testing.assert_allclose(float(got2), want * tau ** 2, rtol=1e-5)
    # the named wrappers agree
    fn = {"forward_kl": kd.forward_kl, "reverse_kl": kd.reverse_kl,
          "jsd": lambda *a, **k: kd.generalized_jsd(*a, beta=0.3, **k)}[kind]
    np.testing.assert_allclose(float(fn(s, t, MASK, temperature=tau)), want, rtol=1e-5)
    # sums, as the step wants them
    sums = kd.distill_sums(s, t, MASK, kind=kind, beta=0.3, temperature=tau)
    assert float(sums["tokens"]) == MASK.sum()
    np.testing.assert_allclose(float(sums["distill"]), (want_tok * MASK).sum(), rtol=1e-5)


def test_hand_computed_two_token_vocab():
    # p_T = (1/2, 1/2), p_S = (e/(1+e), 1/(1+e)) from logits (0, 0) and (1, 0)
    s = jnp.array([[[1.0, 0.0]]])
    t = jnp.array([[[0.0, 0.0]]])
    a = np.e / (1 + np.e)
    fwd = 0.5 * np.log(0.5 / a) + 0.5 * np.log(0.5 / (1 - a))
    rev = a * np.log(a / 0.5) + (1 - a) * np.log((1 - a) / 0.5)
    np.testing.assert_allclose(float(kd.forward_kl(s, t)), fwd, rtol=1e-6)
    np.testing.assert_allclose(float(kd.reverse_kl(s, t)), rev, rtol=1e-6)
    m = np.array([0.5 * 0.5 + 0.5 * a, 0.5 * 0.5 + 0.5 * (1 - a)])
    jsd = 0.5 * (0.5 * np.log(0.5 / m[0]) + 0.5 * np.log(0.5 / m[1])) + \
        0.5 * (a * np.log(a / m[0]) + (1 - a) * np.log((1 - a) / m[1]))
    np.testing.assert_allclose(float(kd.generalized_jsd(s, t, beta=0.5)), jsd, rtol=1e-6)


def test_jsd_beta_limits():
    s, t = _logits(2), _logits(3)
    fwd = float(kd.forward_kl(s, t, MASK))
    rev = float(kd.reverse_kl(s, t, MASK))
    # TRL's end points: beta=0 is forward KL, beta=1 reverse KL, exactly
    assert float(kd.generalized_jsd(s, t, MASK, beta=0.0)) == pytest.approx(fwd, rel=1e-6)
    assert float(kd.generalized_jsd(s, t, MASK, beta=1.0)) == pytest.approx(rev, rel=1e-6)
    # and the formula approaches them to first order: JSD_b / b -> KL(p_T||p_S) as b -> 0,
    # JSD_b / (1 - b) -> KL(p_S||p_T) as b -> 1
    eps = 1e-4
    assert float(kd.generalized_jsd(s, t, MASK, beta=eps)) / eps == pytest.approx(fwd, rel=2e-2)
    assert float(kd.generalized_jsd(s, t, MASK, beta=1 - eps)) / eps == pytest.approx(rev,
                                                                                   rel=2e-2)
    # beta = 0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2
    j = kd.token_divergence(s, t, kind="jsd", beta=0.5)
    np.testing.assert_allclose(np.asarray(j), np.asarray(kd.token_divergence(t, s, kind="jsd")),
                               rtol=1e-5, atol=1e-6)
    assert float(j.max()) <= np.log(2) + 1e-6


def test_zero_for_identical_distributions_and_nonnegative():
    s = _logits(4)
    for kind in kd.KINDS:
        for tau in (1.0, 3.0):
            d = kd.token_divergence(s, s, kind=kind, temperature=tau)
            np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-6)
    # shifting all logits of a token by a constant changes nothing (log_softmax)
    d = kd.token_divergence(s, s + 7.0, kind="forward_kl")
    np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-5)
    assert float(kd.token_divergence(s, _logits(5), kind="reverse_kl").min()) >= 0.0


def test_stable_on_extreme_logits():
    s = jnp.asarray(_logits(6, scale=1e4))
    t = jnp.asarray(_logits(7, scale=1e4)).at[..., 0].set(-jnp.inf)  # a forbidden token
    for kind in ("forward_kl", "jsd"):  # reverse KL is +inf where the teacher has p = 0
        d, g = jax.value_and_grad(lambda x: kd.distill_loss(x, t, MASK, kind=kind))(s)
        assert np.isfinite(float(d)), kind
        assert np.all(np.isfinite(np.asarray(g))), kind


def test_gradient_reaches_the_student_only():
    s, t = jnp.asarray(_logits(8)), jnp.asarray(_logits(9))
    for kind in kd.KINDS:
        gs, gt = jax.grad(lambda a, b: kd.distill_loss(a, b, MASK, kind=kind),
                          argnums=(0, 1))(s, t)
        assert float(jnp.abs(gs).sum()) > 0
        assert float(jnp.abs(gt).sum()) == 0.0
        # masked tokens get no gradient
        assert float(jnp.abs(gs[1]).sum()) == 0.0


def test_bad_arguments_are_refused():
    s = _logits(0)
    with pytest.raises(ValueError, match="kind"):
        kd.token_divergence(s, s, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        kd.token_divergence(s, s, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd.token_divergence(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        kd.token_divergence(s, _logits(1)[..., :5])


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------

def _cfg(num_layers, vocab=99, hidden=32):
    return preset("llama", None, vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                  num_layers=num_layers, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=64)


def _batch(vocab=99):
    r = np.random.default_rng(0)
    ids = r.integers(3, vocab, (2, 12)).astype(np.int32)
    mask = np.zeros((2, 12), np.float32)
    mask[:, 6:] = 1
    return {"inputs": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask}


def test_teacher_is_frozen_inside_the_loss():
    scfg, tcfg = _cfg(1), _cfg(2)
    sp, tp = models.init(scfg, jax.random.PRNGKey(0)), models.init(tcfg, jax.random.PRNGKey(1))
    s = ml_collections.ConfigDict(dict(trainer.DEFAULTS["distill"], alpha=0.7))
    batch = _batch()

    def total(student, teacher):
        return trainer.distill_loss(scfg, tcfg, teacher, s)(student, batch, None)[0]
    gs, gt = jax.grad(total, argnums=(0, 1))(sp, tp)
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(gs)) > 0
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(gt))
    # the objective is alpha * divergence + (1 - alpha) * CE, both summed over the mask
    obj, stats = trainer.distill_loss(scfg, tcfg, tp, s)(sp, batch, None)
    np.testing.assert_allclose(float(obj), 0.7 * float(stats["distill"])
                               + 0.3 * float(stats["nll"]), rtol=1e-5)
    sl = models.apply(sp, scfg, batch["inputs"])[0]
    tl = models.apply(tp, tcfg, batch["inputs"])[0]
    np.testing.assert_allclose(float(stats["distill"]), float(
        kd.distill_sums(sl, tl, batch["loss_mask"], kind=s.loss)["distill"]), rtol=1e-5)
    # alpha = 0: plain cross-entropy, the teacher is not run
    ce = ml_collections.ConfigDict(dict(trainer.DEFAULTS["distill"], alpha=0.0))
    obj0, st0 = trainer.distill_loss(scfg, tcfg, tp, ce)(sp, batch, None)
    assert "distill" not in st0 and float(obj0) == pytest.approx(float(st0["nll"]))


def test_mismatched_vocab_is_refused():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="vocab_size: student 99, teacher 120"):
        trainer.check_same_vocab(_cfg(1), tok, _cfg(2, vocab=120), tok)

    class Other(CharTokenizer):
        pass
    with pytest.raises(ValueError, match="same tokenizer"):
        trainer.check_same_vocab(_cfg(1), tok, _cfg(2), Other())
    trainer.check_same_vocab(_cfg(1), tok, _cfg(2), CharTokenizer(), "12+3\n15")  # agrees


def test_truncated_init_keeps_evenly_spaced_teacher_layers():
    tcfg, scfg = _cfg(4), _cfg(2)
    tp = models.init(tcfg, jax.random.PRNGKey(0))
    out = trainer.truncated_params(tp, tcfg, scfg)
    np.testing.assert_array_equal(out["layers"]["attn"]["q_proj"]["kernel"],
                                  np.asarray(tp["layers"]["attn"]["q_proj"]["kernel"])[[0, 3]])
    np.testing.assert_array_equal(out["embed"]["embedding"], tp["embed"]["embedding"])
    assert jax.tree.map(np.shape, out) == jax.tree.map(np.shape, models.param_shapes(scfg))
    with pytest.raises(ValueError, match="only in num_layers"):
        trainer.truncated_params(tp, tcfg, _cfg(2, hidden=64))


def _tiny_run_args(tmp_path, teacher, **over):
    args = ["--config", "configs/distill.py:steps=12,tasks=reverse,eval_examples=4,layers=1",
            "--workdir", str(tmp_path / "run"),
            "--config.distill.teacher=" + str(teacher), "--config.distill.alpha=1.0",
            "--config.distill.student_init=config",
            "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
            "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
"--config.data.n_per_task=200",
            "--config.data.eval_before=False", "--config.train.batch_size=8",
            "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=0", "--config.train.progress=False",
            "--config.train.tensorboard=False", "--config.optimizer.learning_rate=1e-2"]
    return args + [f"--config.{k}={v}" for k, v in over.items()]


def test_tiny_trainer_run_lowers_the_distillation_loss(tmp_path):
    from ftjax.main import main
    teacher = tmp_path / "teacher.safetensors"
    tcfg = _cfg(2)
    save_params(str(teacher), tcfg, models.init(tcfg, jax.random.PRNGKey(3)))
    s = main(_tiny_run_args(tmp_path, teacher))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distill = [r["distill"] for r in rows if r.get("split") == "distill" and "distill" in r]
    assert len(distill) == 12
    assert np.mean(distill[-3:]) < 0.8 * np.mean(distill[:3]), distill
    assert s["student_params"] < s["teacher_params"]
    assert s["teacher_exact_match"] is not None and s["exact_match"] is not None


def test_trainer_refuses_a_teacher_with_another_vocab(tmp_path):
    from ftjax.main import main
    teacher = tmp_path / "teacher.safetensors"
    tcfg = _cfg(2, vocab=128)
    save_params(str(teacher), tcfg, models.init(tcfg, jax.random.PRNGKey(3)))
    with pytest.raises(ValueError, match="same tokenizer and vocabulary"):
        main(_tiny_run_args(tmp_path, teacher))
