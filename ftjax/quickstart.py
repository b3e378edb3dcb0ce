"""The quickstart (trainer "quickstart"): the whole fine-tuning pipeline on a laptop CPU.

    python -m ftjax.main --config configs/quickstart.py --workdir /tmp/qs

1. Base model: loaded from `base.path` (the shipped `experiments/quickstart_base/
   model.safetensors`, made by `pretrain_base` below via `experiments/quickstart_base/
   pretrain.py`), or pretrained in the run and cached in `<workdir>/base_<hash>/` when
   `base.path` is empty or `base.force_pretrain` is set.
2. Data: the built-in synthetic suite; the fine-tuning task (`data.task`, by default one of
   `HELDOUT_TASKS`, never in the pretraining mixture) is split 80/20 with a held-out test set.
3. Exact match (greedy generation) on the held-out test prompts before fine-tuning, full
   fine-tuning with AdamW (eval loss every `train.eval_every` steps), exact match after; the
   pretraining tasks in `data.other_tasks` are scored before and after too (forgetting).
4. Prints a table and sample generations; writes `loss_curves.png` and `summary.json`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import jax

from ftjax import config_utils, monitor
from ftjax import data as ftdata
from ftjax import plots
from ftjax.eval.harness import exact_match_eval, loglik_eval
from ftjax.io.params_file import save_params
from ftjax.models.config import ModelConfig
from ftjax.train import loop
from ftjax.train.sft import eval_batches, initial_params, model_config
from ftjax.peft import core as peft_core
from ftjax.peft import get_method
from ftjax.train.step import sft_loss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_FILE = "model.safetensors"
PRETRAIN_EVAL_LOSS_EXAMPLES = 64  # per task, for the eval loss logged during pretraining


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _is_primary() -> bool:
    return jax.process_index() == 0


def _check_vocab(model_cfg: ModelConfig, tok) -> None:
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")


def _phase_config(cfg: Any, *, train: Any, optimizer: Any, seed: int | None = None,
                  init_from: str = "") -> Any:
    """A copy of `cfg` whose `train`/`optimizer`/`seed` drive one `loop.train` phase."""
    c = copy.deepcopy(cfg)
    c.train = copy.deepcopy(train)
    c.optimizer = copy.deepcopy(optimizer)
    if seed is not None:
        c.seed = int(seed)
    c.model.init_from = init_from
    return c


def base_hash(cfg: Any) -> str:
    """Hash of everything that determines a pretrained base (not where it is read from)."""
    model = {k: v for k, v in cfg.model.to_dict().items() if k != "init_from"}
    base = {k: v for k, v in cfg.base.to_dict().items() if k not in ("path", "force_pretrain")}
    return config_utils.config_hash({"model": model, "base": base})


def resolve_path(path: str) -> str:
    """`path` as given if it exists, else relative to the repository root (any cwd works)."""
    p = os.path.expanduser(path)
    if os.path.exists(p):
        return os.path.abspath(p)
    if not os.path.isabs(p) and os.path.exists(os.path.join(REPO_ROOT, p)):
        return os.path.join(REPO_ROOT, p)
    raise FileNotFoundError(
        f"base model {path!r} not found (looked under the current directory {os.getcwd()!r} and "
        f"the repository root {REPO_ROOT!r}); set --config.base.path to the file, or "
        "--config.base.path= (empty) to pretrain the base in the run")


def read_metadata(path: str) -> dict:
    """The JSON metadata `save_params` stored in a safetensors file (values decoded)."""
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def eval_examples_for(task: str, n: int, seed: int, test_frac: float) -> list[dict]:
    """`n` held-out examples of a task: prompts of the test bucket, never in `mixture(...)`.

    `lookup` is recall of invented facts, which cannot be inferred: it is scored on the facts
    of the train bucket (those the pretraining mixture contains), i.e. as memorisation.
    """
    if task == "lookup":
        facts = [ex for ex in ftdata.fact_examples()
                 if ftdata.split_of("lookup", ex["prompt"], test_frac) == "train"]
        return facts[:n]
    return ftdata.make_splits(task, math.ceil(n / test_frac), seed, test_frac)[1][:n]


def replay_examples(cfg: Any, n_task: int) -> list[dict]:
    """Pretraining-mixture examples mixed into fine-tuning (rehearsal against forgetting).

    `data.replay_frac` of the fine-tuning data, drawn from `base.tasks` with another seed than
    the base's pretraining (test prompts excluded, as in pretraining).
    """
    frac = float(cfg.data.get("replay_frac", 0.0))
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"data.replay_frac={frac} must be in [0, 1)")
    tasks = tuple(cfg.base.tasks)
    n = round(frac * n_task / (1.0 - frac))
    if n == 0 or not tasks:
        return []
    per_task = -(-n // len(tasks))
    mix = ftdata.mixture(tasks, per_task, int(cfg.base.seed) + 1, exclude_test=True,
                         test_frac=float(cfg.base.test_frac))
    return mix[:n]


def _median_step_time(history: Sequence[dict], tokens_per_step: int) -> Optional[float]:
    """Median seconds per step over the logged intervals (from their tokens/s)."""
    rates = sorted(h["tokens_per_s"] for h in history if h.get("tokens_per_s"))
    return round(tokens_per_step / rates[len(rates) // 2], 5) if rates else None


def _score(params, model_cfg: ModelConfig, tok, examples: Sequence[dict], data_cfg: Any,
           apply_fn=None) -> dict:
    return exact_match_eval(params, model_cfg, tok, examples,
                            max_new_tokens=int(data_cfg.max_new_tokens),
                            batch_size=int(data_cfg.eval_batch_size), apply_fn=apply_fn)


def _curve_pairs(curve: plots.Curve) -> list[list[float]]:
    return [[int(s), round(float(v), 5)] for s, v in zip(*curve)]


# --------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------

def pretrain_base(cfg: Any, workdir: str) -> dict:
    """Pretrains the base on a mixture of `cfg.base.tasks` and saves `workdir/model.safetensors`.

    Uses `cfg.model` (architecture), `cfg.base` (data, `base.train`, `base.optimizer`, seed) and
    `cfg.data` (generation settings for the per-task exact match). Checkpoints go to
    `workdir/checkpoints`, so an interrupted pretraining resumes. The saved file carries, as
    metadata, the base hash, the per-task exact match and the loss curves. Returns that info
    plus the file's `path`.
    """
    b = cfg.base
    tok = ftdata.CharTokenizer()
    model_cfg = model_config(cfg.model)
    _check_vocab(model_cfg, tok)
    tasks = tuple(b.tasks)
    test_frac, seed = float(b.test_frac), int(b.seed)
    examples = ftdata.mixture(tasks, int(b.n_per_task), seed, exclude_test=True,
                              test_frac=test_frac)
    evals = {t: eval_examples_for(t, int(b.eval_examples), seed, test_frac) for t in tasks}
    t = b.train
    bs, seq_len = int(t.batch_size), int(t.seq_len)
    it = ftdata.SyntheticLoader(examples, tok, bs, seq_len, seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    loss_ex = [ex for t_ in tasks for ex in evals[t_][:PRETRAIN_EVAL_LOSS_EXAMPLES]]
    pcfg = _phase_config(cfg, train=b.train, optimizer=b.optimizer, seed=seed)
    result = loop.train(pcfg, workdir, model_cfg=model_cfg,
                        init_params=initial_params(pcfg, model_cfg),
                        loss_fn=sft_loss(model_cfg, float(t.z_loss)), train_iter=it,
                        eval_batches=eval_batches(loss_ex, tok, bs, seq_len), name="pretrain")
    em, n_scored = {}, {}
    for task in tasks:
        r = _score(result.state.params, model_cfg, tok, evals[task], cfg.data)
        em[task], n_scored[task] = round(r["exact_match"], 4), r["n"]
        print(f"[pretrain] {task:>8s}: exact match {r['exact_match']:6.1%} over {r['n']} "
              f"{'training facts (recall)' if task == 'lookup' else 'held-out prompts'}")
    metrics = os.path.join(workdir, "metrics.jsonl")
    curves = plots.read_curves(metrics, {"train": ("pretrain", "loss"),
                                         "eval": ("pretrain_eval", "eval_loss")})
    info = {
        "base_config_hash": base_hash(cfg),
        "pretrain": {"tasks": list(tasks), "n_per_task": int(b.n_per_task), "seed": seed,
                     "test_frac": test_frac, "steps": int(t.steps), "batch_size": bs,
                     "seq_len": seq_len, "learning_rate": float(b.optimizer.learning_rate)},
        "exact_match": em,
        "n_scored": n_scored,
        "loss_curve": _curve_pairs(curves.get("train", ([], []))),
        "eval_curve": _curve_pairs(curves.get("eval", ([], []))),
        "wall_s": round(result.wall_s, 1),
        "resumed_from": result.resumed_from,
    }
    path = os.path.join(workdir, BASE_FILE)
    if _is_primary():
        save_params(path, model_cfg, result.state.params, **info)
    return {**info, "path": path}


def obtain_base(cfg: Any, workdir: str) -> tuple[str, dict, str]:
    """(path, metadata, source) of the base; source is "file", "cached" or "pretrained"."""
    b = cfg.base
    if b.force_pretrain or not b.path:
        h = base_hash(cfg)
        sub = os.path.join(workdir, f"base_{h}")
        path = os.path.join(sub, BASE_FILE)
        if os.path.exists(path):
            print(f"[quickstart] reusing the base pretrained earlier in this workdir: {path}")
            source = "cached"
        else:
            print(f"[quickstart] pretraining the base in the run ({int(b.train.steps)} steps on "
                  f"{'+'.join(b.tasks)}) into {sub}")
            path = pretrain_base(cfg, sub)["path"]
            source = "pretrained"
    else:
        path = resolve_path(b.path)
        source = "file"
    return path, read_metadata(path), source


# --------------------------------------------------------------------------------------------
# The quickstart
# --------------------------------------------------------------------------------------------

def _print_report(task: str, results: dict, samples: list[dict], base_desc: str) -> None:
    """The final table (task, n, exact match before/after) and the sample generations."""
    rows = [(f"{t} ({'fine-tuned' if t == task else 'pretraining, forgetting check'})", r["n"],
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
    print(f"\nSample generations on held-out {task!r} prompts:")
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
    tok = ftdata.CharTokenizer()
    model_cfg = model_config(cfg.model)
    _check_vocab(model_cfg, tok)
    d = cfg.data
    task = str(d.task)
    if task in tuple(cfg.base.tasks):
        print(f"[quickstart] note: {task!r} is in the pretraining mixture (base.tasks), so the "
              f"base has seen it; pick one of {ftdata.HELDOUT_TASKS} for an unseen task")

    # 1. Base model.
    base_path, meta, source = obtain_base(cfg, workdir)
    ft_cfg = _phase_config(cfg, train=cfg.train, optimizer=cfg.optimizer, init_from=base_path)
    init = initial_params(ft_cfg, model_cfg)
    try:
        base_params = init()  # checks the file against cfg.model
    except ValueError as e:
        raise ValueError(f"{e}. The base file fixes the architecture: drop the model "
                         "overrides, or set --config.base.path= (empty) to pretrain a base of "
                         "this architecture in the run") from None

    # 2. Data: train/test split of the fine-tuning task; held-out prompts of other tasks.
    train_ex, test_ex = ftdata.make_splits(task, int(d.n_examples), int(d.seed),
                                           float(d.test_frac))
    eval_ex = test_ex[:int(d.eval_examples)]
    replay = replay_examples(cfg, len(train_ex))
    others = {t: eval_examples_for(t, int(d.other_eval_examples), int(d.seed),
                                   float(cfg.base.test_frac))
              for t in d.other_tasks if t != task}
    sets = {task: eval_ex, **others}
    print(f"[quickstart] task {task!r}: {len(train_ex)} train / {len(test_ex)} test prompts"
          + (f" (+{len(replay)} replayed pretraining examples)" if replay else "")
          + f"; scoring {len(eval_ex)} held-out prompts; forgetting check on {sorted(others)}")

    # 3. Exact match before, fine-tuning, exact match after.
    t0 = time.time()
    before = {t: _score(base_params, model_cfg, tok, ex, d) for t, ex in sets.items()}
    ft_eval_batches = eval_batches(eval_ex, tok, int(cfg.train.batch_size),
                                   int(cfg.train.seq_len))
    eval_loss_before = loglik_eval(base_params, model_cfg, ft_eval_batches)["loss"]
    eval_before_s = time.time() - t0
    print(f"[quickstart] before fine-tuning: " + ", ".join(
        f"{t} {r['exact_match']:.1%}" for t, r in before.items())
          + f"; held-out eval loss {eval_loss_before:.3f} ({eval_before_s:.0f}s)")
    del base_params

    t = cfg.train
    bs, seq_len = int(t.batch_size), int(t.seq_len)
    it = ftdata.SyntheticLoader(train_ex + replay, tok, bs, seq_len, int(cfg.seed),
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    ft_dir = os.path.join(workdir, "finetune")
    method = get_method(cfg.get("peft"))
    result = loop.train(ft_cfg, ft_dir, model_cfg=model_cfg, init_params=init,
                        loss_fn=sft_loss(model_cfg, float(t.z_loss), method.apply_fn,
                                         method.bind_rng),
                        transform=method.transform, train_patterns=method.train_patterns,
                        wrap_optimizer=method.wrap_optimizer,
                        train_iter=it, eval_batches=ft_eval_batches, name="finetune")
    t0 = time.time()
    after = {t_: _score(result.params, model_cfg, tok, ex, d, method.apply_fn)
             for t_, ex in sets.items()}
    eval_after_s = time.time() - t0

    # 4. Report.
    results = {t_: {"before": round(before[t_]["exact_match"], 4),
                    "after": round(after[t_]["exact_match"], 4), "n": after[t_]["n"]}
               for t_ in sets}
    samples = [{"prompt": p, "before": pb, "after": pa, "answer": a}
               for (p, pb, a), (_, pa, _) in zip(before[task]["samples"], after[task]["samples"])]
    base_desc = {"file": os.path.relpath(base_path, REPO_ROOT) if base_path.startswith(REPO_ROOT)
                 else base_path,
                 "cached": f"pretrained earlier in this workdir ({base_path})",
                 "pretrained": f"pretrained in this run ({base_path})"}[source]
    _print_report(task, results, samples, base_desc)

    train_label = "train loss" + (f" ({float(d.get('replay_frac', 0.0)):.0%} replay)" if replay else "")
    curves = plots.read_curves(os.path.join(ft_dir, "metrics.jsonl"),
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
    png = os.path.join(workdir, "loss_curves.png")
    em_b, em_a = results[task]["before"], results[task]["after"]
    if _is_primary():
        plots.plot_loss_curves(png, panels, title=f"{task}: held-out exact match "
                                                  f"{em_b:.0%} -> {em_a:.0%}")

    wall = time.time() - t_start
    summary = {
        "task": task,
        "exact_match_before": em_b,
        "exact_match_after": em_a,
        "n_eval": results[task]["n"],
        "n_train": len(train_ex),
        "n_replay": len(replay),
        "other_tasks": {t_: r for t_, r in results.items() if t_ != task},
        "samples": samples,
        "steps": int(jax.device_get(result.state.step)),
        "method": method.name,
        "trainable_params": peft_core.count(result.state.params),
        "total_params": peft_core.count(result.params),
        "step_time_median_s": _median_step_time(result.history, int(t.batch_size) * seq_len),
        "peak_rss_mb": round(monitor.peak_rss_mb(), 1),
        "final_train_loss": curves[train_label][1][-1] if train_label in curves else None,
        "eval_loss_before": round(eval_loss_before, 5),
        "final_eval_loss": result.evals[-1]["eval_loss"] if result.evals else None,
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
        "loss_curves": png,
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
    }
    if _is_primary():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(f"[quickstart] held-out exact match on {task!r}: {em_b:.1%} -> {em_a:.1%}; "
          f"wall time {wall:.0f}s; wrote {png} and {os.path.join(workdir, 'summary.json')}")
    return summary
