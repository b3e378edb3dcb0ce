"""Loss-curve diagnosis (train/curves.py) on synthetic curves, and the loop's best checkpoint,
early stopping on a chosen metric and restore_best on tiny runs."""
import json

import jax
import numpy as np
import pytest

from ftjax import models, monitor
from ftjax.io.checkpoint import Checkpointer
from ftjax.train import curves, loop
from ftjax.train.run import Run
from ftjax.train.step import sft_loss
from tests.test_train import _CrashAfter, _loader, model_cfg_of, tiny_config


# -- synthetic curves -------------------------------------------------------------------------

def healthy(n=300, seed=0, eval_every=10):
    """A noisy exponential decay (train rows) and a validation loss tracking it."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    smooth = 1.5 + 2.5 * np.exp(-t / 120)
    train = smooth + rng.normal(0, 0.02, n)
    evals = [(int(i), float(smooth[i] + 0.15 + rng.normal(0, 0.01)))
             for i in range(eval_every - 1, n, eval_every)]
    return train, evals


def feed(doctor, train, evals=(), grad_norm=None):
    """Feeds rows (steps 1..n) and evaluations (at row index i); returns all warnings."""
    ev = dict(evals)
    out = []
    for i, loss in enumerate(train):
        row = {"step": i + 1, "loss": float(loss)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm[i])
        out += doctor.observe_train(row)
        if i in ev:
            out += doctor.observe_eval({"step": i + 1, "eval_loss": ev[i], "eval_accuracy": 0.5})
    return out


def kinds(ws):
    return [w.kind for w in ws]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_curve_gives_no_warning(seed):
    train, evals = healthy(seed=seed)
    assert feed(curves.CurveDoctor(), train, evals) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_per_step_noisy_curve_gives_no_warning(seed):
    # log_every=1: per-step noise of 2% of the loss.
    rng = np.random.default_rng(seed)
    t = np.arange(400)
    train = (1.2 + 3.0 * np.exp(-t / 150)) * (1 + rng.normal(0, 0.02, t.size))
    assert feed(curves.CurveDoctor(), train) == []
    # Noisier steps (5%) are never taken for a too-high learning rate or a spike (with a
    # 50-row window the plateau estimate is then noisy too: docs/monitoring.md).
    train = (1.2 + 3.0 * np.exp(-t / 150)) * (1 + rng.normal(0, 0.05, t.size))
    assert not {"lr_too_high", "divergence"} & set(kinds(feed(curves.CurveDoctor(), train)))


def test_spike_fires_once_per_episode():
    train, evals = healthy()
    train = train.copy()
    train[150:153] = 4 * train[149]          # one episode of three rows
    train[220] = 5 * train[219]              # a second, later episode
    gn = np.ones_like(train)
    gn[150] = 40.0
    ws = feed(curves.CurveDoctor(), train, evals, grad_norm=gn)
    assert kinds(ws) == ["divergence", "divergence"]
    assert [w.step for w in ws] == [151, 221]
    assert "x the median" in ws[0].message and "grad_norm 40" in ws[0].message


def test_small_absolute_spike_is_ignored():
    # A memorised run: losses near 0 may triple without meaning anything (diagnose_floor).
    train = np.full(100, 0.01)
    train[60] = 0.04
    assert "divergence" not in kinds(feed(curves.CurveDoctor(), train))


def test_non_finite_loss_is_divergence():
    train, _ = healthy(50)
    ws = feed(curves.CurveDoctor(), list(train) + [float("nan"), float("inf")])
    assert kinds(ws) == ["divergence"] and ws[0].step == 51 and "nan" in ws[0].message


def test_overfitting_fires_after_n_rising_evals():
    train, _ = healthy()
    # Validation tracks train until row 149, then rises 0.02 per evaluation.
    low = 1.7 + 2.5 * np.exp(-149 / 120)
    evals = [(i, 1.7 + 2.5 * np.exp(-i / 120) if i < 150 else low + 0.02 * (i - 149) / 10)
             for i in range(9, 300, 10)]
    ws = feed(curves.CurveDoctor(overfit_evals=3), train, evals)
    assert kinds(ws) == ["overfitting"]
    # The first rising evaluation is row 159; the third in a row is row 179 (step 180).
    assert ws[0].step == 180 and "3 consecutive evaluations" in ws[0].message
    # N is configurable.
    assert [w.step for w in feed(curves.CurveDoctor(overfit_evals=5), train, evals)] == [200]


def test_overfitting_needs_the_train_loss_to_fall():
    # Both rise: that is not overfitting (divergence of everything), so no overfitting warning.
    n = 200
    train = 1.0 + 0.001 * np.arange(n)
    evals = [(i, 1.2 + 0.002 * i) for i in range(9, n, 10)]
    assert "overfitting" not in kinds(feed(curves.CurveDoctor(), train, evals))


def test_plateau_fires_once_and_again_after_recovery():
    rng = np.random.default_rng(0)
    t = np.arange(150)
    fall = 1.0 + 2.0 * np.exp(-t / 20)                          # converges to 1.0
    flat = np.full(150, 1.0)
    second = 1.0 - 0.5 * (1 - np.exp(-np.arange(100) / 15))    # a new descent, then flat
    train = np.concatenate([fall, flat, second, np.full(150, 0.5)])
    train = train + rng.normal(0, 0.003, train.size)
    ws = feed(curves.CurveDoctor(), train)
    assert kinds(ws) == ["plateau", "plateau"]
    assert 100 < ws[0].step < 300 and ws[1].step > 400
    assert "less than plateau_tol" in ws[0].message


def test_lr_too_high_fires_on_oscillation_without_progress():
    rng = np.random.default_rng(0)
    n = 120
    warm = 4.0 - 0.03 * np.arange(20)                          # a healthy start
    osc = 3.0 + (-1.0) ** np.arange(n) * rng.uniform(0.5, 1.0, n)   # std/mean ~0.25
    ws = feed(curves.CurveDoctor(plateau_window=200), np.concatenate([warm, osc]))
    assert kinds(ws) == ["lr_too_high"]
    assert "flip sign" in ws[0].message
    # The same oscillation on a clearly falling trend is not flagged.
    falling = np.linspace(6.0, 1.0, n) + 0.3 * (-1.0) ** np.arange(n)
    assert "lr_too_high" not in kinds(feed(curves.CurveDoctor(), falling))


def test_sign_change_fraction():
    assert curves.sign_change_fraction([1, 2, 3, 4]) == 0.0
    assert curves.sign_change_fraction([1, 2, 1, 2, 1]) == 1.0


def test_from_config_reads_train_section():
    c = tiny_config(spike_factor=5.0, overfit_evals=7, diagnose_floor=0.0)
    d = curves.CurveDoctor.from_config(c.train)
    assert (d.spike_factor, d.overfit_evals, d.floor) == (5.0, 7, 0.0)
    assert set(curves.DEFAULTS) <= set(loop.DEFAULTS)


def test_metric_writer_event_and_progress_write(tmp_path, capsys):
    w = monitor.MetricWriter(tmp_path, tensorboard=False)
    w.write(3, {"loss": 1.0})
    w.event(3, "plateau", "no progress", prefix="train_warning")
    w.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[1]["split"] == "train_warning" and rows[1]["kind"] == "plateau"
    assert rows[1]["message"] == "no progress" and rows[1]["step"] == 3
    monitor.Progress(10, enabled=False).write("a note")
    assert capsys.readouterr().out == "a note\n"


def test_metric_mode():
    assert loop.metric_mode("eval_loss") == "min"
    assert loop.metric_mode("eval_perplexity") == "min"
    assert loop.metric_mode("eval_exact_match") == "max"
    assert loop.metric_mode("eval_loss", "max") == "max"
    with pytest.raises(ValueError, match="best_mode"):
        loop.metric_mode("x", "up")


# -- the loop: best checkpoint, early stopping on it, restore_best -----------------------------

# A metric that peaks at step 6: with patience 3 the run stops at step 12.
SCORES = {2: 0.1, 4: 0.3, 6: 0.7, 8: 0.5, 10: 0.4, 12: 0.6, 14: 0.2, 16: 0.9, 18: 0.1, 20: 0.1}


def _scripted(seen):
    def on_eval(step, params):
        seen[step] = jax.device_get(params)  # host copies: the state's buffers are donated
        return {"eval_score": SCORES[step]}
    return on_eval


def _run(c, workdir, it, on_eval):
    mcfg = model_cfg_of(c)
    return loop.train(Run.of(c, str(workdir), model_cfg=mcfg,
                             init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0))),
                      sft_loss(mcfg), it, on_eval=on_eval)


def _assert_same_params(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_best_checkpoint_early_stopping_and_restore(tmp_path, capsys):
    # plateau_tol=10 makes every window a "plateau": one warning row (an episode, not spam).
    c = tiny_config(steps=20, eval_every=2, early_stopping_patience=3, best_metric="eval_score",
                    plateau_window=4, plateau_tol=10.0)
    seen = {}
    res = _run(c, tmp_path, _loader(c), _scripted(seen))
    want = {"step": 6, "metric": "eval_score", "value": 0.7, "mode": "max"}
    assert res.best == want
    assert res.stopped_early and sorted(seen) == [2, 4, 6, 8, 10, 12]
    assert Checkpointer(tmp_path).latest_step() == 12          # the last step, for resume
    best = loop.BestCheckpointer(tmp_path)
    assert best.all_steps() == [6] and best.record() == want
    assert int(res.state.step) == 6
    _assert_same_params(res.params, seen[6])
    # The returned state keeps the training state's shardings.
    mcfg = model_cfg_of(c)
    run = Run.of(c, str(tmp_path), model_cfg=mcfg,
                 init_params=lambda: models.init(mcfg, jax.random.PRNGKey(0)))
    want_sh = jax.tree.leaves(loop.step_setup(run).state_shardings.params)
    got_sh = [x.sharding for x in jax.tree.leaves(res.state.params)]
    assert len(got_sh) == len(want_sh) and all(g == w for g, w in zip(got_sh, want_sh))
    out = capsys.readouterr().out
    assert "returning the params of step 6, not of the last step 12" in out
    assert "early stopping at step 12: eval_score" in out
    assert "warning at step 4 (plateau)" in out
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    warn = [r for r in rows if r["split"] == "train_warning"]
    assert [(r["step"], r["kind"]) for r in warn] == [(4, "plateau")]
    assert res.warnings == [{"kind": "plateau", "step": 4, "message": warn[0]["message"]}]


def test_best_record_and_early_stopping_survive_resume(tmp_path):
    c = tiny_config(steps=20, eval_every=2, checkpoint_every=4, early_stopping_patience=3,
                    best_metric="eval_score")
    first = {}
    with pytest.raises(KeyboardInterrupt):   # preempted in step 10: best 6, checkpoint 8
        _run(c, tmp_path, _CrashAfter(_loader(c), 9), _scripted(first))
    assert loop.BestCheckpointer(tmp_path).all_steps() == [6]
    seen = {}
    res = _run(c, tmp_path, _loader(c), _scripted(seen))
    assert res.resumed_from == 8 and sorted(seen) == [10, 12]
    # The record and the patience count came back: it stops at 12 as an uninterrupted run
    # does, and returns the params the first attempt saved at step 6.
    assert res.best == {"step": 6, "metric": "eval_score", "value": 0.7, "mode": "max"}
    assert res.stopped_early and Checkpointer(tmp_path).latest_step() == 12
    _assert_same_params(res.params, first[6])
    # Running again in the finished workdir trains nothing and returns the same best.
    again = _run(c, tmp_path, _loader(c), _scripted({}))
    assert again.stopped_early and again.best == res.best and again.history == []
    _assert_same_params(again.params, first[6])


def test_best_metric_needs_evaluations(tmp_path):
    c = tiny_config(steps=4, best_metric="eval_loss")
    with pytest.raises(ValueError, match="needs evaluations"):
        _run(c, tmp_path, _loader(c), None)
