"""Trainer "dpo": preference fine-tuning (DPO and its variants, ORPO, SimPO) with any PEFT method.

Objective: `ftjax.align.objective.preference_loss` (pure losses in `ftjax.align.dpo`). Data: the
synthetic suite turned into pairs in memory (`data.tasks`, `data.corruption`), or the user's
preference data through the data pipeline (`data.source` / `data.sources`, format preference). Evaluation on the validation pairs reports the
preference (reward) accuracy, margins, rewards and log-probs; with synthetic data also the
exact match of greedy generations before and after training. See docs/alignment.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from ftjax import workdir as wd
from ftjax.align import objective, precompute, reference
from ftjax.align.data import PreferenceLoader, synthetic_pairs
from ftjax.eval.harness import exact_match_eval
from ftjax.train import optim
from ftjax.train.placement import Placement
from ftjax.train.run import Run, prepare_data, resolve_path, uses_files

# The trainer's own section: the preference objective's settings (`align/objective.py`).
DEFAULTS = {"dpo": objective.DEFAULTS}
# Rules checked before anything runs (ftjax/trainers/_validate.py); loss types and weights are
# checked by `align.dpo.check_settings` through `validate` below.
CHECKS = {"dpo": dict(beta="> 0", label_smoothing="in [0, 0.5)", simpo_gamma=">= 0",
                      discopop_tau="> 0", reference=reference.MODES)}


def make_evaluator(loss_fn, placement: Placement, batches: Sequence[dict],
                   prefix: str = "eval_") -> Callable[[int, Any], dict]:
    """`(step, full_params) -> metrics` over every validation pair: loss, reward accuracy,
    margin, rewards and log-probs, each a mean per pair (padding rows count nowhere)."""
    step_fn = jax.jit(lambda p, b: loss_fn(p, b, None)[1])

    def evaluate(step: int, params: Any) -> dict:
        tot: dict[str, float] = {}
        for b in batches:
            s = jax.device_get(step_fn(params, placement.put_batch(b)))
            for k, v in s.items():
                if np.ndim(v) == 0:  # per-layer MoE statistics are left to the train log
                    tot[k] = tot.get(k, 0.0) + float(v)
        n = max(tot.get("tokens", 0.0), 1.0)
        out = {f"{prefix}{'loss' if k == 'nll' else 'accuracy' if k == 'correct' else k}": v / n
               for k, v in tot.items() if k not in ("tokens", "broken_pairs")}
        out[f"{prefix}pairs"] = tot.get("tokens", 0.0)
        return out

    return evaluate


@dataclasses.dataclass
class PreferenceData:
    """Where the pairs come from, in the shapes the trainer needs."""
    train: Iterator[dict]                      # resumable loader of training batches
    evals: list[dict]                          # every validation pair once (padded batches)
    every_train_pair: Callable[[], Iterable[dict]]  # every training pair once (precompute)
    n_train: int
    n_eval: int
    fingerprint: str                           # identifies the pairs and their tokenization
    em_examples: list[dict] = dataclasses.field(default_factory=list)  # prompt/answer
    info: dict = dataclasses.field(default_factory=dict)


def synthetic_data(cfg: Any, tok) -> PreferenceData:
    """Pairs from the synthetic suite (`data.tasks`, `data.corruption`), in memory."""
    d, t = cfg.data, cfg.train
    train, test = synthetic_pairs(tuple(d.tasks), int(d.n_per_task), int(d.seed),
                                  float(d.test_frac), d.get("corruption", "perturb"))
    bs, seq = int(t.batch_size), int(t.seq_len)
    pk = dict(process_index=jax.process_index(), process_count=jax.process_count())
    once = lambda pairs: PreferenceLoader(pairs, tok, bs, seq, 0, shuffle=False,
                                          drop_remainder=False, num_epochs=1, **pk)
    fp = precompute.cache_key([[p["prompt"], p["chosen"], p["rejected"]] for p in train + test],
                              seq, tok.vocab_size)
    n_em = int(d.get("eval_examples", 0))
    return PreferenceData(
        train=PreferenceLoader(train, tok, bs, seq, int(cfg.seed), **pk),
        evals=list(once(test)), every_train_pair=lambda: once(train), n_train=len(train),
        n_eval=len(test), fingerprint=fp,
        em_examples=[{"prompt": p["prompt"], "answer": p["chosen"]} for p in test[:n_em]],
        info={"source": "synthetic", "tasks": list(d.tasks), "corruption": d.get("corruption")})


def file_data(cfg: Any, tok, workdir: str) -> PreferenceData:
    """Pairs from the user's data through the data pipeline (`data.source` / `data.sources`,
    format preference): prepared, cleaned and split once (report in the workdir)."""
    from ftjax.data import pipeline
    from ftjax.data.errors import DataError
    d, t = cfg.data, cfg.train
    prepared = prepare_data(cfg, tok, workdir)
    if prepared.kind != "preference":
        raise DataError(f"trainer 'dpo' trains on preference pairs (prompt/chosen/rejected), but "
                        f"this data is {prepared.kind!r}; set data.format=preference (and "
                        "data.field_map if the fields are named differently)")
    bs, seq = int(t.batch_size), int(t.seq_len)
    pi, pc = jax.process_index(), jax.process_count()
    eval_split = d.get("eval_split", "validation")
    if eval_split not in prepared.splits:
        raise DataError(f"data.eval_split={eval_split!r} is not a split of the prepared data "
                        f"({sorted(prepared.splits)}); preference training reports accuracy "
                        "on held-out pairs, so keep a validation ratio in data.splits.ratios")
    return PreferenceData(
        train=pipeline.make_loader(prepared, "train", tok, bs, seq, int(cfg.seed), pi, pc),
        evals=pipeline.eval_batches(prepared, eval_split, tok, bs, seq, pi, pc),
        every_train_pair=lambda: pipeline.eval_batches(prepared, "train", tok, bs, seq, pi, pc),
        n_train=len(prepared.split("train")), n_eval=len(prepared.split(eval_split)),
        fingerprint=precompute.cache_key(prepared.fingerprint, seq),
        info={"source": "files", "fingerprint": prepared.fingerprint,
              "splits": {k: len(v) for k, v in prepared.splits.items()},
              "report": "data_report.json"})


def run(cfg: Any, workdir: str) -> dict:
    t, dcfg = cfg.train, cfg.dpo
    optim.make_optimizer(cfg.optimizer, int(t.steps))  # bad optimizer settings fail here, early
    r = Run.build(cfg, workdir, name="dpo")
    r.check_exportable()
    method, tok = r.method, r.tokenizer
    data = file_data(cfg, tok, workdir) if uses_files(cfg) else synthetic_data(cfg, tok)
    mode = reference.resolve_mode(dcfg.reference, r.abstract_params,
                                  method.train_patterns, cfg.get("peft"))
    settings = objective.from_config(dcfg, mode)
    if not settings.uses_reference:
        mode = "none"
    print(f"[dpo] loss {list(settings.loss_types)} beta={settings.beta} reference={mode}; "
          f"{data.n_train} train / {data.n_eval} validation pairs")

    train_iter, eval_batches = data.train, data.evals
    if mode == "precompute":
        key = precompute.cache_key(cfg.model.to_dict(), cfg.get("peft").to_dict(),
                                   int(cfg.seed), data.fingerprint,
                                   precompute.weights_stamp(_weights_path(cfg)))
        path = wd.path(workdir, f"ref_logps_{key}.npz")
        table = precompute.load_cache(path)
        if table is None:
            ref = r.starting_params()
            parts = [precompute.compute_table(ref, r.model_cfg, batches, r.placement,
                                              method.apply_fn)
                     for batches in (data.every_train_pair(), eval_batches)]
            del ref
            table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            precompute.save_cache(path, table)
            print(f"[dpo] reference log-probs of {len(table['keys'])} pairs computed once, "
                  f"cached in {path}")
        else:
            print(f"[dpo] reference log-probs of {len(table['keys'])} pairs read from {path}")
        train_iter = precompute.Precomputed(train_iter, table)
        eval_batches = [train_iter.attach(b) for b in eval_batches]
    elif mode == "copy":
        train_iter = precompute.WithReference(train_iter, r.starting_params(), r.model_cfg,
                                              r.placement, method.apply_fn)
        eval_batches = [train_iter.attach(b) for b in eval_batches]

    loss_fn = objective.preference_loss(r.model_cfg, settings, method.apply_fn, method.bind_rng)
    evaluate = make_evaluator(loss_fn, r.placement, eval_batches)

    def exact_match(params) -> float | None:
        if not data.em_examples:
            return None
        return exact_match_eval(params, r.model_cfg, tok, data.em_examples,
                                max_new_tokens=int(cfg.data.get("max_new_tokens", 16)),
                                apply_fn=method.apply_fn, placement=r.placement)["exact_match"]

    before = {}
    if bool(dcfg.eval_before):
        params0 = r.starting_params()
        before = evaluate(0, params0)
        before["exact_match"] = exact_match(params0)
        del params0
        print("[dpo] before: " + _fmt(before))
    try:
        result = r.train(loss_fn, train_iter, on_eval=evaluate)
    finally:
        if hasattr(train_iter, "close"):
            train_iter.close()
    after = dict(result.evals[-1]) if result.evals else evaluate(int(t.steps), result.params)
    after.pop("step", None)
    after["exact_match"] = exact_match(result.params)
    print("[dpo] after:  " + _fmt(after))
    summary = {"trainer": "dpo", "loss_type": list(settings.loss_types), "beta": settings.beta,
               "reference": mode, "train_pairs": data.n_train, "eval_pairs": data.n_eval,
               "data": data.info, "before": before, "after": after,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "wall_s": result.wall_s,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
               "exported_hf_dir": r.export_hf(result.params)}
    r.write_summary(summary)
    return summary


def _weights_path(cfg: Any) -> str:
    """The starting weights' path as the run reads it (relative paths resolved)."""
    src = cfg.model.get("init_from", "") or ""
    return resolve_path(src) if src and not src.startswith("hf:") else src


def _fmt(m: dict) -> str:
    """The before/after line; says why reward accuracy is low when pairs tie (at the start,
    policy = reference: both implicit rewards are 0, and a tie is not a win)."""
    keys = ("eval_loss", "eval_accuracy", "eval_reward_ties", "eval_margin",
            "eval_logps_accuracy", "exact_match")
    line = " ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)
    ties = m.get("eval_reward_ties") or 0.0
    if ties > 0:
        why = (" since both rewards are 0 while the policy equals the reference" if ties == 1
               else "")
        line += ("\n[dpo]   eval_accuracy is reward accuracy: reward = beta * (log p - log "
                 "p_ref), won when chosen > rejected, as TRL counts it; "
                 f"{100 * ties:.1f}% of the pairs tie, which is no win{why}. "
                 "eval_logps_accuracy is the policy's own log p(chosen) > log p(rejected).")
    return line
