"""Memory tuning (trainer "memory_tuning"): teach the quickstart base every fact of the
fictional fact table, and measure what it costs the other tasks.

    python -m ftjax.main --config configs/memory_tuning.py --workdir workdirs/memory

The training set is all 192 `fact_examples()` (memorisation is the point) plus a replay share
of the other pretraining tasks. Before and after training it measures
  - exact recall of every fact (greedy generation, exact match of the value), also split into
    the facts the base saw in pretraining (the `split_of` train bucket) and those it never saw;
  - the answer-token loss on the held-out test prompts of the other tasks (`data.other_tasks`),
    per task and pooled, with the relative change, plus their exact match when asked;
and writes them to `<workdir>/summary.json`. Works with any `peft.method` (memory experts,
LoRA for the ablation, full fine-tuning).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Sequence

import jax

from ftjax import config_utils, monitor
from ftjax import data as ftdata
from ftjax import workdir as wd
from ftjax.eval.harness import exact_match_eval, loglik_eval
from ftjax.infer.generate import generate_text
from ftjax.peft import core as peft_core
from ftjax.train.run import (Run, check_exportable, fixed_batches as eval_batches,
                             synthetic_loader)
from ftjax.train.step import sft_loss
from ftjax.trainers._quickstart_base import eval_examples_for, obtain_base


def recall(params: Any, model_cfg, tok, facts: Sequence[dict], seen: Sequence[bool],
           d: Any) -> dict:
    """Exact recall over `facts` (greedy), overall and on the seen / unseen ones."""
    preds = generate_text(params, model_cfg, tok, [f["prompt"] for f in facts],
                          max_new_tokens=int(d.max_new_tokens),
                          batch_size=int(d.eval_batch_size))
    hits = [p.strip() == f["answer"] for p, f in zip(preds, facts)]

    def frac(sel):
        chosen = [h for h, s in zip(hits, sel) if s]
        return round(sum(chosen) / len(chosen), 4) if chosen else None
    misses = [{"prompt": f["prompt"], "predicted": p, "answer": f["answer"]}
              for p, f, h in zip(preds, facts, hits) if not h]
    return {"recall": frac([True] * len(hits)), "recall_seen": frac(seen),
            "recall_unseen": frac([not s for s in seen]), "n": len(hits),
            "n_correct": int(sum(hits)), "misses": misses[:10]}


def task_losses(params: Any, model_cfg, batches: dict) -> dict:
    """Answer-token NLL per task and pooled over all tasks (token-weighted)."""
    out, nll, tokens = {}, 0.0, 0
    for task, bs in batches.items():
        r = loglik_eval(params, model_cfg, bs)
        out[task] = round(r["loss"], 6)
        nll += r["loss"] * r["tokens"]
        tokens += r["tokens"]
    out["all"] = round(nll / max(tokens, 1), 6)
    return out


def _exact_match(params, model_cfg, tok, sets: dict, d: Any) -> dict:
    return {task: round(exact_match_eval(params, model_cfg, tok, ex,
                                         max_new_tokens=int(d.max_new_tokens),
                                         batch_size=int(d.eval_batch_size))["exact_match"], 4)
            for task, ex in sets.items()}


def training_examples(facts: list[dict], d: Any, n_rows: int, test_frac: float
                      ) -> tuple[list[dict], int]:
    """(examples, n_replay): the facts (repeated) and fresh replay of `data.replay_tasks`.

    `data.replay_frac` of the `n_rows` training rows (steps x batch) are replay examples, each
    drawn fresh (test prompts excluded), so the memory cannot simply memorise a small replay
    set; the facts are repeated to fill the rest of the rows.
    """
    frac = float(d.replay_frac)
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"data.replay_frac={frac} must be in [0, 1)")
    tasks = tuple(d.replay_tasks)
    n = round(frac * n_rows)
    if n == 0 or not tasks:
        return list(facts), 0
    mix = ftdata.mixture(tasks, -(-n // len(tasks)), int(d.seed) + 1, exclude_test=True,
                         test_frac=test_frac)[:n]
    repeats = max(1, round((n_rows - n) / len(facts)))
    return list(facts) * repeats + mix, n


def _rel(before: float, after: float) -> float:
    return round((after - before) / before, 4) if before else float("inf")


def run(cfg: Any, workdir: str) -> dict:
    t_start = time.time()
    if cfg.model.get("init_from", ""):
        raise ValueError("memory tuning starts from config.base.path (the quickstart base); "
                         "leave config.model.init_from empty")
    if cfg.get("export", {}).get("hf_dir", "") and cfg.peft.get("method") == "memory":
        raise ValueError("export.hf_dir: memory experts route every token to its own experts and "
                         "have no merged Hugging Face form; unset export.hf_dir")
    check_exportable(cfg)  # the other methods: refused before any work if they cannot merge
    d = cfg.data
    test_frac = float(cfg.base.test_frac)
    base_path, _, source = obtain_base(cfg, workdir)
    ft_cfg = copy.deepcopy(cfg)
    ft_cfg.model.init_from = os.path.abspath(base_path)
    run = Run.build(ft_cfg, wd.path(workdir, "finetune"), name="memory",
                    tokenizer=ftdata.CharTokenizer())
    config_utils.write_resolved_config(ft_cfg, run.workdir)  # what export tools rebuild
    method, model_cfg, tok = run.method, run.model_cfg, run.tokenizer
    if run.changes_inputs:
        raise ValueError(f"peft.method={method.name!r} changes the model's inputs; the memory-"
                         "tuning losses are scored with the plain model, so use memory, lora or "
                         "full")
    base_params = run.init_params()

    facts = ftdata.fact_examples()
    seen = [ftdata.split_of("lookup", f["prompt"], test_frac) == "train" for f in facts]
    bs, seq_len = int(cfg.train.batch_size), int(cfg.train.seq_len)
    train_ex, n_replay = training_examples(facts, d, int(cfg.train.steps) * bs, test_frac)
    others = {t: eval_examples_for(t, int(d.other_loss_examples), int(d.seed), test_frac)
              for t in d.other_tasks}
    other_batches = {t: eval_batches(ex, tok, bs, seq_len) for t, ex in others.items()}
    em_sets = {t: ex[:int(d.other_eval_examples)] for t, ex in others.items()
               if int(d.other_eval_examples) > 0}
    fact_batches = eval_batches(facts, tok, bs, seq_len)
    print(f"[memory_tuning] {len(facts)} facts ({sum(seen)} seen in pretraining, "
          f"{len(seen) - sum(seen)} never seen) x {(len(train_ex) - n_replay) // len(facts)} + "
          f"{n_replay} fresh replayed examples of "
          f"{'+'.join(d.replay_tasks)}; held-out loss on {'+'.join(others)}")

    def measure(params) -> dict:
        return {"facts": recall(params, model_cfg, tok, facts, seen, d),
                "fact_loss": task_losses(params, model_cfg, {"lookup": fact_batches})["all"],
                "other_loss": task_losses(params, model_cfg, other_batches),
                "other_exact_match": _exact_match(params, model_cfg, tok, em_sets, d)}

    t0 = time.time()
    before = measure(base_params)
    eval_before_s = time.time() - t0
    print(f"[memory_tuning] before: recall {before['facts']['recall']:.1%} "
          f"(seen {before['facts']['recall_seen']:.1%}, unseen "
          f"{before['facts']['recall_unseen']:.1%}); other-task loss "
          f"{before['other_loss']['all']:.4f} ({eval_before_s:.0f}s)")
    del base_params

    def on_eval(step, params):
        return {"fact_loss": task_losses(params, model_cfg, {"lookup": fact_batches})["all"],
                "other_loss": task_losses(params, model_cfg, other_batches)["all"]}

    result = run.train(sft_loss(model_cfg, float(cfg.train.z_loss), method.apply_fn,
                                method.bind_rng),
                       synthetic_loader(train_ex, tok, cfg), on_eval=on_eval)
    params = result.params
    exported = run.export_hf(params)
    t0 = time.time()
    after = measure(params)
    eval_after_s = time.time() - t0
    change = {t: _rel(before["other_loss"][t], after["other_loss"][t])
              for t in before["other_loss"]}
    wall = time.time() - t_start
    summary = {
        "method": method.name,
        "recall_before": before["facts"]["recall"], "recall_after": after["facts"]["recall"],
        "other_loss_before": before["other_loss"]["all"],
        "other_loss_after": after["other_loss"]["all"],
        "other_loss_rel_change": change["all"],
        "other_loss_rel_change_per_task": change,
        "before": before, "after": after,
        "n_facts": len(facts), "n_replay": n_replay,
        "steps": int(jax.device_get(result.state.step)),
        "trainable_params": peft_core.count(result.state.params),
        "total_params": peft_core.count_params(params),
        "evals": result.evals,
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "peak_rss_mb": round(monitor.peak_rss_mb(), 1),
        "wall_time_s": round(wall, 1),
        "timing_s": {"train": round(result.wall_s, 1), "eval_before": round(eval_before_s, 1),
                     "eval_after": round(eval_after_s, 1)},
        "base_model": {"path": base_path, "source": source},
        "exported_hf_dir": exported,
        "resumed_from": result.resumed_from,
        "config_hash": config_utils.config_hash(cfg),
        "devices": jax.device_count(),
    }
    wd.write_json(workdir, "summary.json", summary)
    print(f"[memory_tuning] fact recall {summary['recall_before']:.1%} -> "
          f"{summary['recall_after']:.1%} (unseen facts {before['facts']['recall_unseen']:.1%} "
          f"-> {after['facts']['recall_unseen']:.1%}); held-out loss on the other tasks "
          f"{summary['other_loss_before']:.4f} -> {summary['other_loss_after']:.4f} "
          f"({change['all']:+.1%}); {summary['trainable_params']:,} trainable params; "
          f"wall time {wall:.0f}s")
    return summary
