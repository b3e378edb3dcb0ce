"""The reward-model objective: Bradley-Terry over preference pairs, as a `loss_fn` for the loop.

The model is the causal LM with a scalar `score` head on each row's last real token
(`models.heads`): transformers' `*ForSequenceClassification` with one label. Batch: the
preference layout (`chosen_inputs`, `chosen_segment_ids`, `chosen_positions`, the same with
`rejected_`; row i of both is one pair), optionally `margin` [B] or [B, 1] per pair. Both halves
run in one forward. Loss per pair: `align.rl.bradley_terry` (optional margin, reward
centering); the loss returns sums over real pairs and `stats["tokens"]` = the pair count, so
the step's division gives TRL RewardTrainer's means.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from ftjax.align.rl import bradley_terry
from ftjax.models.config import ModelConfig
from ftjax.models.heads import sequence_scores
from ftjax.models.moe import add_moe_losses

HALF_KEYS = ("inputs", "segment_ids", "positions")


def check_batch(batch: dict) -> None:
    need = [f"{h}_{k}" for h in ("chosen", "rejected") for k in HALF_KEYS]
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"reward-model batch lacks {missing}; it has {sorted(batch)}. The "
                         "reward trainer reads preference pairs (chosen_*/rejected_* halves)")


def pair_scores(params, model_cfg: ModelConfig, batch: dict, apply_fn=None, **apply_kw):
    """(chosen [B], rejected [B], forward aux) scores of a preference batch, one forward."""
    b = batch["chosen_inputs"].shape[0]
    cat = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
           for k in HALF_KEYS}
    scores, aux = sequence_scores(params, model_cfg, cat["inputs"], cat["segment_ids"],
                                  cat["positions"], apply_fn, **apply_kw)
    return scores[:b], scores[b:], aux


def reward_loss(model_cfg: ModelConfig, center_coef: float = 0.0, apply_fn=None,
                bind_rng=None):
    """`loss_fn(params, batch, rng) -> (summed objective, summed stats)`.

    Stats (sums over real pairs; the loop divides by `tokens`): `nll` (the objective, logged
    as loss), `correct` (pairwise accuracy: chosen scored above rejected), `margin`
    (r_c - r_r), `rewards_chosen`, `rewards_rejected`, `reward_ties`."""
    if not center_coef >= 0:
        raise ValueError(f"reward.center_rewards_coefficient={center_coef} must be >= 0")
    jitter = model_cfg.num_experts > 0 and model_cfg.router_jitter > 0

    def loss_fn(params, batch, rng):
        check_batch(batch)
        p = params if (bind_rng is None or rng is None) else bind_rng(params, rng)
        kw = {"rng": jax.random.fold_in(rng, 1)} if jitter and rng is not None else {}
        rc, rr, aux = pair_scores(p, model_cfg, batch, apply_fn, **kw)
        valid = ((batch["chosen_segment_ids"] != 0).any(-1)
                 & (batch["rejected_segment_ids"] != 0).any(-1)).astype(jnp.float32)
        margin = batch.get("margin")
        margin = None if margin is None else margin.reshape(-1).astype(jnp.float32)
        per_pair = bradley_terry(rc, rr, margin, center_coef)
        vsum = lambda x: jnp.sum(x * valid)
        objective = vsum(per_pair)
        rc_, rr_ = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        stats = {"nll": jax.lax.stop_gradient(objective), "tokens": jnp.sum(valid),
                 "correct": vsum((rc_ > rr_).astype(jnp.float32)),
                 "reward_ties": vsum((rc_ == rr_).astype(jnp.float32)),
                 "margin": vsum(rc_ - rr_), "rewards_chosen": vsum(rc_),
                 "rewards_rejected": vsum(rr_)}
        return add_moe_losses(objective, stats, aux, model_cfg)

    return loss_fn
