"""Trainer "rft": rejection-sampling fine-tuning (expert iteration) on tasks with a checker.

Each step the current policy samples `rft.samples_per_prompt` answers to `rft.prompts_per_step`
training prompts (on-policy, through the loop's `OnPolicy` seam); the answers the task's checker
accepts (exact match with the reference of the synthetic suite) become the step's SFT batch. The
policy thus trains on its own correct outputs, as in STaR (Zelikman et al., 2022), RAFT (Dong
et al., 2023) and ReST-EM (Singh et al., 2023). Held-out exact match (greedy) is measured before
and after; the acceptance rate of every step is in summary.json.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from ftjax import data as ftdata
from ftjax.data.batching import BATCH_KEYS, bos_prefix, encode_example
from ftjax.eval.harness import exact_match_eval
from ftjax.infer.generate import generate_ids
from ftjax.train.batches import OnPolicy
from ftjax.train.run import Run, fixed_batches
from ftjax.train.step import sft_loss

DEFAULTS = {"rft": dict(
    prompts_per_step=32,     # training prompts sampled from per step
    samples_per_prompt=4,    # answers drawn per prompt
    max_per_prompt=1,        # accepted answers kept per prompt (the rest are duplicates)
    temperature=1.0,         # sampling temperature of the rollouts
    top_k=0,                 # 0 = off
    max_new_tokens=16,
)}
# Refused before the run builds anything (`trainers/_validate.py`).
CHECKS = {"rft": dict(prompts_per_step=">= 1", samples_per_prompt=">= 1", max_per_prompt=">= 1",
                      temperature=">= 0", top_k=">= 0", max_new_tokens=">= 1")}


class RejectionSampler(OnPolicy):
    """Samples answers with the current params and keeps the correct ones as SFT rows.

    Prompts are visited in a seeded order; sampling keys are `fold_in(seed, step)`, so a resumed
    run draws what an uninterrupted one would. Every process samples the same global batch and
    keeps its own rows of it."""

    def __init__(self, run: Run, examples: Sequence[dict], settings: Any):
        self.run, self.examples, self.s = run, list(examples), settings
        self.rows = int(run.cfg.train.batch_size)
        self.seq_len = int(run.cfg.train.seq_len)
        self.order = np.random.default_rng(run.seed).permutation(len(self.examples))
        self.accepted: list[float] = []  # share of samples the checker accepts, per step

    def next_batch(self, step: int, params: Any) -> dict:
        s, tok = self.s, self.run.tokenizer
        n, k = int(s.prompts_per_step), int(s.samples_per_prompt)
        picks = [self.examples[self.order[(step * n + i) % len(self.order)]] for i in range(n)]
        prompts = [bos_prefix(tok) + list(tok.encode(ex["prompt"] + "\n"))
                   for ex in picks for _ in range(k)]
        outs = generate_ids(params, self.run.model_cfg, tok, prompts,
                            max_new_tokens=int(s.max_new_tokens), batch_size=len(prompts),
                            temperature=float(s.temperature), top_k=int(s.top_k),
                            rng=jax.random.fold_in(jax.random.PRNGKey(self.run.seed), step),
                            apply_fn=self.run.method.apply_fn)
        kept, per_prompt = [], [0] * n
        for j, ids in enumerate(outs):  # the checker: exact match with the reference answer
            ex, text = picks[j // k], tok.decode(ids)
            if text.strip() == ex["answer"].strip():
                per_prompt[j // k] += 1
                if per_prompt[j // k] <= int(s.max_per_prompt):
                    kept.append({"prompt": ex["prompt"], "answer": text})
        self.accepted.append(sum(per_prompt) / len(prompts))  # share of correct samples
        batch = {key: np.zeros((self.rows, self.seq_len),
                               np.float32 if key == "loss_mask" else np.int32)
                 for key in BATCH_KEYS}  # rows nothing was accepted for weigh nothing
        for i, ex in enumerate(kept[:self.rows]):
            row = encode_example(tok, ex, self.seq_len)
            for key in BATCH_KEYS:
                batch[key][i] = row[key]
        pc, pi = jax.process_count(), jax.process_index()
        lo, hi = pi * self.rows // pc, (pi + 1) * self.rows // pc
        return {key: v[lo:hi] for key, v in batch.items()}

    def get_state(self) -> dict:
        return {"accepted": self.accepted}

    def set_state(self, state: dict) -> None:
        self.accepted = list(state.get("accepted", []))


def run(cfg: Any, workdir: str) -> dict:
    r = Run.build(cfg, workdir, name="rft")
    r.check_exportable()
    d, t, tok = cfg.data, cfg.train, r.tokenizer
    train_ex, test_ex = [], []
    for task in d.tasks:
        tr, te = ftdata.make_splits(task, int(d.n_per_task), int(d.seed), float(d.test_frac))
        train_ex, test_ex = train_ex + tr, test_ex + te
    held_out = test_ex[:int(d.eval_examples)]

    def score(params) -> float:
        return exact_match_eval(params, r.model_cfg, tok, held_out,
                                max_new_tokens=int(d.max_new_tokens),
                                apply_fn=r.method.apply_fn, placement=r.placement)["exact_match"]

    before = score(r.starting_params())
    print(f"[rft] held-out exact match before: {before:.3f} over {len(held_out)} prompts")
    sampler = RejectionSampler(r, train_ex, cfg.rft)
    result = r.train(sft_loss(r.model_cfg, float(t.z_loss), r.method.apply_fn,
                              r.method.bind_rng), sampler,
                     eval_batches=fixed_batches(held_out, tok, int(t.batch_size),
                                                int(t.seq_len)))
    after = score(result.params)
    acc = sampler.accepted
    print(f"[rft] held-out exact match {before:.3f} -> {after:.3f}; acceptance "
          f"{np.mean(acc[:5]):.2f} (first 5 steps) -> {np.mean(acc[-5:]):.2f} (last 5)")
    summary = {"trainer": "rft", "exact_match_before": before, "exact_match_after": after,
               "n_eval": len(held_out), "acceptance": [round(a, 4) for a in acc],
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "wall_s": result.wall_s,
               "resumed_from": result.resumed_from,
               "exported_hf_dir": r.export_hf(result.params)}
    r.write_summary(summary)
    return summary
