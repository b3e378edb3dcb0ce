"""Trainer "ppo": RLHF with PPO (Ouyang et al., 2022; the survey's §6.8) against a learned
reward model, any PEFT method.

The reward model is a transformers `*ForSequenceClassification` directory with one label (what
the "reward" trainer exports; `ppo.reward_model`), scoring (prompt, completion) pairs through
`train.reward_model.RewardModel`. The policy carries a value head (`value`: a scalar per token
on its final hidden state, like TRL's legacy value-head model; it trains with the policy and is
not exported). Each rollout (`trainers/_rollout.py`): sample one completion per prompt, score
it (minus `missing_eos_penalty` when it never ended), per-token rewards
r_t = -kl_coef * KL_t (k1 against the reference) with the score added at the last completion
token (`align.rl.ppo_rewards`), GAE(gamma, lam) with the sampling policy's values
(`align.rl.gae`), advantages whitened over the whole generation. `num_ppo_epochs` passes over
it, each in `num_mini_batches` optimizer steps, on the clipped policy loss + vf_coef x the
clipped value loss (`align.pg.ppo_loss`).
Held-out: the reward model's mean score of greedy completions on held-out prompts, before and
after, and the KL of the last rollouts.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from ftjax.align import pg, rl
from ftjax.infer.generate import generate_text
from ftjax.models.heads import value_head
from ftjax.train.reward_model import RewardModel
from ftjax.train.run import Run, gather, model_config, resolve_path
from ftjax.trainers._rollout import RewardError, Rollouts
from ftjax.trainers.grpo import check_cycle, reference_mode, synthetic_examples

DEFAULTS = {"ppo": dict(
    reward_model="",            # a *ForSequenceClassification directory (trainer "reward")
    prompts_per_step=64, group_size=1,   # train.batch_size = prompts_per_step * group_size
    max_new_tokens=16, temperature=1.0, top_k=0,
    kl_coef=0.05,               # per-token k1 KL penalty folded into the reward
    missing_eos_penalty=1.0,    # subtracted from the score of a completion without eos
    gamma=1.0, lam=0.95,
    whiten_rewards=False,       # scale the per-token rewards to unit variance before GAE
    cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
    num_ppo_epochs=4,           # passes over each generation
    num_mini_batches=1,         # optimizer steps per pass (prompts_per_step * group_size =
                                # train.batch_size * num_mini_batches)
    reference="auto",           # auto | strip | copy
    long_prompts="refuse",
    value_std=0.02,
)}
CHECKS = {"ppo": dict(prompts_per_step=">= 1", group_size=">= 1", max_new_tokens=">= 1",
                      temperature=">= 0", top_k=">= 0", kl_coef=">= 0",
                      missing_eos_penalty=">= 0", gamma="in [0, 1]", lam="in [0, 1]",
                      cliprange="> 0", cliprange_value="> 0", vf_coef=">= 0",
                      num_ppo_epochs=">= 1", num_mini_batches=">= 1",
                      reference=("auto", "strip", "copy"),
                      long_prompts=("refuse", "truncate"), value_std="> 0")}


class PPORollouts(Rollouts):
    def __init__(self, run, examples, s, reward_model: RewardModel, **kw):
        self.rm = reward_model
        super().__init__(run, examples, s, name="ppo", epochs=int(s.num_ppo_epochs), **kw)

    wants_hidden = True   # the values come from the old-log-prob forward

    def from_hidden(self, params, hidden):
        return {"values": pg.token_values(params, hidden)}

    def score(self, examples, texts, finished):
        scores = self.rm.score([(ex["prompt"], t) for ex, t in zip(examples, texts)])
        scores = scores.astype(np.float64)
        bad = ~np.isfinite(scores)
        if bad.any():
            raise RewardError(f"[ppo] the reward model returned {scores[bad][0]} for "
                              f"{int(bad.sum())} completions (e.g. {texts[int(np.argmax(bad))]!r})")
        penalised = scores - float(self.s.missing_eos_penalty) * (~finished)
        return penalised, {"model": scores}

    def finish(self, batch, rewards, extras):
        s = self.s
        mask = jnp.asarray(batch["loss_mask"])
        kl = rl.kl_k1(jnp.asarray(batch["old_logps"]), jnp.asarray(batch["ref_logps"])) * mask
        r = rl.ppo_rewards(jnp.asarray(rewards, jnp.float32), kl, mask, float(s.kl_coef))
        if bool(s.whiten_rewards):
            r = rl.whiten(r, mask, shift_mean=False)
        values = jnp.asarray(extras["values"]) * mask
        adv, ret = rl.gae(r, values, mask, float(s.gamma), float(s.lam))
        adv = rl.whiten(adv, mask) * mask
        batch.update(advantages=np.asarray(adv, np.float32),
                     returns=np.asarray(ret, np.float32),
                     old_values=np.asarray(values, np.float32))
        seq_kl = np.asarray(jnp.sum(kl, -1))
        extras["metrics"] = {"kl": float(seq_kl.mean()),
                             "non_score_reward": float(-float(s.kl_coef) * seq_kl.mean()),
                             "score": float(np.mean(rewards))}
        return batch


def run(cfg: Any, workdir: str) -> dict:
    s = cfg.ppo
    iters = int(s.num_ppo_epochs) * int(s.num_mini_batches)
    check_cycle(cfg, iters, "ppo")
    if not s.reward_model:
        raise ValueError("ppo.reward_model is empty: name a *ForSequenceClassification directory "
                         "(e.g. the reward trainer's <workdir>/reward_model)")
    rm_dir = resolve_path(str(s.reward_model), "ppo.reward_model")
    if not os.path.isdir(rm_dir):
        raise FileNotFoundError(f"ppo.reward_model={s.reward_model!r}: no directory {rm_dir}; "
                                "train one with the 'reward' trainer first")
    rm = RewardModel.from_pretrained(rm_dir, batch_size=int(cfg.train.batch_size))
    mcfg = model_config(cfg.model)
    r = Run.build(cfg, workdir, name="ppo", model_cfg=mcfg,
                  add_params=value_head(mcfg.hidden_size, float(s.value_std)))
    r.check_exportable()
    train_ex, held_out = synthetic_examples(cfg)
    mode = reference_mode(r, str(s.reference), "ppo")
    ref_params = r.starting_params() if mode == "copy" else None
    max_new = int(cfg.data.max_new_tokens)

    def held_out_score(params) -> tuple[float, float]:
        """(mean reward-model score, exact match) of greedy completions to held-out prompts."""
        p = gather(params)
        texts = generate_text({k: v for k, v in p.items() if k != "value"}, r.model_cfg,
                              r.tokenizer, [e["prompt"] for e in held_out],
                              max_new_tokens=max_new, apply_fn=r.method.apply_fn)
        score = float(np.mean(rm.score([(e["prompt"], t) for e, t in zip(held_out, texts)])))
        return score, float(np.mean([t.strip() == e["answer"].strip()
                                     for e, t in zip(held_out, texts)]))

    before, em_before = held_out_score(r.starting_params())
    print(f"[ppo] held-out reward-model score before: {before:.3f} (exact match {em_before:.3f})"
          f" over {len(held_out)} prompts; reference={mode}, kl_coef={s.kl_coef}, "
          f"optimizer steps per generation={iters}")
    producer = PPORollouts(r, train_ex, s, rm, reference=mode, ref_params=ref_params,
                           old_logps=True)
    settings = pg.PPOSettings(float(s.cliprange), float(s.cliprange_value), float(s.vf_coef),
                              float(s.temperature))
    result = r.train(pg.ppo_loss(r.model_cfg, settings, r.method.apply_fn, r.method.bind_rng),
                     producer)
    after, em_after = held_out_score(result.params)
    h = producer.history
    print(f"[ppo] held-out reward-model score {before:.3f} -> {after:.3f}, exact match "
          f"{em_before:.3f} -> {em_after:.3f}; KL per completion "
          f"{np.mean([x['kl'] for x in h[-5:]]):.3f} (last 5 rollouts)")
    summary = {"trainer": "ppo", "reward_model": rm_dir, "score_before": before,
               "score_after": after, "exact_match_before": em_before,
               "exact_match_after": em_after, "n_eval": len(held_out), "rollouts": h,
               "kl_last": float(np.mean([x["kl"] for x in h[-5:]])) if h else None,
               "reference": mode,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "wall_s": result.wall_s, "resumed_from": result.resumed_from,
               "exported_hf_dir": _export(r, result.params)}
    r.write_summary(summary)
    return summary


def _export(r: Run, params) -> str | None:
    """The policy (value head dropped) as a causal LM, when export.hf_dir is set."""
    if not r.cfg.get("export", {}).get("hf_dir", ""):
        return None
    return r.export_hf({k: v for k, v in gather(params).items() if k != "value"})
