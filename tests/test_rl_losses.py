"""`ftjax.align.rl`: closed forms on hand-made inputs, and parity with TRL 1.16's own code.

Parity tests run TRL's code unchanged on fixed random inputs (torch CPU, float64):

* RewardTrainer.compute_loss, KTOTrainer._compute_loss, GRPOTrainer._compute_loss and
  RLOOTrainer._compute_loss on trainer objects made with `__new__` (no model, data or
  accelerator), holding just the attributes those methods read; a stub model, or a stubbed
  `_get_per_token_logps_and_entropies`, hands them fixed log-probs that require grad, so the
  gradients are compared as well as the losses.
* The GRPO and RLOO advantages live in the middle of `_generate_and_score_completions`, which
  generates text first. The tests cut the advantage lines out of the installed method's
  source (from `unscorable_mask = ...` to `advantages = torch.nan_to_num(...)`) and execute
  them on fixed rewards, so the code is TRL's own text rather than a copy; a change of TRL
  that moves those markers makes the tests fail loudly rather than compare with nothing.

PPO is not in TRL 1.16, so its functions are checked against numpy loops written from the
published formulas.
"""
from __future__ import annotations

import collections
import inspect
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trl import GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer
from trl.trainer import grpo_trainer, rloo_trainer

from ftjax.align import rl

TOL = dict(rtol=1e-5, atol=1e-5)


def np32(x):
    return np.asarray(x, np.float32)


def random_mask(rng, b, t, empty_row=False):
    lengths = rng.integers(1, t + 1, b)
    if empty_row:
        lengths[1] = 0
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------

def test_bradley_terry_closed_form():
    rc, rr, m = np.array([1.0, -0.5, 2.0]), np.array([0.0, 0.5, 3.0]), np.array([0.5, 0.0, -1.0])
    got = np.asarray(rl.bradley_terry(rc, rr, m, center_coef=0.01))
    want = np.log1p(np.exp(-(rc - rr - m))) + 0.01 * (rc + rr) ** 2
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(np.asarray(rl.bradley_terry(rc, rr)),
                               np.log1p(np.exp(-(rc - rr))), **TOL)


def test_grpo_on_policy_closed_form_and_gradient():
    """old_logps None, β 0: ρ = 1, so the grpo loss is -mean(A) and d loss/d logp_it is
    -A_i / (n_i B) on masked tokens, 0 elsewhere."""
    rng = np.random.default_rng(0)
    b, t = 5, 7
    mask = random_mask(rng, b, t)
    logps = -rng.uniform(0.1, 3.0, (b, t)) * mask
    adv = rng.normal(size=b)

    def loss_fn(lp, m):
        per_tok, _ = rl.grpo_per_token_loss(lp, None, None, adv, m)
        return rl.aggregate(per_tok, m, "grpo")

    loss, grad = jax.value_and_grad(loss_fn)(np32(logps), np32(mask))
    np.testing.assert_allclose(float(loss), -adv.mean(), **TOL)
    want_grad = -adv[:, None] / (mask.sum(1, keepdims=True) * b) * mask
    np.testing.assert_allclose(np.asarray(grad), want_grad, **TOL)
    assert np.abs(np.asarray(grad)).sum() > 0

    # A row without completion tokens contributes 0 to the mean over all B rows (as in TRL).
    mask[1] = 0
    loss = loss_fn(np32(logps), np32(mask))
    np.testing.assert_allclose(float(loss), -(adv.sum() - adv[1]) / b, **TOL)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_grpo_clip_boundary(eps_low, eps_high):
    """Ratio at 1+ε_high with A > 0: loss -(1+ε_high)A; beyond it the loss is flat (gradient
    0). Below 1-ε_low with A < 0: flat at -(1-ε_low)A. Beyond 1+ε_high with A < 0 the
    unclipped (larger) term stays and so does its gradient."""
    mask = np.ones((4, 1), np.float32)
    old = np.zeros((4, 1), np.float32)
    logps = np32(np.log([[1 + eps_high], [1.5 + eps_high], [0.5 - eps_low], [1.5 + eps_high]]))
    adv = np32([2.0, 2.0, -3.0, -3.0])

    def per_row(lp):
        loss, _ = rl.grpo_per_token_loss(lp, old, None, adv, mask, eps_low, eps_high)
        return loss[:, 0]

    loss = np.asarray(per_row(logps))
    np.testing.assert_allclose(loss[:3], [-(1 + eps_high) * 2, -(1 + eps_high) * 2,
                                          (1 - eps_low) * 3], **TOL)
    np.testing.assert_allclose(loss[3], (1.5 + eps_high) * 3, **TOL)
    jac = np.asarray(jax.jacobian(lambda lp: per_row(lp).sum())(logps))[:, 0]
    np.testing.assert_allclose(jac[1:3], 0.0, atol=1e-7)
    np.testing.assert_allclose(jac[3], (1.5 + eps_high) * 3, **TOL)  # d(-ρA)/dlogp = -ρA
    _, stats = rl.grpo_per_token_loss(logps, old, None, adv, mask, eps_low, eps_high)
    assert float(stats["clip_high"]) == 0.25 and float(stats["clip_low"]) == 0.25
    assert float(stats["clip_region"]) == 0.5


def test_grpo_delta_caps_unclipped_term():
    mask, old = np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32)
    logps, adv = np32(np.log([[3.0], [0.5]])), np32([-1.0, -1.0])
    loss, _ = rl.grpo_per_token_loss(logps, old, None, adv, mask, 0.2, 0.2, delta=2.0)
    # row 0: -min(min(3,2)·(-1), 1.2·(-1)) = 2; row 1: -min(0.5·(-1), 0.8·(-1)) = 0.8
    np.testing.assert_allclose(np.asarray(loss)[:, 0], [2.0, 0.8], **TOL)


def test_kto_policy_equals_reference():
    """r = 0 and a zero KL baseline: every loss is weight · (1 - σ(0)) = weight / 2."""
    lp = np32([-3.0, -1.0, -2.0, -5.0])
    desirable = np.array([True, False, True, False])
    valid = np32([1, 1, 1, 1])
    for loss_type in rl.KTO_LOSS_TYPES:
        losses, z0, rewards = rl.kto_losses(lp, lp, lp[::-1], lp[::-1], desirable, valid,
                                            beta=0.3, desirable_weight=1.5,
                                            undesirable_weight=0.7, loss_type=loss_type)
        np.testing.assert_allclose(np.asarray(losses), [0.75, 0.35, 0.75, 0.35], **TOL)
        assert float(z0) == 0.0 and np.all(np.asarray(rewards) == 0)


def test_kto_kl_baseline_is_clamped_and_ignores_padding():
    rng = np.random.default_rng(1)
    pol, ref = rng.normal(-5, 1, 6), rng.normal(-5, 1, 6)
    klp, klr = rng.normal(-5, 1, 6), rng.normal(-5, 1, 6)
    desirable = np.array([1, 0, 1, 1, 0, 0], bool)
    valid = np.array([1, 1, 1, 1, 0, 0], np.float64)
    klp[4:] = 1e3  # padding rows must not enter the KL mean
    klr[:4] = klp[:4] - np.array([1.0, 2.0, 3.0, 0.5])  # mean KL 1.625 > 0
    beta = 0.2
    losses, z0, rewards = rl.kto_losses(pol, ref, klp, klr, desirable, valid, beta=beta)
    np.testing.assert_allclose(float(z0), 1.625, **TOL)
    r = pol - ref
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = np.where(desirable, 1 - sig(beta * (r - 1.625)), 1 - sig(beta * (1.625 - r))) * valid
    np.testing.assert_allclose(np.asarray(losses), want, **TOL)
    np.testing.assert_allclose(np.asarray(rewards), beta * r, **TOL)
    _, z0, _ = rl.kto_losses(pol, ref, klr, klp, desirable, valid, beta=beta)  # mean KL < 0
    assert float(z0) == 0.0
    # z0 carries no gradient: d loss / d kl_policy_logps = 0
    g = jax.grad(lambda k: rl.kto_losses(pol, ref, k, klr, desirable, valid)[0].sum())(np32(klp))
    assert np.all(np.asarray(g) == 0)


def test_group_advantages_closed_form():
    r = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    g = r.reshape(2, 3)
    dev = (g - g.mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(np.asarray(rl.group_advantages(r, 3, "none")), dev, **TOL)
    np.testing.assert_allclose(np.asarray(rl.group_advantages(r, 3, "group")),
                               dev / (np.repeat(g.std(1, ddof=1), 3) + 1e-4), **TOL)
    np.testing.assert_allclose(np.asarray(rl.group_advantages(r, 3, "batch")),
                               dev / (r.std(ddof=1) + 1e-4), **TOL)
    # equal rewards in a group: advantage 0, not NaN
    assert np.all(np.asarray(rl.group_advantages(np.ones(4), 2)) == 0)


def test_rloo_leave_one_out_by_hand():
    r = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    want = np.array([1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 25.0, 20 - 20.0, 30 - 15.0])
    np.testing.assert_allclose(np.asarray(rl.rloo_advantages(r, 3)), want, **TOL)
    norm = (want - want.mean()) / (want.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(np.asarray(rl.rloo_advantages(r, 3, normalize=True)), norm, **TOL)


def test_kl_estimators():
    lp, ref = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -1.0, -0.5])
    d = ref - lp
    np.testing.assert_allclose(np.asarray(rl.kl_k3(lp, ref)), np.exp(d) - d - 1, **TOL)
    np.testing.assert_allclose(np.asarray(rl.kl_k1(lp, ref)), lp - ref, **TOL)
    assert np.all(np.asarray(rl.kl_k3(lp, ref)) >= 0)


# --------------------------------------------------------------------------------------------
# PPO against numpy loops of the published formulas
# --------------------------------------------------------------------------------------------

def test_ppo_rewards():
    rng = np.random.default_rng(2)
    mask = random_mask(rng, 4, 6, empty_row=True)
    kl, score = rng.normal(size=(4, 6)), rng.normal(size=4)
    want = -0.05 * kl * mask
    for i in range(4):
        n = int(mask[i].sum())
        if n:
            want[i, n - 1] += score[i]
    np.testing.assert_allclose(np.asarray(rl.ppo_rewards(score, kl, mask, 0.05)), want, **TOL)


def test_gae_matches_numpy_loop():
    rng = np.random.default_rng(3)
    b, t, gamma, lam = 4, 9, 0.99, 0.9
    mask = random_mask(rng, b, t)
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    adv_want, ret_want = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for s in reversed(range(n)):
            v_next = values[i, s + 1] if s + 1 < n else 0.0
            delta = rewards[i, s] + gamma * v_next - values[i, s]
            last = delta + gamma * lam * last
            adv_want[i, s] = last
            ret_want[i, s] = last + values[i, s]
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), adv_want, **TOL)
    np.testing.assert_allclose(np.asarray(ret), ret_want, **TOL)


def test_whiten():
    rng = np.random.default_rng(4)
    mask = random_mask(rng, 3, 8)
    x = rng.normal(3.0, 2.0, (3, 8))
    m = mask > 0
    w = np.asarray(rl.whiten(x, mask))
    assert abs(w[m].mean()) < 1e-5
    np.testing.assert_allclose(w[m].var(ddof=1), 1.0, rtol=1e-4)
    want = (x - x[m].mean()) / np.sqrt(x[m].var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w, want, **TOL)
    np.testing.assert_allclose(np.asarray(rl.whiten(x, mask, shift_mean=False)),
                               want + x[m].mean(), **TOL)


def test_ppo_policy_and_value_losses():
    rng = np.random.default_rng(5)
    b, t = 4, 6
    mask = random_mask(rng, b, t)
    m = mask > 0
    logps, old = -rng.uniform(0.1, 2, (b, t)), -rng.uniform(0.1, 2, (b, t))
    adv = rng.normal(size=(b, t))
    ratio = np.exp(logps - old)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    loss, frac = rl.ppo_policy_loss(logps, old, adv, mask, 0.2)
    np.testing.assert_allclose(float(loss), np.maximum(pg1, pg2)[m].mean(), **TOL)
    np.testing.assert_allclose(float(frac), (pg2 > pg1)[m].mean(), **TOL)
    assert 0 < float(frac) < 1

    v, v_old, ret = rng.normal(size=(b, t)), rng.normal(size=(b, t)), rng.normal(size=(b, t))
    vc = v_old + np.clip(v - v_old, -0.2, 0.2)
    vf1, vf2 = (v - ret) ** 2, (vc - ret) ** 2
    loss, frac = rl.ppo_value_loss(v, v_old, ret, mask, 0.2)
    np.testing.assert_allclose(float(loss), 0.5 * np.maximum(vf1, vf2)[m].mean(), **TOL)
    np.testing.assert_allclose(float(frac), (vf2 > vf1)[m].mean(), **TOL)


def test_functions_jit():
    rng = np.random.default_rng(6)
    mask = np32(random_mask(rng, 4, 5))
    lp = np32(-rng.uniform(0.1, 2, (4, 5)))
    f = jax.jit(lambda lp, ref, a, m: rl.aggregate(
        rl.grpo_per_token_loss(lp, None, ref, a, m, beta=0.1)[0], m, "dapo"))
    assert np.isfinite(float(f(lp, lp - 0.1, np32(rng.normal(size=4)), mask)))
    g = jax.jit(lambda r: rl.group_advantages(r, 2, "batch"))
    assert g(np32(rng.normal(size=4))).shape == (4,)
    h = jax.jit(lambda r, v, m: rl.gae(r, v, m))
    assert h(lp, lp, mask)[0].shape == (4, 5)


@pytest.mark.parametrize("call,match", [
    (lambda: rl.group_advantages(np.zeros(6), 4), "does not divide"),
    (lambda: rl.group_advantages(np.zeros(6), 3, "std"), r"choose from \['group', 'batch', 'none'\]"),
    (lambda: rl.group_advantages(np.zeros((2, 3)), 3), "1-D"),
    (lambda: rl.rloo_advantages(np.zeros(4), 1), ">= 2"),
    (lambda: rl.aggregate(np.zeros((2, 3)), np.ones((2, 3)), "ppo"), "grpo.loss_type"),
    (lambda: rl.aggregate(np.zeros((2, 3)), np.ones((2, 3)), "dr_grpo"), "max_completion_length"),
    (lambda: rl.grpo_per_token_loss(np.zeros((2, 3)), None, None, np.zeros(2), np.ones((2, 3)),
                                    epsilon_low=-0.1), "epsilon_low"),
    (lambda: rl.grpo_per_token_loss(np.zeros((2, 3)), None, None, np.zeros(2), np.ones((2, 3)),
                                    epsilon_high=-0.1), "epsilon_high"),
    (lambda: rl.grpo_per_token_loss(np.zeros((2, 3)), None, None, np.zeros(2), np.ones((2, 3)),
                                    beta=0.1), "needs ref_logps"),
    (lambda: rl.grpo_per_token_loss(np.zeros((2, 3)), None, None, np.zeros(2), np.ones((2, 3)),
                                    importance_level="seq"), "importance_sampling_level"),
    (lambda: rl.grpo_per_token_loss(np.zeros((2, 3)), np.zeros((2, 4)), None, np.zeros(2),
                                    np.ones((2, 3))), "one shape"),
    (lambda: rl.kto_losses(np.zeros(2), np.zeros(2), None, None, np.ones(2, bool), np.ones(2)),
     "kl_policy_logps"),
    (lambda: rl.kto_losses(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.ones(2, bool),
                           np.ones(2), loss_type="bco"), r"choose from \['kto', 'apo_zero_unpaired'\]"),
    (lambda: rl.rloo_loss(np.zeros(2), None, np.zeros(2), np.ones(2), epsilon_low=-1), "epsilon_low"),
    (lambda: rl.ppo_policy_loss(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)),
                                np.ones((1, 2)), cliprange=-0.1), "cliprange"),
    (lambda: rl.gae(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), gamma=1.5), "gamma"),
])
def test_bad_settings_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# Parity with TRL 1.16
# --------------------------------------------------------------------------------------------


def _accelerator():
    ident = lambda x, **_: x
    return types.SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident,
                                 reduce=ident, num_processes=1, process_index=0,
                                 sync_gradients=True)


def _metrics():
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


def _trainer(cls, **attrs):
    trainer = cls.__new__(cls)  # no __init__: no model, data or accelerator
    trainer.__dict__.update(accelerator=_accelerator(), _metrics=_metrics(),
                            _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, **attrs)
    return trainer


@pytest.mark.parametrize("margin,coef", [(False, None), (True, None), (True, 0.01),
                                         (False, 0.3)])
def test_bradley_terry_equals_trl_reward_trainer(margin, coef):
    rng = np.random.default_rng(10)
    b = 9
    rc, rr, m = rng.normal(size=b), rng.normal(size=b), rng.uniform(0, 1, b)
    logits = torch.tensor(np.r_[rc, rr])[:, None]
    model = lambda **_: types.SimpleNamespace(logits=logits)
    model.training = True
    trainer = _trainer(RewardTrainer, model=model,
                       args=types.SimpleNamespace(center_rewards_coefficient=coef))
    inputs = {"input_ids": torch.zeros(2 * b, 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * b, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = torch.tensor(m)
    want = float(trainer.compute_loss(model, inputs))
    got = rl.bradley_terry(rc, rr, m if margin else None, center_coef=coef or 0.0)
    np.testing.assert_allclose(float(jnp.mean(got)), want, **TOL)


def _trl_kto(loss_type, pol, ref, klp, klr, desirable, beta, wd, wu):
    """TRL's KTO loss, z0 and gradient wrt the policy log-probs; the stub model puts each
    example's summed log-prob on its first completion position (a sum is all TRL reads)."""
    b, width = len(pol), 4
    pol_t = torch.tensor(pol, requires_grad=True)

    def model(input_ids, **_):
        kl = input_ids.shape[1] == width + 1  # the KL sequences are one token wider here
        lp = torch.tensor(klp) if kl else pol_t
        n = input_ids.shape[1] - 1
        return types.SimpleNamespace(log_probs=F.pad(lp[:, None], (0, n - 1)),
                                     entropy=torch.zeros(b, n), mean_logits=torch.zeros(b, n))
    model.training = True
    trainer = _trainer(KTOTrainer, model=model, precompute_ref_logps=True,
                       calculate_KL=loss_type == "kto", loss_type=loss_type, beta=beta,
                       desirable_weight=wd, undesirable_weight=wu)
    inputs = {"input_ids": torch.zeros(b, width, dtype=torch.long),
              "attention_mask": torch.ones(b, width, dtype=torch.long),
              "completion_mask": torch.ones(b, width, dtype=torch.long),
              "label": torch.tensor(desirable), "ref_logps": torch.tensor(ref)}
    if loss_type == "kto":
        inputs.update(KL_input_ids=torch.zeros(b, width + 1, dtype=torch.long),
                      KL_attention_mask=torch.ones(b, width + 1, dtype=torch.long),
                      KL_completion_mask=torch.ones(b, width + 1, dtype=torch.long),
                      ref_KL_logps=torch.tensor(klr))
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return float(loss.detach()), trainer._metrics["train"]["kl"][-1], pol_t.grad.numpy()


@pytest.mark.parametrize("loss_type", rl.KTO_LOSS_TYPES)
@pytest.mark.parametrize("seed,beta,wd,wu,kl_shift", [(0, 0.1, 1.0, 1.0, 2.0),
                                                      (1, 0.5, 1.3, 0.8, -3.0),
                                                      (2, 1.0, 1.0, 1.33, 0.5)])
def test_kto_equals_trl(loss_type, seed, beta, wd, wu, kl_shift):
    rng = np.random.default_rng(20 + seed)
    b = 8
    pol, ref = rng.normal(-20, 3, b), rng.normal(-20, 3, b)
    klr = rng.normal(-20, 3, b)
    klp = klr + kl_shift + rng.normal(0, 1, b)  # kl_shift < 0: TRL clamps z0 at 0
    desirable = rng.random(b) < 0.5
    desirable[:2] = [True, False]
    want, want_z0, want_grad = _trl_kto(loss_type, pol, ref, klp, klr, desirable, beta, wd, wu)

    valid = np.ones(b, np.float32)
    fn = lambda p: rl.kto_losses(p, ref, klp, klr, desirable, valid, beta, wd, wu, loss_type)
    losses, z0, _ = fn(np32(pol))
    mean = lambda p: jnp.sum(fn(p)[0]) / jnp.sum(valid)
    np.testing.assert_allclose(float(jnp.sum(losses) / valid.sum()), want, **TOL)
    np.testing.assert_allclose(float(z0), want_z0, **TOL)
    np.testing.assert_allclose(np.asarray(jax.grad(mean)(np32(pol))), want_grad, **TOL)

    # Padding rows (valid 0) change neither the loss mean nor z0.
    pad = lambda x, v: np.r_[x, np.full(3, v, np.asarray(x).dtype)]
    losses_p, z0_p, _ = rl.kto_losses(pad(pol, -1.0), pad(ref, -9.0), pad(klp, 50.0),
                                      pad(klr, -50.0), pad(desirable, True), pad(valid, 0.0),
                                      beta, wd, wu, loss_type)
    np.testing.assert_allclose(float(jnp.sum(losses_p) / b), want, **TOL)
    np.testing.assert_allclose(float(z0_p), want_z0, **TOL)


def _trl_advantage_code(cls):
    """The advantage lines of `cls._generate_and_score_completions`, compiled from the
    installed TRL source (see the module docstring)."""
    lines = textwrap.dedent(inspect.getsource(cls._generate_and_score_completions)).splitlines()
    start = [i for i, l in enumerate(lines) if "unscorable_mask = torch.isnan(rewards_per_func)" in l]
    end = [i for i, l in enumerate(lines) if "advantages = torch.nan_to_num(advantages, nan=0.0)" in l]
    assert len(start) == 1 and len(end) == 1 and start[0] < end[0], \
        f"TRL's {cls.__name__} advantage code moved; update the markers of this test"
    body = textwrap.dedent("\n".join(lines[start[0]:end[0] + 1]))
    return compile(body, f"<{cls.__name__}._generate_and_score_completions advantages>", "exec")


def _run_trl_advantages(cls, module, rewards, num_generations, local=None, **attrs):
    """Runs TRL's advantage lines with `self` holding `attrs`, one reward function of weight 1
    and `local` as further local variables; `gather` is the identity (one process)."""
    scope = dict(vars(module))
    scope.update(self=types.SimpleNamespace(reward_weights=torch.ones(1, dtype=torch.float64),
                                            **attrs),
                 rewards_per_func=torch.tensor(rewards)[:, None], device="cpu",
                 num_generations=num_generations, gather=lambda x: x, **(local or {}))
    exec(_trl_advantage_code(cls), scope)
    return scope["advantages"].numpy()


@pytest.mark.parametrize("scale", rl.SCALE_REWARDS)
@pytest.mark.parametrize("g", [2, 4, 8])
def test_group_advantages_equal_trl(scale, g):
    rng = np.random.default_rng(30 + g)
    rewards = rng.normal(size=4 * g) * 2.0
    rewards[:g] = 1.5  # a group with zero std
    want = _run_trl_advantages(GRPOTrainer, grpo_trainer, rewards, g, scale_rewards=scale,
                               multi_objective_aggregation="sum_then_normalize")
    np.testing.assert_allclose(np.asarray(rl.group_advantages(rewards, g, scale)), want, **TOL)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("g,beta", [(2, 0.0), (4, 0.0), (3, 0.05)])
def test_rloo_advantages_equal_trl(normalize, g, beta):
    rng = np.random.default_rng(40 + g)
    n, t = 3 * g, 5
    rewards = rng.normal(size=n)
    mask = random_mask(rng, n, t)
    old, ref = -rng.uniform(0.1, 2, (n, t)), -rng.uniform(0.1, 2, (n, t))
    local = dict(old_per_token_logps=torch.tensor(old), ref_per_token_logps=torch.tensor(ref),
                 completion_mask=torch.tensor(mask))
    want = _run_trl_advantages(RLOOTrainer, rloo_trainer, rewards, g, local, beta=beta,
                               reward_clip_range=None, normalize_advantages=normalize)
    if beta:
        rewards = rl.sequence_kl_rewards(rewards, old, ref, mask, beta)
    got = rl.rloo_advantages(rewards, g, normalize=normalize)
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


def _grpo_inputs(rng, b=6, t=7):
    mask = random_mask(rng, b, t, empty_row=True)
    logps = -rng.uniform(0.05, 3.0, (b, t)) * mask
    old = logps + rng.normal(0, 0.3, (b, t)) * mask  # enough drift for clipping on both sides
    ref = logps + rng.normal(0, 0.5, (b, t)) * mask
    adv = rng.normal(size=b)
    return logps, old, ref, adv, mask


def _trl_grpo(loss_type, logps, old, ref, adv, mask, beta, eps_low, eps_high, delta, level,
              bias_kl, max_len):
    b, t = logps.shape
    lp = torch.tensor(logps, requires_grad=True)
    model = types.SimpleNamespace(training=True)
    trainer = _trainer(
        GRPOTrainer, model=model, loss_type=loss_type, beta=beta, epsilon_low=eps_low,
        epsilon_high=eps_high, importance_sampling_level=level, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta,
                                   steps_per_generation=1))
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros(b, t), None)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long),
              "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long),
              "advantages": torch.tensor(adv), "ref_per_token_logps": torch.tensor(ref),
              "num_items_in_batch": torch.tensor(float(mask.sum()))}
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


GRPO_CASES = {  # beta, eps_low, eps_high, delta, importance level, bias-corrected KL, old logps
    "on_policy": (0.0, 0.2, 0.2, None, "token", False, False),
    "off_policy": (0.0, 0.2, 0.2, None, "token", False, True),
    "kl_dapo_eps": (0.04, 0.2, 0.28, None, "token", False, True),
    "kl_bias_corrected": (0.1, 0.2, 0.28, None, "token", True, True),
    "delta": (0.04, 0.15, 0.25, 1.1, "token", False, True),
    "delta_kl_bias_corrected": (0.1, 0.2, 0.28, 1.1, "token", True, True),  # KL·ρ before the cap
    "gspo_sequence": (0.1, 0.03, 0.04, None, "sequence", True, True),
    "on_policy_kl": (0.05, 0.2, 0.2, None, "token", False, False),
}


@pytest.mark.parametrize("case", GRPO_CASES)
@pytest.mark.parametrize("loss_type", rl.GRPO_LOSS_TYPES)
def test_grpo_equals_trl(loss_type, case):
    beta, eps_low, eps_high, delta, level, bias_kl, off_policy = GRPO_CASES[case]
    rng = np.random.default_rng(50 + list(GRPO_CASES).index(case))
    logps, old, ref, adv, mask = _grpo_inputs(rng)
    old = old if off_policy else None
    max_len = logps.shape[1] + 3
    want, want_grad, metrics = _trl_grpo(loss_type, logps, old, ref, adv, mask, beta, eps_low,
                                         eps_high, delta, level, bias_kl, max_len)

    def loss_fn(lp):
        per_tok, _ = rl.grpo_per_token_loss(
            lp, None if old is None else np32(old), np32(ref) if beta else None, np32(adv),
            np32(mask), eps_low, eps_high, beta, delta, level, bias_kl)
        return rl.aggregate(per_tok, np32(mask), loss_type, max_completion_length=max_len)

    got, grad = jax.value_and_grad(loss_fn)(np32(logps))
    stats = jax.tree.map(float, rl.grpo_per_token_loss(
        np32(logps), None if old is None else np32(old), np32(ref) if beta else None, np32(adv),
        np32(mask), eps_low, eps_high, beta, delta, level, bias_kl)[1])
    np.testing.assert_allclose(float(got), want, **TOL)
    np.testing.assert_allclose(np.asarray(grad), want_grad, **TOL)
    for ours, theirs in [("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                         ("clip_region", "clip_ratio/region_mean")]:
        np.testing.assert_allclose(stats[ours], metrics[theirs], **TOL)
    if beta:
        np.testing.assert_allclose(stats["kl"], metrics["kl"], **TOL)
    if off_policy and level == "token":
        assert metrics["clip_ratio/region_mean"] > 0  # the inputs do exercise clipping


def test_grpo_dapo_divides_by_num_items():
    """dapo divides by TRL's num_items_in_batch (the window's tokens), not this batch's."""
    rng = np.random.default_rng(60)
    logps, old, ref, adv, mask = _grpo_inputs(rng)
    per_tok, _ = rl.grpo_per_token_loss(logps, old, None, adv, mask)
    n = 3.0 * mask.sum()
    got = rl.aggregate(per_tok, mask, "dapo", num_items=n)
    np.testing.assert_allclose(float(got), float(rl.aggregate(per_tok, mask, "bnpo")) / 3, **TOL)


@pytest.mark.parametrize("seed,eps_low,eps_high", [(0, 0.2, 0.2), (1, 0.2, 0.28), (2, 0.1, 0.3)])
def test_rloo_loss_equals_trl(seed, eps_low, eps_high):
    rng = np.random.default_rng(70 + seed)
    b, t = 8, 6
    mask = random_mask(rng, b, t)
    logps = -rng.uniform(0.05, 1.0, (b, t)) * mask
    old_seq = (logps * mask).sum(1) + rng.normal(0, 0.3, b)
    adv = rng.normal(size=b)
    lp = torch.tensor(logps, requires_grad=True)
    model = types.SimpleNamespace(training=True)
    trainer = _trainer(RLOOTrainer, model=model, epsilon_low=eps_low, epsilon_high=eps_high)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros(b, t), None)
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long),
              "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.long),
              "old_logps": torch.tensor(old_seq), "advantages": torch.tensor(adv)}
    want = trainer._compute_loss(model, inputs)
    want.backward()
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0

    valid = np.ones(b, np.float32)

    def loss_fn(lp_):
        seq = jnp.sum(lp_ * np32(mask), -1)
        return jnp.sum(rl.rloo_loss(seq, old_seq, adv, valid, eps_low, eps_high)) / valid.sum()

    got, grad = jax.value_and_grad(loss_fn)(np32(logps))
    np.testing.assert_allclose(float(got), float(want.detach()), **TOL)
    np.testing.assert_allclose(np.asarray(grad), lp.grad.numpy(), **TOL)
