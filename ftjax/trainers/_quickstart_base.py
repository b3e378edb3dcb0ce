"""The quickstart base: the small model ftjax pretrained itself on five synthetic tasks, which
the quickstart and memory-tuning trainers start from.

`obtain_base(cfg, workdir)` returns the shipped file (`base.path`, by default
`experiments/quickstart_base/model.safetensors`), or pretrains a base in the run (cached in
`<workdir>/base_<hash>/`) when `base.path` is empty or `base.force_pretrain` is set.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any

import jax
import ml_collections

from ftjax import config_utils
from ftjax import data as ftdata
from ftjax import plots, workdir as wd
from ftjax.eval.harness import exact_match_eval
from ftjax.io.files import read_metadata
from ftjax.io.params_file import save_params
from ftjax.train import run as run_lib
from ftjax.train.export import template_metadata
from ftjax.train.run import Run, fixed_batches, synthetic_loader
from ftjax.train.step import sft_loss

BASE_FILE = "model.safetensors"
PRETRAIN_EVAL_LOSS_EXAMPLES = 64  # per task, for the eval loss logged during pretraining


def phase_config(cfg: Any, *, train: Any, optimizer: Any, seed: int | None = None,
                 init_from: str = "") -> Any:
    """A copy of `cfg` whose `train`/`optimizer`/`seed` drive one training phase."""
    c = copy.deepcopy(cfg)
    c.train = copy.deepcopy(train)
    c.optimizer = copy.deepcopy(optimizer)
    if seed is not None:
        c.seed = int(seed)
    c.model.init_from = init_from
    return c


def score(params, model_cfg, tok, examples, data_cfg: Any, apply_fn=None) -> dict:
    """Greedy exact match with the data section's generation settings."""
    return exact_match_eval(params, model_cfg, tok, examples,
                            max_new_tokens=int(data_cfg.max_new_tokens),
                            batch_size=int(data_cfg.eval_batch_size), apply_fn=apply_fn)


def base_hash(cfg: Any) -> str:
    """Hash of everything that determines a pretrained base (not where it is read from)."""
    model = {k: v for k, v in cfg.model.to_dict().items() if k != "init_from"}
    base = {k: v for k, v in cfg.base.to_dict().items() if k not in ("path", "force_pretrain")}
    return config_utils.config_hash({"model": model, "base": base})


def resolve_path(path: str) -> str:
    """The base file: `path` as given if it exists, else under the ftjax root (any cwd)."""
    try:
        return run_lib.resolve_path(path, "base.path")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"base model: {e}; set --config.base.path to the file, or "
                                "--config.base.path= (empty) to pretrain the base in the run") \
            from None


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


def _curve_pairs(curve: plots.Curve) -> list[list[float]]:
    return [[int(s), round(float(v), 5)] for s, v in zip(*curve)]


def pretrain_base(cfg: Any, workdir: str) -> dict:
    """Pretrains the base on a mixture of `cfg.base.tasks` and saves `workdir/model.safetensors`.

    Uses `cfg.model` (architecture), `cfg.base` (data, `base.train`, `base.optimizer`, seed) and
    `cfg.data` (generation settings for the per-task exact match). Checkpoints go to
    `workdir/checkpoints`, so an interrupted pretraining resumes. The saved file carries, as
    metadata, the base hash, the per-task exact match and the loss curves. Returns that info
    plus the file's `path`.
    """
    b = cfg.base
    tasks = tuple(b.tasks)
    test_frac, seed = float(b.test_frac), int(b.seed)
    examples = ftdata.mixture(tasks, int(b.n_per_task), seed, exclude_test=True,
                              test_frac=test_frac)
    evals = {t: eval_examples_for(t, int(b.eval_examples), seed, test_frac) for t in tasks}
    t = b.train
    bs, seq_len = int(t.batch_size), int(t.seq_len)
    pcfg = phase_config(cfg, train=b.train, optimizer=b.optimizer, seed=seed)
    pcfg.peft = ml_collections.ConfigDict(dict(method="full", train_patterns=()))
    if pcfg.get("eval") is not None:
        pcfg.eval.tasks = ()  # the config's eval tasks judge the fine-tuning, not the base
    run = Run.build(pcfg, workdir, name="pretrain", tokenizer=ftdata.CharTokenizer())
    model_cfg, tok = run.model_cfg, run.tokenizer
    loss_ex = [ex for t_ in tasks for ex in evals[t_][:PRETRAIN_EVAL_LOSS_EXAMPLES]]
    result = run.train(sft_loss(model_cfg, float(t.z_loss)),
                       synthetic_loader(examples, tok, pcfg),
                       eval_batches=fixed_batches(loss_ex, tok, bs, seq_len))
    em, n_scored = {}, {}
    for task in tasks:
        r = score(result.state.params, model_cfg, tok, evals[task], cfg.data)
        em[task], n_scored[task] = round(r["exact_match"], 4), r["n"]
        print(f"[pretrain] {task:>8s}: exact match {r['exact_match']:6.1%} over {r['n']} "
              f"{'training facts (recall)' if task == 'lookup' else 'held-out prompts'}")
    metrics = wd.path(workdir, "metrics.jsonl")  # workdir: local (see obtain_base)
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
    if jax.process_index() == 0:
        # The layout it was trained in travels with the file (scripts/generate.py --chat).
        save_params(path, model_cfg, result.state.params, **info,
                    chat_template=template_metadata(pcfg, tok))
    return {**info, "path": path}


def obtain_base(cfg: Any, workdir: str) -> tuple[str, dict, str]:
    """(path, metadata, source) of the base; source is "file", "cached" or "pretrained"."""
    b = cfg.base
    if b.force_pretrain or not b.path:
        if wd.is_remote(workdir):  # safetensors reads and writes local files only
            raise ValueError(f"pretraining the quickstart base in the run writes a local "
                             f"safetensors file, but the workdir {workdir!r} is a URL; use the "
                             "shipped base (base.path) or a local --workdir")
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


