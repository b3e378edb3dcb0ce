"""Trainer "grpo": Group Relative Policy Optimization (Shao et al., 2024) with verifiable
rewards, any PEFT method.

Each rollout samples `group_size` completions for `prompts_per_step` training prompts of the
synthetic suite (`trainers/_rollout.py`), scores them with the reward functions (shipped:
"exact" — exact match with the reference answer — and "format"), and turns the weighted sum into
group-normalised advantages (`align.rl.group_advantages`: scale_rewards group | batch | none,
the last being Dr. GRPO). The objective is TRL's (`align.pg.grpo_loss`): clipped importance
ratio (epsilon_low / epsilon_high, optional delta cap, token or sequence level), `num_iterations`
optimizer steps per rollout, k3 KL to the reference with `beta` (0: no reference pass), and the
aggregations grpo | bnpo | dr_grpo | dapo. Held-out exact match (greedy) before and after.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ftjax import data as ftdata
from ftjax.align import pg, reference, rl
from ftjax.eval.harness import exact_match_eval
from ftjax.train.run import Run
from ftjax.trainers._rollout import Rollouts

DEFAULTS = {"grpo": dict(
    prompts_per_step=8, group_size=8,   # train.batch_size = prompts_per_step * group_size
    max_new_tokens=16, temperature=1.0, top_k=0,
    reward_funcs=("exact", "format"), reward_weights=(1.0, 0.2),
    scale_rewards="group",              # group | batch | none (Dr. GRPO)
    loss_type="dapo",                   # grpo | bnpo | dr_grpo | dapo
    beta=0.0,                           # k3 KL to the reference; 0 = no reference pass
    epsilon_low=0.2, epsilon_high=0.2,  # DAPO recommends epsilon_high 0.28
    delta=0.0,                          # > 0 caps the ratio from above (INTELLECT-2); 0 = off
    importance_sampling_level="token",  # token | sequence (GSPO)
    use_bias_correction_kl=False,
    num_iterations=1,                   # passes over each generation (mu)
    num_mini_batches=1,                 # optimizer steps per pass: prompts_per_step *
                                        # group_size = train.batch_size * num_mini_batches
    reference="auto",                   # auto | strip | copy (used when beta > 0)
    long_prompts="refuse",              # refuse | truncate prompts over the rollout budget
)}
CHECKS = {"grpo": dict(prompts_per_step=">= 1", group_size=">= 2", max_new_tokens=">= 1",
                       temperature=">= 0", top_k=">= 0", beta=">= 0", epsilon_low=">= 0",
                       epsilon_high=">= 0", delta=">= 0", num_iterations=">= 1",
                       num_mini_batches=">= 1",
                       scale_rewards=rl.SCALE_REWARDS, loss_type=rl.GRPO_LOSS_TYPES,
                       importance_sampling_level=rl.IMPORTANCE_LEVELS,
                       long_prompts=("refuse", "truncate"),
                       reference=("auto", "strip", "copy"))}


class GRPORollouts(Rollouts):
    def finish(self, batch, rewards, extras):
        adv = rl.group_advantages(jnp.asarray(rewards, jnp.float32), self.group,
                                  str(self.s.scale_rewards))
        batch["advantages"] = np.asarray(adv, np.float32)[:, None]
        return batch


def check_cycle(cfg: Any, iters: int, name: str) -> None:
    every = int(cfg.train.checkpoint_every)
    if iters > 1 and every and every % iters:
        raise ValueError(f"train.checkpoint_every={every} must be a multiple of the {iters} "
                         f"optimizer steps of one generation ({name}.num_iterations x "
                         f"num_mini_batches; ppo: num_ppo_epochs x num_mini_batches): a run "
                         "resumes at a rollout boundary")


def reference_mode(r: Run, mode: str, name: str) -> str:
    """strip (adapters: the base is the reference) or copy (a frozen starting copy)."""
    safe, why = reference.strip_safe(r.abstract_params, r.method.train_patterns,
                                     r.cfg.get("peft"))
    if mode == "strip" and not safe:
        raise ValueError(f"{name}.reference='strip' would not give the starting model: {why}; "
                         "use copy (or auto)")
    return mode if mode != "auto" else ("strip" if safe else "copy")


def synthetic_examples(cfg: Any) -> tuple[list[dict], list[dict]]:
    d = cfg.data
    train, test = [], []
    for task in d.tasks:
        tr, te = ftdata.make_splits(task, int(d.n_per_task), int(d.seed), float(d.test_frac))
        train, test = train + tr, test + te
    return train, test[:int(d.eval_examples)]


def held_out_score(r: Run, held_out, max_new: int):
    def score(params) -> float:
        return exact_match_eval(params, r.model_cfg, r.tokenizer, held_out,
                                max_new_tokens=max_new, apply_fn=r.method.apply_fn,
                                placement=r.placement)["exact_match"]
    return score


def run(cfg: Any, workdir: str) -> dict:
    s = cfg.grpo
    iters = int(s.num_iterations) * int(s.num_mini_batches)
    check_cycle(cfg, iters, "grpo")
    r = Run.build(cfg, workdir, name="grpo")
    r.check_exportable()
    train_ex, held_out = synthetic_examples(cfg)
    beta = float(s.beta)
    mode = reference_mode(r, str(s.reference), "grpo") if beta > 0 else None
    ref_params = r.starting_params() if mode == "copy" else None
    settings = pg.GRPOSettings(loss_type=str(s.loss_type), beta=beta,
                               epsilon_low=float(s.epsilon_low),
                               epsilon_high=float(s.epsilon_high),
                               delta=float(s.delta) or None,
                               importance_level=str(s.importance_sampling_level),
                               bias_correction_kl=bool(s.use_bias_correction_kl),
                               max_completion_length=int(s.max_new_tokens),
                               off_policy=iters > 1, temperature=float(s.temperature))
    producer = GRPORollouts(r, train_ex, s, name="grpo", reference=mode, ref_params=ref_params,
                            old_logps=iters > 1)
    loss_fn = pg.grpo_loss(r.model_cfg, settings, r.method.apply_fn, r.method.bind_rng)
    return train_on_rollouts(r, "grpo", producer, loss_fn, held_out, ref_params,
                             {"loss_type": settings.loss_type, "beta": beta, "reference": mode,
                              "steps_per_generation": iters})


def train_on_rollouts(r: Run, name: str, producer: Rollouts, loss_fn, held_out, ref_params,
                      info: dict) -> dict:
    """What GRPO and RLOO share around `Run.train`: held-out exact match (greedy) before and
    after, the KL to the starting policy at the end, and summary.json (with `info`)."""
    score = held_out_score(r, held_out, int(r.cfg.data.max_new_tokens))
    before = score(r.starting_params())
    print(f"[{name}] held-out exact match before: {before:.3f} over {len(held_out)} prompts; "
          + ", ".join(f"{k}={v}" for k, v in info.items()))
    result = r.train(loss_fn, producer)
    after = score(result.params)
    start_copy = ref_params if ref_params is not None else (
        None if reference.strip_safe(r.abstract_params, r.method.train_patterns,
                                     r.cfg.get("peft"))[0] else r.starting_params())
    kl = producer.kl_to_start(result.params, held_out, start_copy)
    del start_copy
    h = producer.history
    print(f"[{name}] held-out exact match {before:.3f} -> {after:.3f}; mean reward "
          f"{np.mean([x['reward'] for x in h[:5]]):.3f} (first 5 rollouts) -> "
          f"{np.mean([x['reward'] for x in h[-5:]]):.3f} (last 5); KL to the start "
          f"{kl['kl_per_completion']:.3f} per completion ({kl['kl_per_token']:.4f} per token)")
    summary = {"trainer": name, "exact_match_before": before, "exact_match_after": after,
               "kl_to_start": kl, "n_eval": len(held_out), "rollouts": h, **info,
               "kl_last": result.history[-1].get("kl") if result.history else None,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "wall_s": result.wall_s, "resumed_from": result.resumed_from,
               "exported_hf_dir": r.export_hf(result.params)}
    r.write_summary(summary)
    return summary
