"""Trainer "reward": a reward model (Bradley-Terry over preference pairs) with any PEFT method.

The model is the causal LM with a scalar `score` head on the last real token, which is
transformers' `*ForSequenceClassification` with one label (`models.heads`). Objective:
`ftjax.align.reward.reward_loss` (optional per-pair margin, reward centering). Data: the same
preference pairs as the "dpo" trainer (synthetic pairs in memory, or the user's preference data
through the data pipeline). Evaluation on the validation pairs reports pairwise accuracy, the
mean margin and the mean rewards. The trained model is written as a transformers directory
(`export.hf_dir`, default `<workdir>/reward_model`) that `AutoModelForSequenceClassification`
and `ftjax.train.reward_model.RewardModel` (a reward function for PPO) load.
"""
from __future__ import annotations

import os
from typing import Any

import jax

from ftjax.align.reward import reward_loss
from ftjax.models.heads import score_head
from ftjax.train import optim
from ftjax.train.run import Run, gather, model_config, uses_files
from ftjax.trainers.dpo import file_data, make_evaluator, synthetic_data

DEFAULTS = {"reward": dict(
    center_rewards_coefficient=0.0,  # + coef * mean((r_c + r_r)^2) (0.01 is the usual choice)
    head_std=0.02,                   # std of the new score head's init
    eval_before=True,                # evaluate the starting model too (summary "before")
)}
CHECKS = {"reward": dict(center_rewards_coefficient=">= 0", head_std="> 0")}


def export_dir(cfg: Any, workdir: str) -> str:
    """Where the trained reward model goes: export.hf_dir, else `<workdir>/reward_model` for a
    local workdir ("" for a remote one: set export.hf_dir to a local path)."""
    out = cfg.get("export", {}).get("hf_dir", "")
    if out:
        return out
    return "" if "://" in str(workdir) else os.path.join(str(workdir), "reward_model")


def run(cfg: Any, workdir: str) -> dict:
    t, rcfg = cfg.train, cfg.reward
    optim.make_optimizer(cfg.optimizer, int(t.steps))  # bad optimizer settings fail here, early
    mcfg = model_config(cfg.model)
    r = Run.build(cfg, workdir, name="reward", model_cfg=mcfg,
                  add_params=score_head(mcfg.hidden_size, float(rcfg.head_std)))
    r.check_exportable()
    out = export_dir(cfg, workdir)
    if out and r.method.apply_fn is not None:
        raise ValueError(f"peft.method={r.method.name!r} changes the model's inputs and has no "
                         "transformers form; the reward trainer exports a "
                         "*ForSequenceClassification directory, so use another method")
    tok = r.tokenizer
    data = file_data(cfg, tok, workdir) if uses_files(cfg) else synthetic_data(cfg, tok)
    print(f"[reward] Bradley-Terry reward model, {data.n_train} train / {data.n_eval} "
          f"validation pairs, center_rewards_coefficient={rcfg.center_rewards_coefficient}")
    loss_fn = reward_loss(r.model_cfg, float(rcfg.center_rewards_coefficient), r.apply_fn,
                          r.method.bind_rng)
    evaluate = make_evaluator(loss_fn, r.placement, data.evals)
    before = {}
    if bool(rcfg.eval_before):
        before = evaluate(0, r.starting_params())
        print("[reward] before: " + _fmt(before))
    try:
        result = r.train(loss_fn, data.train, on_eval=evaluate)
    finally:
        if hasattr(data.train, "close"):
            data.train.close()
    after = dict(result.evals[-1]) if result.evals else evaluate(int(t.steps), result.params)
    after.pop("step", None)
    print("[reward] after:  " + _fmt(after))
    exported = _export(r, result.params, out)
    summary = {"trainer": "reward", "train_pairs": data.n_train, "eval_pairs": data.n_eval,
               "data": data.info, "before": before, "after": after,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "wall_s": result.wall_s,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
               "exported_hf_dir": exported}
    r.write_summary(summary)
    return summary


def _export(r: Run, params: Any, out: str) -> str | None:
    if not out:
        print("[reward] not exported: the workdir is remote; set export.hf_dir to a local path")
        return None
    from ftjax.peft.core import merge
    from ftjax.train import export
    params = gather(params)
    if jax.process_index() == 0:
        _, template = export.trained_template(r.cfg, r.tokenizer)
        export.save_reward_model(out, r.model_cfg, jax.device_get(merge(params)), r.tokenizer,
                                 template)
        print(f"[reward] exported to {out} (transformers *ForSequenceClassification, one label)")
    return out


def _fmt(m: dict) -> str:
    keys = ("eval_loss", "eval_accuracy", "eval_margin", "eval_rewards_chosen",
            "eval_rewards_rejected")
    return " ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)
