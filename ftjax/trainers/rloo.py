"""Trainer "rloo": REINFORCE Leave-One-Out (Ahmadian et al., 2024) on the GRPO rollout
machinery, any PEFT method.

Per prompt, `group_size` (>= 2) samples; each sample's reward (the weighted reward functions,
minus beta times its summed k1 KL to the reference, as TRL puts the KL into the reward:
`align.rl.sequence_kl_rewards`) is baselined by the mean reward of the other samples of its
prompt (`align.rl.rloo_advantages`, optional batch normalisation). Objective: the clipped
sequence-level ratio of `align.pg.rloo_loss` with `num_iterations` steps per rollout.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ftjax.align import pg, reference, rl
from ftjax.train.run import Run
from ftjax.trainers._rollout import Rollouts
from ftjax.trainers.grpo import (check_cycle, held_out_score, reference_mode,
                                 synthetic_examples)

DEFAULTS = {"rloo": dict(
    prompts_per_step=16, group_size=4,
    max_new_tokens=16, temperature=1.0, top_k=0,
    reward_funcs=("exact", "format"), reward_weights=(1.0, 0.2),
    beta=0.05,                  # KL (k1, summed per sequence) subtracted from the reward
    normalize_advantages=False,
    epsilon_low=0.2, epsilon_high=0.2,
    num_iterations=1,           # passes over each generation
    num_mini_batches=1,         # optimizer steps per pass (see grpo)
    reference="auto",           # auto | strip | copy (used when beta > 0)
    long_prompts="refuse",
)}
CHECKS = {"rloo": dict(prompts_per_step=">= 1", group_size=">= 2", max_new_tokens=">= 1",
                       temperature=">= 0", top_k=">= 0", beta=">= 0", epsilon_low=">= 0",
                       epsilon_high=">= 0", num_iterations=">= 1",
                       num_mini_batches=">= 1",
                       long_prompts=("refuse", "truncate"),
                       reference=("auto", "strip", "copy"))}


class RLOORollouts(Rollouts):
    def finish(self, batch, rewards, extras):
        r = jnp.asarray(rewards, jnp.float32)
        beta = float(self.s.beta)
        if beta > 0:
            r = rl.sequence_kl_rewards(r, batch["old_logps"], batch["ref_logps"],
                                       batch["loss_mask"], beta)
            extras.setdefault("metrics", {})["reward_with_kl"] = float(jnp.mean(r))
        adv = rl.rloo_advantages(r, self.group, bool(self.s.normalize_advantages))
        batch["advantages"] = np.asarray(adv, np.float32)[:, None]
        return batch


def run(cfg: Any, workdir: str) -> dict:
    s = cfg.rloo
    iters, beta = int(s.num_iterations) * int(s.num_mini_batches), float(s.beta)
    check_cycle(cfg, iters, "rloo")
    r = Run.build(cfg, workdir, name="rloo")
    r.check_exportable()
    train_ex, held_out = synthetic_examples(cfg)
    mode = reference_mode(r, str(s.reference), "rloo") if beta > 0 else None
    ref_params = r.starting_params() if mode == "copy" else None
    settings = pg.RLOOSettings(float(s.epsilon_low), float(s.epsilon_high), iters > 1,
                               float(s.temperature))
    score = held_out_score(r, held_out, int(cfg.data.max_new_tokens))
    before = score(r.starting_params())
    print(f"[rloo] held-out exact match before: {before:.3f} over {len(held_out)} prompts; "
          f"beta={beta}, reference={mode}, mu={iters}")
    producer = RLOORollouts(r, train_ex, s, name="rloo", reference=mode, ref_params=ref_params,
                            old_logps=iters > 1 or beta > 0)
    result = r.train(pg.rloo_loss(r.model_cfg, settings, r.method.apply_fn,
                                  r.method.bind_rng), producer)
    after = score(result.params)
    start_copy = ref_params if ref_params is not None else (
        None if reference.strip_safe(r.abstract_params, r.method.train_patterns,
                                     cfg.get("peft"))[0] else r.starting_params())
    kl = producer.kl_to_start(result.params, held_out, start_copy)
    del start_copy
    h = producer.history
    print(f"[rloo] held-out exact match {before:.3f} -> {after:.3f}; mean reward "
          f"{np.mean([x['reward'] for x in h[:5]]):.3f} (first 5 rollouts) -> "
          f"{np.mean([x['reward'] for x in h[-5:]]):.3f} (last 5); KL to the start "
          f"{kl['kl_per_completion']:.3f} per completion ({kl['kl_per_token']:.4f} per token)")
    summary = {"trainer": "rloo", "exact_match_before": before, "exact_match_after": after,
               "kl_to_start": kl,
               "n_eval": len(held_out), "rollouts": h, "beta": beta, "reference": mode,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "wall_s": result.wall_s, "resumed_from": result.resumed_from,
               "exported_hf_dir": r.export_hf(result.params)}
    r.write_summary(summary)
    return summary
