"""DPO-family losses against TRL's own code: `trl.DPOTrainer._compute_loss` (TRL 1.16.0, pinned
in requirements-dev.txt) run on random summed log-probs. A stub model hands TRL per-token
log-probs that sum to them and the reference log-probs come "precomputed", so everything from
the log-probs to the loss is TRL's code, unchanged."""
from __future__ import annotations

import collections
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl import DPOTrainer

from ftjax.align import dpo

# Loss types ftjax and TRL share (TRL's `aot`/`aot_unpaired` sort the batch; ftjax has neither).
SHARED = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "apo_zero", "apo_down",
          "bco_pair", "nca_pair", "sppo_hard", "exo_pair", "discopop", "sft")


def trl_loss(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, tau):
    """TRL's mean loss for pairs with summed log-probs pc/pr (policy), rc/rr (reference) over
    nc/nr completion tokens."""
    b, t = len(pc), int(max(nc.max(), nr.max())) + 1
    mask = torch.zeros(2 * b, t, dtype=torch.long)      # batch is [chosen..., rejected...]
    per_token = torch.zeros(2 * b, t - 1, dtype=torch.float64)
    for i, (n, lp) in enumerate(zip(np.r_[nc, nr].astype(int), np.r_[pc, pr])):
        mask[i, 1:1 + n] = 1                             # token 0 is the prompt
        per_token[i, :n] = lp / n
    out = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * b, t - 1),
                                mean_logits=torch.zeros(2 * b, t - 1),
                                is_top1=torch.zeros(2 * b, t - 1, dtype=torch.bool))

    def model(**_):
        return out
    model.training = True
    trainer = DPOTrainer.__new__(DPOTrainer)  # no __init__: no model, data or accelerator
    trainer.__dict__.update(
        model=model, args=types.SimpleNamespace(discopop_tau=tau),
        accelerator=types.SimpleNamespace(device="cpu", gather=lambda x: x,
                                          gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=eps, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": collections.defaultdict(list)})
    inputs = {"input_ids": torch.zeros(2 * b, t, dtype=torch.long),
              "attention_mask": torch.ones(2 * b, t, dtype=torch.long), "completion_mask": mask,
              "ref_chosen_logps": torch.tensor(rc), "ref_rejected_logps": torch.tensor(rr)}
    return float(trainer._compute_loss(model, inputs, False))


def ftjax_loss(loss_type, pc, pr, rc, rr, nc, nr, beta, eps, tau):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    nll = -pc.sum() / nc.sum()  # the token mean over the batch's chosen completions
    pairs = dpo.Pairs(f32(pc), f32(pr), f32(nc), f32(nr), f32(rc), f32(rr), f32(nll))
    losses = dpo.per_type_losses(pairs, (loss_type,), beta, eps, simpo_gamma=0.5,
                                 discopop_tau=tau)
    return float(np.mean(np.asarray(losses[loss_type])))


def random_pairs(seed, b=16):
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 12, b).astype(np.float64)
    nr = rng.integers(1, 12, b).astype(np.float64)
    pc, pr = -nc * rng.uniform(0.05, 3.0, b), -nr * rng.uniform(0.05, 3.0, b)
    return pc, pr, pc + rng.normal(0, 2.0, b), pr + rng.normal(0, 2.0, b), nc, nr


@pytest.mark.parametrize("loss_type", SHARED)
def test_losses_equal_trl(loss_type):
    assert loss_type in dpo.LOSS_TYPES
    for seed, (beta, eps, tau) in enumerate([(0.1, 0.1, 0.05), (0.5, 0.2, 0.5),
                                             (2.0, 0.3, 0.05)]):
        if loss_type == "sigmoid":
            eps = 0.0  # TRL's sigmoid ignores label smoothing: see the next test
        x = random_pairs(seed)
        want = trl_loss(loss_type, *x, beta, eps, tau)
        got = ftjax_loss(loss_type, *x, beta, eps, tau)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), (beta, eps)


def test_trl_sigmoid_ignores_label_smoothing_and_robust_does_not():
    """The differences docs/alignment.md names: TRL's `sigmoid` is plain DPO whatever ε is
    (ftjax's is cDPO), while TRL's `robust` uses ε exactly as ftjax's does."""
    x = random_pairs(7)
    plain = ftjax_loss("sigmoid", *x, 0.5, 0.0, 0.05)
    assert trl_loss("sigmoid", *x, 0.5, 0.2, 0.05) == pytest.approx(plain, rel=1e-6)
    assert abs(ftjax_loss("sigmoid", *x, 0.5, 0.2, 0.05) - plain) > 1e-2
    robust = trl_loss("robust", *x, 0.5, 0.2, 0.05)
    assert abs(robust - plain) > 1e-2
    assert ftjax_loss("robust", *x, 0.5, 0.2, 0.05) == pytest.approx(robust, rel=1e-6)
