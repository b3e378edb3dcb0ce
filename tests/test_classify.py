"""Classification: weighted CE and focal loss (parity, gradients vs numpy), metrics (hand cases
and a numpy reference), the head on the last real token, and the trainer through loop.train
with full fine-tuning and LoRA."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ftjax import data as ftdata
from ftjax import models
from ftjax.eval.classification import (average_precision, classification_metrics,
                                       confusion_matrix, format_metrics)
from ftjax.data import classification as cdata
from ftjax.train import classify_head
from ftjax.trainers import classify
from ftjax.train.losses import classification_cross_entropy, focal_loss
from tests.test_train import _CrashAfter


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------

def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _data(seed=0, b=16, c=4):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, c)) * 2).astype(np.float32)
    labels = rng.integers(0, c, b).astype(np.int32)
    return logits, labels


def test_gamma0_and_uniform_weights_equal_plain_ce():
    logits, labels = _data()
    ref = -_np_log_softmax(logits.astype(np.float64))[np.arange(16), labels].sum()

    @jax.jit
    def all_losses(z):
        fns = [lambda z: classification_cross_entropy(z, labels)["nll"],
               lambda z: classification_cross_entropy(z, labels, class_weight=jnp.ones(4))["nll"],
               lambda z: focal_loss(z, labels, gamma=0.0)["nll"],
               lambda z: focal_loss(z, labels, gamma=0.0, alpha=jnp.ones(4))["nll"]]
        return [jax.value_and_grad(f)(z) for f in fns]
    out = all_losses(jnp.array(logits))
    for value, grad in out:
        assert np.isclose(float(value), ref, rtol=1e-5)
        assert np.allclose(grad, out[0][1], atol=1e-6)   # same function, same gradient
    assert float(classification_cross_entropy(jnp.array(logits), labels)["tokens"]) == 16


def test_weighted_ce_matches_numpy_and_masks_rows():
    logits, labels = _data(1)
    cw = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    mask = np.ones(16, np.float32)
    mask[-3:] = 0
    lp = _np_log_softmax(logits.astype(np.float64))[np.arange(16), labels]
    ref = -(lp * cw[labels] * mask).sum()
    s = classification_cross_entropy(jnp.array(logits), jnp.array(labels), jnp.array(mask),
                                     jnp.array(cw))
    assert np.isclose(float(s["nll"]), ref, rtol=1e-5)
    assert np.isclose(float(s["ce"]), -(lp * mask).sum(), rtol=1e-5)
    assert float(s["tokens"]) == 13
    assert float(s["correct"]) == (logits.argmax(-1) == labels)[:13].sum()


def _np_focal_and_grad(z, y, gamma, alpha):
    """Reference: FL = -a (1-p)^g log p and its analytic gradient w.r.t. the logits:
    dFL/dz_j = a [g p (1-p)^(g-1) log p - (1-p)^g] (1[j=y] - s_j)."""
    z = z.astype(np.float64)
    s = np.exp(_np_log_softmax(z))
    b = np.arange(len(y))
    p = s[b, y]
    a = alpha[y]
    loss = -a * (1 - p) ** gamma * np.log(p)
    coef = a * (gamma * p * (1 - p) ** (gamma - 1) * np.log(p) - (1 - p) ** gamma)
    onehot = np.eye(z.shape[1])[y]
    return loss.sum(), coef[:, None] * (onehot - s)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_loss_and_gradient_match_numpy(gamma):
    logits, labels = _data(2, b=32, c=5)
    alpha = np.array([0.25, 1.0, 0.5, 2.0, 1.5], np.float32)
    ref_loss, ref_grad = _np_focal_and_grad(logits, labels, gamma, alpha.astype(np.float64))
    f = lambda z: focal_loss(z, jnp.array(labels), gamma=gamma, alpha=jnp.array(alpha))["nll"]
    value, g = jax.jit(jax.value_and_grad(f))(jnp.array(logits))
    assert np.isclose(float(value), ref_loss, rtol=1e-5)
    g = np.asarray(g)
    assert np.allclose(g, ref_grad, atol=1e-5, rtol=1e-4)


def test_focal_downweights_easy_examples():
    # Row 0: easy (p_t ~ 0.98); row 1: hard (p_t ~ 0.1).
    logits = jnp.array([[4.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    labels = jnp.array([0, 0])

    @jax.jit
    def per_row(z):  # per-example losses and gradient norms of CE and focal (gamma 2)
        ce = lambda z: classification_cross_entropy(z[None], labels[:1])["nll"]
        fl = lambda z: focal_loss(z[None], labels[:1], gamma=2.0)["nll"]
        out = []
        for f in (ce, fl):
            v, g = jax.vmap(jax.value_and_grad(f))(z)
            out.append((v, jnp.abs(g).sum(-1)))
        return out
    (ce, gce), (fl, gfl) = per_row(logits)
    assert fl[0] < ce[0] and fl[1] < ce[1]
    assert fl[0] / ce[0] < 0.01 < 0.5 < fl[1] / ce[1]   # easy shrinks far more than hard
    assert gfl[0] / gfl[1] < 0.1 * gce[0] / gce[1]       # the hard example's gradient share grows


def test_focal_gradient_finite_at_certainty():
    logits = jnp.array([[60.0, -60.0]])
    grads = jax.jit(lambda z: [jax.grad(lambda z: focal_loss(z, jnp.array([0]), gamma=g)["nll"])(z)
                               for g in (0.5, 2.0)])(logits)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------

def test_metrics_hand_computed():
    y = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 2, 2]
    scores = np.eye(3)[p]
    m = classification_metrics(y, scores)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert np.isclose(m["accuracy"], 4 / 6)
    assert np.allclose(m["precision"], [1.0, 0.5, 0.5])
    assert np.allclose(m["recall"], [2 / 3, 0.5, 1.0])
    assert np.allclose(m["f1"], [0.8, 0.5, 2 / 3])
    assert np.isclose(m["macro_f1"], (0.8 + 0.5 + 2 / 3) / 3)
    assert m["support"] == [3, 2, 1]
    assert "macro P/R/F1" in format_metrics(m)
    assert np.isclose(m["per_class"]["1"]["recall"], 0.5)
    assert np.isclose(m["per_class"]["2"]["precision"], 0.5)
    assert m["per_class"]["0"]["support"] == 3


def test_confusion_matrix_is_labelled_by_class_name():
    y, p = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    names = ["negative", "positive", "a_long_neutral_label"]
    text = format_metrics(classification_metrics(y, np.eye(3)[p], names)).splitlines()
    at = text.index("confusion matrix (rows: true class, columns: predicted class):")
    header, *rows = [line.split() for line in text[at + 1:at + 5]]
    assert header == ["true", "\\", "pred"] + names  # full names, no cut
    assert rows == [[n] + [str(v) for v in r] for n, r in
                    zip(names, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])]
    assert any(line.startswith("a_long_neutral_label ") for line in text)  # the class table


def test_average_precision_hand_computed():
    # ranked: + - + - ; precision at positives: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    assert np.isclose(average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]), (1 + 2 / 3) / 2)
    # a tie between a positive and a negative is one threshold: precision 1/2 there
    assert np.isclose(average_precision([1, 0], [0.5, 0.5]), 0.5)
    assert np.isclose(average_precision([0, 1, 1], [0.1, 0.9, 0.8]), 1.0)
    assert np.isnan(average_precision([0, 0], [0.3, 0.2]))


def _ap_reference(y, s):
    """Mean over positives of the precision at that positive's score threshold."""
    y, s = np.asarray(y), np.asarray(s)
    pos = np.flatnonzero(y == 1)
    return np.mean([(y[s >= s[k]] == 1).sum() / (s >= s[k]).sum() for k in pos])


def test_metrics_match_numpy_reference_random():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, c = int(rng.integers(20, 80)), int(rng.integers(2, 6))
        y = rng.integers(0, c, n)
        scores = rng.random((n, c))
        if trial % 2:
            scores = np.round(scores, 1)   # many ties
        m = classification_metrics(y, scores)
        pred = scores.argmax(-1)
        for k in range(c):
            tp = np.sum((pred == k) & (y == k))
            prec = tp / max(np.sum(pred == k), 1)
            rec = tp / max(np.sum(y == k), 1)
            assert np.isclose(m["precision"][k], prec) and np.isclose(m["recall"][k], rec)
            if np.any(y == k):
                assert np.isclose(m["average_precision"][k], _ap_reference(y == k, scores[:, k]))
        cm = confusion_matrix(y, pred, c)
        assert cm.sum() == n and np.trace(cm) == np.sum(pred == y)


# ------------------------------------------------------------------------------------------
# Head and trainer
# ------------------------------------------------------------------------------------------

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)


def _cfg(steps=40, batch=16, peft=None, lr=3e-3):
    c = common.base("classify")
    c.model = common.model("llama", **TINY)
    c.optimizer = common.optimizer("adamw", learning_rate=lr, warmup_steps=2)
    c.train = common.train(steps=steps, batch_size=batch, seq_len=24, log_every=1,
                           progress=False, tensorboard=False, async_checkpoint=False,
                           eval_every=steps)
    if peft:
        c.peft = ml_collections.ConfigDict(peft)
    return c


def test_last_token_and_padding_invariance():
    from ftjax.train.run import model_config
    mcfg = model_config(common.model("llama", **TINY))
    add_head = classify_head.head_params(mcfg.hidden_size, 3)
    params = jax.jit(lambda k: (lambda p: {**p, **add_head(p, jax.random.PRNGKey(1))})(
        models.init(mcfg, k)))(jax.random.PRNGKey(0))
    assert params["cls_head"]["kernel"].shape == (32, 3)
    toks = [np.array([1, 5, 6, 7, 2], np.int32), np.array([1, 9, 2], np.int32)]
    b16 = cdata.encode_rows(toks, [0, 1], 16)
    b8 = cdata.encode_rows(toks[1:], [1], 8)
    assert classify_head.last_token_index(jnp.array(b16["segment_ids"])).tolist() == [4, 2]
    fwd = jax.jit(lambda p, b: classify_head.classify_logits(p, mcfg, b))
    l16, l8 = fwd(params, b16), fwd(params, b8)
    assert l16.shape == (2, 3)
    assert np.allclose(l16[1], l8[0], atol=1e-5)          # padding/batch mates do not matter
    hidden = jax.jit(lambda p, x: models.apply(p, mcfg, x, return_hidden=True)[1]["hidden"])(
        {k: v for k, v in params.items() if k != "cls_head"}, jnp.array(b16["inputs"][:1, :5]))
    h = hidden[0, 4]
    manual = h @ params["cls_head"]["kernel"] + params["cls_head"]["bias"]
    assert np.allclose(l16[0], manual, atol=1e-5)


def _task_data(n, seed=0):
    """Label = which of 3 synthetic tasks a prompt comes from (read from its first word)."""
    tok = ftdata.CharTokenizer()
    tasks = ["add", "reverse", "sort"]
    toks, labels = [], []
    for k, t in enumerate(tasks):
        for ex in ftdata.generate(t, n // 3, seed):
            toks.append(np.array([tok.bos_id] + tok.encode(ex["prompt"]) + [tok.eos_id],
                                 np.int32))
            labels.append(k)
    return toks, np.array(labels)


def _train(c, tmp_path, loss="ce", class_weight=None, gamma=2.0, crash_after=None):
    from ftjax.train.run import initial_params, model_config
    mcfg = model_config(c.model)
    toks, labels = _task_data(96)
    it = cdata.ArrayLoader(toks, labels, int(c.train.batch_size), int(c.train.seq_len),
                              seed=0)
    if crash_after is not None:
        it = _CrashAfter(it, crash_after)
    ev = cdata.eval_rows(toks[::5], labels[::5], 16, int(c.train.seq_len))
    run = classify.build(c, str(tmp_path), 3, model_cfg=mcfg,
                         init_params=initial_params(c, mcfg))
    return classify.train_classifier(run, it, ev, loss=loss, class_weight=class_weight,
                                     gamma=gamma, class_names=["add", "reverse", "sort"]), mcfg, ev


@pytest.mark.slow
def test_trainer_full_finetune_learns(tmp_path):
    c = _cfg(steps=30)
    (res, predict), mcfg, ev = _train(c, tmp_path, loss="focal", gamma=1.0)
    losses = [h["loss"] for h in res.history]
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3])
    assert res.evals[-1]["eval_accuracy"] > 0.9 and res.evals[-1]["macro_f1"] > 0.9
    probs, labels = predict(res.params, ev)
    assert probs.shape == (len(labels), 3) and np.allclose(probs.sum(-1), 1, atol=1e-5)


@pytest.mark.slow
def test_trainer_lora_trains_only_adapters_and_head(tmp_path):
    c = _cfg(steps=8, peft=dict(method="lora", rank=4, alpha=8.0, targets=(r"layers/attn/(q|v)_proj/kernel",),
                                 train_patterns=()), lr=1e-2)
    cw = np.array([0.5, 1.0, 2.0])
    (res, _), mcfg, _ = _train(c, tmp_path, loss="weighted", class_weight=cw)
    from ftjax.peft import core
    trainable = jax.tree_util.tree_flatten_with_path(res.state.params)[0]
    paths = {core.path_str(p) for p, _ in trainable}
    assert {"cls_head/kernel", "cls_head/bias"} <= paths
    assert all(p.startswith("cls_head/") or "lora" in p.lower() or p.endswith(("/a", "/b"))
               for p in paths), paths
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    # the frozen backbone is bit-identical to its initialisation
    from ftjax.train.run import initial_params
    init = initial_params(c, mcfg)()
    frozen = res.params["layers"]["mlp"]
    assert all(np.array_equal(np.asarray(core.materialize(a)), np.asarray(b))
               for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(init["layers"]["mlp"])))


@pytest.mark.slow
def test_trainer_resume_equals_uninterrupted(tmp_path):
    c = _cfg(steps=5)
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    (full, _), _, _ = _train(c, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(c, tmp_path / "b", crash_after=3)
    (resumed, _), _, _ = _train(c, tmp_path / "b")
    assert resumed.resumed_from == 2
    ref = {h["step"]: h["loss"] for h in full.history}
    got = {h["step"]: h["loss"] for h in resumed.history}
    assert sorted(got) == [3, 4, 5]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_loss_weights_follow_class_list_order():
    k = ml_collections.ConfigDict(dict(loss="weighted", class_weights="inverse", beta=0.999,
                                       focal_alpha="none"))
    classes = ["math", "date", "fact"]
    counts = np.array([60, 30, 10])
    cw, alpha = classify.loss_weights(k, counts, classes)
    assert alpha is None and np.allclose(cw, 100 / (3 * counts))
    k.loss, k.focal_alpha = "focal", "class_weights"
    cw2, alpha2 = classify.loss_weights(k, counts, classes)
    assert cw2 is None and np.allclose(alpha2, cw)
    k.loss, k.focal_alpha = "ce", "none"
    assert classify.loss_weights(k, counts, classes) == (None, None)
    with pytest.raises(ValueError, match="classify.loss='hinge'"):
        classify_head.classify_loss(None, "hinge")


def test_config_typed_args():
    from configs import classify_file
    c = classify_file.get_config("loss=focal,gamma=1.5,sampling=oversample,peft=lora")
    assert c.trainer == "classify" and c.classify.loss == "focal" and c.classify.gamma == 1.5
    assert c.data.imbalance.oversample == "balanced" and c.data.packing == "none"
    assert c.peft.method == "lora"
    with pytest.raises(ValueError, match="sampling"):
        classify_file.get_config("sampling=smote")


@pytest.mark.slow
def test_cli_classify_on_shipped_sample(tmp_path):
    from ftjax import main
    wd = tmp_path / "run"
    out = main.main(["--config", "configs/classify_file.py:steps=30,loss=weighted",
                     "--workdir", str(wd), "--config.train.progress=False",
                     "--config.train.eval_every=30", "--config.train.checkpoint_every=0",
                     "--config.train.tensorboard=False"])
    m = out["metrics"]["validation"]
    assert m["n"] == 80 and m["accuracy"] > 0.9
    assert len(out["class_weight"]) == 4
    saved = json.load(open(wd / "summary.json"))
    assert saved["metrics"]["validation"]["confusion_matrix"] == m["confusion_matrix"]
    rep = json.load(open(wd / "data_report.json"))
    assert rep["labels"]["train"] == {"math": 160, "date": 80, "word": 48, "fact": 32}
