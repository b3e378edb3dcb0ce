"""On-policy objectives (GRPO, RLOO, PPO) as `loss_fn(params, batch, rng)` for the loop.

A rollout batch (made by the trainers' rollout producer, `trainers/_rollout.py`) is the
causal-LM layout over prompt + sampled completion (`inputs`, `targets`, `loss_mask` on the
completion tokens, `segment_ids`, `positions`) plus, per row or per token:
  advantages [B, 1] (GRPO, RLOO) or [B, T] (PPO, over target positions),
  old_logps [B, T]  the sampling policy's log-probs of the targets (num_iterations > 1, PPO),
  ref_logps [B, T]  the reference's (GRPO with beta > 0),
  returns, old_values [B, T] (PPO).
The pure math is `align.rl`; here it meets the forward pass and the step's convention: the
loss returns a sum and `stats["tokens"]` such that sum / tokens is the aggregation asked for.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from ftjax import models
from ftjax.align import rl
from ftjax.align.logps import token_logps
from ftjax.models.config import ModelConfig
from ftjax.models.heads import VALUE, backbone
from ftjax.models.moe import add_moe_losses


def sampling_logps(logits, targets, temperature: float):
    """log-probs of the targets under the distribution the sampler drew from: logits divided by
    the sampling temperature (as TRL's trainers compute them); temperature 0 (greedy) or 1
    leaves them unchanged."""
    t = float(temperature)
    return token_logps(logits if t in (0.0, 1.0) else logits.astype(jnp.float32) / t, targets)


def _policy_logps(params, model_cfg, batch, apply_fn, bind_rng, rng, hidden=False,
                  temperature: float = 1.0):
    policy = params if (bind_rng is None or rng is None) else bind_rng(params, rng)
    jitter = model_cfg.num_experts > 0 and model_cfg.router_jitter > 0
    kw = {"rng": jax.random.fold_in(rng, 1)} if jitter and rng is not None else {}
    apply_fn = apply_fn or models.apply
    logits, aux = apply_fn(backbone(policy), model_cfg, batch["inputs"],
                           positions=batch["positions"], segment_ids=batch["segment_ids"],
                           return_hidden=hidden, **kw)
    return sampling_logps(logits, batch["targets"], temperature), aux


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    importance_level: str = "token"
    bias_correction_kl: bool = False
    max_completion_length: int = 16
    off_policy: bool = False      # num_iterations > 1: the batch carries old_logps
    temperature: float = 1.0      # the sampling temperature (log-probs of what was sampled)


def grpo_loss(model_cfg: ModelConfig, s: GRPOSettings, apply_fn=None, bind_rng=None):
    """GRPO (`rl.grpo_per_token_loss`, aggregated by `s.loss_type` as TRL): grpo = mean over
    sequences of the per-sequence token mean; bnpo / dapo = token mean over the batch (dapo's
    normaliser is the active tokens of the whole accumulated batch, which the step's division
    gives); dr_grpo = sum / (B * max_completion_length)."""
    if s.loss_type not in rl.GRPO_LOSS_TYPES:
        raise ValueError(f"grpo.loss_type={s.loss_type!r}: choose one of {rl.GRPO_LOSS_TYPES}")

    def loss_fn(params, batch, rng):
        lp, aux = _policy_logps(params, model_cfg, batch, apply_fn, bind_rng, rng,
                                   temperature=s.temperature)
        mask = batch["loss_mask"].astype(jnp.float32)
        old = batch["old_logps"] if s.off_policy else None
        ref = batch["ref_logps"] if s.beta > 0 or "ref_logps" in batch else None
        adv = batch["advantages"].reshape(-1)
        per_tok, st = rl.grpo_per_token_loss(lp, old, ref, adv, mask, s.epsilon_low,
                                             s.epsilon_high, s.beta, s.delta,
                                             s.importance_level, s.bias_correction_kl)
        masked = per_tok * mask
        n_tok = jnp.sum(mask)
        lengths = jnp.sum(mask, -1)
        rows = (lengths > 0).astype(jnp.float32)
        b = jnp.asarray(mask.shape[0], jnp.float32)
        if s.loss_type == "grpo":
            objective = jnp.sum(jnp.sum(masked, -1) / jnp.maximum(lengths, 1.0))
            norm = b
        elif s.loss_type == "dr_grpo":
            objective = jnp.sum(masked) / float(s.max_completion_length)
            norm = b
        else:   # bnpo, dapo
            objective, norm = jnp.sum(masked), n_tok
        stats = {"nll": jax.lax.stop_gradient(objective), "tokens": norm,
                 "clip_low": st["clip_low"] * norm, "clip_high": st["clip_high"] * norm,
                 "clip_region": st["clip_region"] * norm,
                 "completion_length": jnp.sum(lengths) / jnp.maximum(jnp.sum(rows), 1.0) * norm,
                 "advantage_abs": jnp.sum(jnp.abs(adv) * rows) / jnp.maximum(jnp.sum(rows), 1.)
                 * norm}
        if "kl" in st:
            stats["kl"] = st["kl"] * norm
        return add_moe_losses(objective, stats, aux, model_cfg)

    return loss_fn


@dataclasses.dataclass(frozen=True)
class RLOOSettings:
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    off_policy: bool = False
    temperature: float = 1.0


def rloo_loss(model_cfg: ModelConfig, s: RLOOSettings, apply_fn=None, bind_rng=None):
    """RLOO (`rl.rloo_loss`: sequence-level clipped ratio; the KL is already in the rewards,
    hence in the advantages): the mean over the rows with a completion."""
    def loss_fn(params, batch, rng):
        lp, aux = _policy_logps(params, model_cfg, batch, apply_fn, bind_rng, rng,
                                   temperature=s.temperature)
        mask = batch["loss_mask"].astype(jnp.float32)
        seq = jnp.sum(lp * mask, -1)
        old = jnp.sum(batch["old_logps"] * mask, -1) if s.off_policy else None
        valid = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
        adv = batch["advantages"].reshape(-1)
        per_seq = rl.rloo_loss(seq, old, adv, valid, s.epsilon_low, s.epsilon_high)
        n = jnp.sum(valid)
        objective = jnp.sum(per_seq)
        ratio = jnp.exp(seq - (jax.lax.stop_gradient(seq) if old is None else old))
        clipped = ((ratio < 1 - s.epsilon_low) | (ratio > 1 + s.epsilon_high)) * valid
        stats = {"nll": jax.lax.stop_gradient(objective), "tokens": n,
                 "clip_region": jax.lax.stop_gradient(jnp.sum(clipped)),
                 "completion_length": jnp.sum(mask)}
        return add_moe_losses(objective, stats, aux, model_cfg)

    return loss_fn




@dataclasses.dataclass(frozen=True)
class PPOSettings:
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    temperature: float = 1.0


def token_values(params, hidden):
    """[B, T] values from the policy's final hidden states through the value head. The
    hidden states are detached: the value loss trains the head only, so a badly scaled return
    never pulls the policy's shared layers (the value head reads the policy's features)."""
    h = jax.lax.stop_gradient(hidden.astype(jnp.float32))
    return (h @ params[VALUE]["kernel"].astype(jnp.float32))[..., 0]


def ppo_loss(model_cfg: ModelConfig, s: PPOSettings, apply_fn=None, bind_rng=None):
    """PPO: `rl.ppo_policy_loss` + vf_coef * `rl.ppo_value_loss`, both masked means over the
    completion tokens (positions of `loss_mask`); the value head reads the policy's hidden
    state at each input position, which predicts the return from its target token on."""
    def loss_fn(params, batch, rng):
        lp, aux = _policy_logps(params, model_cfg, batch, apply_fn, bind_rng, rng,
                                   hidden=True, temperature=s.temperature)
        values = token_values(params, aux["hidden"])
        mask = batch["loss_mask"].astype(jnp.float32)
        pg, pg_clip = rl.ppo_policy_loss(lp, batch["old_logps"], batch["advantages"], mask,
                                         s.cliprange)
        vf, vf_clip = rl.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                        s.cliprange_value)
        n = jnp.sum(mask)
        objective = (pg + s.vf_coef * vf) * n
        stats = {"nll": jax.lax.stop_gradient(objective), "tokens": n,
                 "policy_loss": jax.lax.stop_gradient(pg) * n,
                 "value_loss": jax.lax.stop_gradient(vf) * n,
                 "clipfrac": pg_clip * n, "value_clipfrac": vf_clip * n,
                 "approx_kl": 0.5 * jnp.sum(jnp.square(lp - batch["old_logps"]) * mask)}
        return add_moe_losses(objective, stats, aux, model_cfg)

    return loss_fn


__all__ = ["GRPOSettings", "RLOOSettings", "PPOSettings", "grpo_loss", "rloo_loss",
           "ppo_loss", "token_values", "sampling_logps"]
