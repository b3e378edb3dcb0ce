"""The quickstart (trainer "quickstart"): the whole fine-tuning pipeline on a laptop CPU.

    python -m ftjax.main --config configs/quickstart.py --workdir /tmp/qs

1. Base model: loaded from `base.path` (the shipped `experiments/quickstart_base/
   model.safetensors`, made by `quickstart_base.pretrain_base` via `experiments/quickstart_base/
   pretrain.py`), or pretrained in the run and cached in `<workdir>/base_<hash>/` when
   `base.path` is empty or `base.force_pretrain` is set.
2. Data: the built-in synthetic suite; the fine-tuning task (`data.task`, by default one of
   `HELDOUT_TASKS`, never in the pretraining mixture) is split 80/20 with a held-out test set.
3. Exact match (greedy generation) on the held-out test prompts before fine-tuning, full
   fine-tuning with AdamW (eval loss every `train.eval_every` steps), exact match after; the
   pretraining tasks in `data.other_tasks` are scored before and after too (forgetting).
4. Prints a table and sample generations; writes `loss_curves.png` and `summary.json`, and
   the fine-tuned model as a Hugging Face directory when `export.hf_dir` is set.

The fine-tuning phase is a run of its own in `<workdir>/finetune` (checkpoints and its
`config.json`, whose `model.init_from` is the base file), which `scripts/export_peft.py
--workdir <workdir>` and `scripts/convert_hf.py --ckpt <workdir>` find and export.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import jax

from ftjax import config_utils, monitor
from ftjax import data as ftdata
from ftjax import plots, workdir as wd
from ftjax.eval.harness import loglik_eval
from ftjax.peft import core as peft_core
from ftjax import paths
from ftjax.train.run import Run, check_exportable, fixed_batches, synthetic_loader
from ftjax.train.step import sft_loss
from ftjax.trainers._quickstart_base import (eval_examples_for, obtain_base, phase_config,
                                            replay_examples, score)


# The quickstart's own data fields, beside the data stage's rules (trainers/_validate.py).
CHECKS = {"data": {**ftdata.options.CHECKS, "val_frac": "in [0, 1)",
                   "score_test": (True, False)}}


def _median_step_time(history: Sequence[dict], tokens_per_step: int) -> Optional[float]:
    """Median seconds per step over the logged intervals (from their tokens/s)."""
    rates = sorted(h["tokens_per_s"] for h in history if h.get("tokens_per_s"))
    return round(tokens_per_step / rates[len(rates) // 2], 5) if rates else None



def _print_report(task: str, results: dict, samples: list[dict], base_desc: str,
                  split: str = "held-out") -> None:
    """The final table (task, n, exact match before/after) and the sample generations."""
    rows = [(t if t.startswith(task) and t != task else
             f"{t} ({'fine-tuned' if t == task else 'pretraining, forgetting check'})", r["n"],
             r["before"], r["after"]) for t, r in results.items()]
    w = max(len(r[0]) for r in rows) + 2
    line = "-" * (w + 28)
    print()
    print(f"Quickstart results (base: {base_desc})")
    print(line)
    print(f"{'task':<{w}}{'n':>6}{'before':>11}{'after':>11}")
    print(line)
    for name, count, before, after in rows:
        print(f"{name:<{w}}{count:>6}{before:>11.1%}{after:>11.1%}")
    print(line)
    print(f"\nSample generations on {split} {task!r} prompts:")
    pw = max(len(s["prompt"]) for s in samples) + 2
    aw = max(max(len(s["before"]), len(s["after"]), len(s["answer"])) for s in samples) + 2
    aw = min(aw, 24)
    print(f"  {'prompt':<{pw}}{'before':<{aw}}{'after':<{aw}}{'answer':<{aw}}ok")
    show = lambda text: (text if text.strip() else '""')[:aw - 2]  # noqa: E731
    for s in samples:
        ok = "yes" if s["after"].strip() == s["answer"].strip() else "no"
        print(f"  {s['prompt']:<{pw}}{show(s['before']):<{aw}}{show(s['after']):<{aw}}"
              f"{s['answer']:<{aw}}{ok}")
    print()


def run(cfg: Any, workdir: str) -> dict:
    t_start = time.time()
    if cfg.model.get("init_from", ""):
        raise ValueError("the quickstart starts from config.base.path (or pretrains the base); "
                         "leave config.model.init_from empty")
    check_exportable(cfg)  # export.hf_dir: refused before any work when it cannot be honoured
    d = cfg.data
    task = str(d.task)
    if task in tuple(cfg.base.tasks):
        print(f"[quickstart] note: {task!r} is in the pretraining mixture (base.tasks), so the "
              f"base has seen it; pick one of {ftdata.HELDOUT_TASKS} for an unseen task")

    # 1. Base model.
    base_path, meta, source = obtain_base(cfg, workdir)
    ft_cfg = phase_config(cfg, train=cfg.train, optimizer=cfg.optimizer,
                          init_from=os.path.abspath(base_path))
    run = Run.build(ft_cfg, wd.path(workdir, "finetune"), name="finetune",
                    tokenizer=ftdata.CharTokenizer())
    # The fine-tuning phase records its own complete config (model.init_from = the base file),
    # so export tools can rebuild its base: `scripts/export_peft.py --workdir <workdir>`.
    config_utils.write_resolved_config(ft_cfg, run.workdir)
    model_cfg, tok, method = run.model_cfg, run.tokenizer, run.method
    try:
        base_params = run.init_params()  # checks the file against cfg.model
    except ValueError as e:
        raise ValueError(f"{e}. The base file fixes the architecture: drop the model "
                         "overrides, or set --config.base.path= (empty) to pretrain a base of "
                         "this architecture in the run") from None

    # 2. Data: train/test split of the fine-tuning task; held-out prompts of other tasks.
    train_ex, test_ex = ftdata.make_splits(task, int(d.n_examples), int(d.seed),
                                           float(d.test_frac))
    # Validation (data.val_frac > 0): the last share of the training prompts (a random subset:
    # make_splits draws them from a seeded stream) is held out for choosing hyperparameters;
    # it then drives the in-training eval loss. data.score_test=False leaves the test split
    # and the forgetting check unscored (the select stage of a sweep: docs/sweeps.md).
    val_frac, score_test = float(d.get("val_frac", 0.0)), bool(d.get("score_test", True))
    val_ex: list[dict] = []
    if val_frac > 0:
        n_val = max(1, round(len(train_ex) * val_frac))
        train_ex, val_ex = train_ex[:-n_val], train_ex[-n_val:]
    elif not score_test:
        raise ValueError("data.score_test=False scores nothing: set data.val_frac > 0 (e.g. "
                         "0.1) so the run is scored on a validation split")
    eval_ex = test_ex[:int(d.eval_examples)]
    val_eval = val_ex[:int(d.eval_examples)]
    val_name = f"{task} (validation)"
    replay = replay_examples(cfg, len(train_ex))
    others = {t: eval_examples_for(t, int(d.other_eval_examples), int(d.seed),
                                   float(cfg.base.test_frac))
              for t in d.other_tasks if t != task} if score_test else {}
    sets = ({task: eval_ex} if score_test else {}) | ({val_name: val_eval} if val_ex else {}) \
        | others
    print(f"[quickstart] task {task!r}: {len(train_ex)} train / "
          + (f"{len(val_ex)} validation / " if val_ex else "") + f"{len(test_ex)} test prompts"
          + (f" (+{len(replay)} replayed pretraining examples)" if replay else "")
          + (f"; scoring {len(eval_ex)} held-out prompts" if score_test else
             f"; scoring {len(val_eval)} validation prompts (test split not scored)")
          + (f"; forgetting check on {sorted(others)}" if others else ""))

    # 3. Exact match before, fine-tuning, exact match after.
    t0 = time.time()
    before = {t: score(base_params, model_cfg, tok, ex, d) for t, ex in sets.items()}
    ft_eval_batches = fixed_batches(val_eval if val_ex else eval_ex, tok,
                                    int(cfg.train.batch_size), int(cfg.train.seq_len))
    eval_loss_before = loglik_eval(base_params, model_cfg, ft_eval_batches)["loss"]
    eval_before_s = time.time() - t0
    print("[quickstart] before fine-tuning: " + ", ".join(
        f"{t} {r['exact_match']:.1%}" for t, r in before.items())
          + f"; held-out eval loss {eval_loss_before:.3f} ({eval_before_s:.0f}s)")
    del base_params

    t = cfg.train
    seq_len = int(t.seq_len)
    result = run.train(sft_loss(model_cfg, float(t.z_loss), method.apply_fn, method.bind_rng),
                       synthetic_loader(train_ex + replay, tok, cfg),
                       eval_batches=ft_eval_batches)
    t0 = time.time()
    after = {t_: score(result.params, model_cfg, tok, ex, d, method.apply_fn)
             for t_, ex in sets.items()}
    eval_after_s = time.time() - t0

    # 4. Report.
    results = {t_: {"before": round(before[t_]["exact_match"], 4),
                    "after": round(after[t_]["exact_match"], 4), "n": after[t_]["n"]}
               for t_ in sets}
    shown = task if score_test else val_name
    samples = [{"prompt": p, "before": pb, "after": pa, "answer": a}
               for (p, pb, a), (_, pa, _) in zip(before[shown]["samples"],
                                                 after[shown]["samples"])]
    root = paths.root()
    base_desc = {"file": os.path.relpath(base_path, root) if base_path.startswith(root)
                 else base_path,
                 "cached": f"pretrained earlier in this workdir ({base_path})",
                 "pretrained": f"pretrained in this run ({base_path})"}[source]
    _print_report(task, results, samples, base_desc,
                  "held-out" if score_test else "validation")

    train_label = "train loss" + (f" ({float(d.get('replay_frac', 0.0)):.0%} replay)" if replay else "")
    curves = plots.read_curves(wd.path(run.workdir, "metrics.jsonl"),
                               {train_label: ("finetune", "loss"),
                                "held-out eval loss": ("finetune_eval", "eval_loss")})
    if "held-out eval loss" in curves and 0 not in curves["held-out eval loss"][0]:
        steps_, values_ = curves["held-out eval loss"]
        curves["held-out eval loss"] = ([0] + steps_, [eval_loss_before] + values_)
    panels = {f"fine-tuning on {task!r}": curves}
    pre = {label: tuple(zip(*meta[key])) for label, key in
           (("train loss", "loss_curve"), ("eval loss", "eval_curve")) if meta.get(key)}
    if pre:
        n_tasks = len(meta.get("pretrain", {}).get("tasks", []))
        panels[f"pretraining the base ({n_tasks} tasks)"] = pre
    png = wd.path(workdir, "loss_curves.png")
    em_b, em_a = results[shown]["before"], results[shown]["after"]
    if jax.process_index() == 0:
        plots.plot_loss_curves(png, panels, title=f"{task}: "
                               + ("held-out" if score_test else "validation")
                               + f" exact match {em_b:.0%} -> {em_a:.0%}")

    exported = run.export_hf(result.params)
    wall = time.time() - t_start
    summary = {
        "task": task,
        # Test split (None when data.score_test=False) and validation split (data.val_frac).
        "exact_match_before": em_b if score_test else None,
        "exact_match_after": em_a if score_test else None,
        "n_eval": results[task]["n"] if score_test else 0,
        "val_exact_match_before": results[val_name]["before"] if val_ex else None,
        "val_exact_match_after": results[val_name]["after"] if val_ex else None,
        "n_val_eval": results[val_name]["n"] if val_ex else 0,
        "n_train": len(train_ex),
        "n_replay": len(replay),
        "other_tasks": {t_: r for t_, r in results.items() if t_ not in (task, val_name)},
        "samples": samples,
        "steps": int(jax.device_get(result.state.step)),
        "method": method.name,
        "trainable_params": peft_core.count(result.state.params),
        "total_params": peft_core.count_params(result.params),
        "step_time_median_s": _median_step_time(result.history, int(t.batch_size) * seq_len),
        "peak_rss_mb": round(monitor.peak_rss_mb(), 1),
        "final_train_loss": curves[train_label][1][-1] if train_label in curves else None,
        "eval_loss_before": round(eval_loss_before, 5),
        "final_eval_loss": result.evals[-1]["eval_loss"] if result.evals else None,
        "eval_split": "validation" if val_ex else "test",  # of the eval losses
        "evals": result.evals,
        "resumed_from": result.resumed_from,
        "wall_time_s": round(wall, 1),
        "timing_s": {"finetune": round(result.wall_s, 1), "eval_before": round(eval_before_s, 1),
                     "eval_after": round(eval_after_s, 1)},
        "base_model": {"path": base_path, "source": source,
                       "base_config_hash": meta.get("base_config_hash"),
                       "pretrain": meta.get("pretrain"),
                       "pretrain_exact_match": meta.get("exact_match")},
        "config_hash": config_utils.config_hash(cfg),
        "loss_curves": str(png),
        "exported_hf_dir": exported,
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
    }
    out = wd.write_json(workdir, "summary.json", summary)
    print(f"[quickstart] {'held-out' if score_test else 'validation'} exact match on "
          f"{task!r}: {em_b:.1%} -> {em_a:.1%}; "
          f"wall time {wall:.0f}s; wrote {png} and {out}")
    return summary
