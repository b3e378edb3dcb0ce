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

from ftjax.align import pg, rl
from ftjax.train.run import Run
from ftjax.trainers._rollout import Rollouts
from ftjax.trainers.grpo import (check_cycle, reference_mode, synthetic_examples,
                                 train_on_rollouts)

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
    producer = RLOORollouts(r, train_ex, s, name="rloo", reference=mode, ref_params=ref_params,
                            old_logps=iters > 1 or beta > 0)
    loss_fn = pg.rloo_loss(r.model_cfg, settings, r.method.apply_fn, r.method.bind_rng)
    return train_on_rollouts(r, "rloo", producer, loss_fn, held_out, ref_params,
                             {"beta": beta, "reference": mode, "steps_per_generation": iters})
