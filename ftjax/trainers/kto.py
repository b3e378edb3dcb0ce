"""Trainer "kto": KTO on unpaired feedback (prompt, completion, desirable or not), any PEFT method.

Objective: `ftjax.align.kto.kto_loss` over `align.rl.kto_losses` (TRL's loss: the KL baseline
from mismatched pairs, detached and clamped at 0; desirable / undesirable weights; or
`apo_zero_unpaired`). Data: the synthetic suite as unpaired feedback — each training prompt
appears once, with its correct answer (desirable) or a corrupted one (undesirable), by a seeded
coin (`data.desirable_frac`). The reference is the starting policy, found as the DPO trainer
finds it (`kto.reference`: strip adapters, precompute once, or a frozen copy).
Evaluation: implicit-reward accuracy on held-out *pairs* (β·log π/π_ref of the correct answer
above the corrupted one's), margins and log-probs, before and after.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ftjax import workdir as wd
from ftjax.align import kto, objective, precompute, reference
from ftjax.align.data import synthetic_pairs
from ftjax.data.synthetic import DeterministicRng
from ftjax.train import optim
from ftjax.train.run import Run, uses_files
from ftjax.trainers.dpo import PreferenceData, _weights_path, make_evaluator, synthetic_data

DEFAULTS = {"kto": kto.DEFAULTS}
CHECKS = {"kto": dict(beta="> 0", desirable_weight=">= 0", undesirable_weight=">= 0",
                      reference=reference.MODES, loss_type=kto.KTO_LOSS_TYPES)}


def unpaired_examples(cfg: Any) -> list[dict]:
    """The training prompts of the synthetic pairs, each once, labelled by a seeded coin."""
    d = cfg.data
    train, _ = synthetic_pairs(tuple(d.tasks), int(d.n_per_task), int(d.seed),
                               float(d.test_frac), d.get("corruption", "perturb"))
    rng = DeterministicRng("kto-labels", int(d.seed))
    frac = float(d.get("desirable_frac", 0.5))
    out = []
    for p in train:
        good = rng.next_u64() / 2.0 ** 64 < frac
        out.append({"prompt": p["prompt"], "completion": p["chosen"] if good else p["rejected"],
                    "label": good})
    return out


def run(cfg: Any, workdir: str) -> dict:
    t, kcfg = cfg.train, cfg.kto
    optim.make_optimizer(cfg.optimizer, int(t.steps))
    if uses_files(cfg):
        raise ValueError("trainer 'kto' reads the synthetic suite (data.tasks) for now; "
                         "unpaired files (data.format=unpaired) are not wired to it yet: "
                         "unset data.source / data.sources")
    r = Run.build(cfg, workdir, name="kto")
    r.check_exportable()
    tok, method = r.tokenizer, r.method
    examples = unpaired_examples(cfg)
    balance = kto.weight_balance(examples, float(kcfg.desirable_weight),
                                 float(kcfg.undesirable_weight))
    n_d = sum(e["label"] for e in examples)
    print(f"[kto] {len(examples)} unpaired examples ({n_d} desirable); "
          f"lambda_D*n_D/(lambda_U*n_U) = {balance:.3f}"
          + ("" if 1.0 <= balance <= 4 / 3 else " (the KTO paper recommends [1, 4/3]: adjust "
                                                "kto.desirable_weight / undesirable_weight)"))
    bs, seq = int(t.batch_size), int(t.seq_len)
    pk = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = kto.KTOLoader(examples, tok, bs, seq, int(cfg.seed), int(cfg.data.seed), **pk)
    pairs: PreferenceData = synthetic_data(cfg, tok)      # held-out pairs for evaluation
    eval_batches = pairs.evals

    mode = reference.resolve_mode(kcfg.reference, r.abstract_params, method.train_patterns,
                                  cfg.get("peft"))
    settings = kto.from_config(kcfg, mode)
    if mode == "precompute":
        key = precompute.cache_key("kto", cfg.model.to_dict(), cfg.get("peft").to_dict(),
                                   int(cfg.seed), pairs.fingerprint, len(examples),
                                   precompute.weights_stamp(_weights_path(cfg)))
        path = wd.path(workdir, f"ref_logps_{key}.npz")
        table = precompute.load_cache(path)
        if table is None:
            ref = r.starting_params()
            once = kto.KTOLoader(examples, tok, bs, seq, 0, int(cfg.data.seed), shuffle=False,
                                 drop_remainder=False, num_epochs=1, **pk)
            parts = [precompute.compute_table(ref, r.model_cfg, batches, r.placement,
                                              method.apply_fn)
                     for batches in (once, eval_batches)]
            del ref
            table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            precompute.save_cache(path, table)
        train_iter = precompute.Precomputed(train_iter, table)
        eval_batches = [train_iter.attach(b) for b in eval_batches]
    elif mode == "copy":
        train_iter = precompute.WithReference(train_iter, r.starting_params(), r.model_cfg,
                                              r.placement, method.apply_fn)
        eval_batches = [train_iter.attach(b) for b in eval_batches]
    print(f"[kto] loss {settings.loss_type} beta={settings.beta} reference={mode}")

    loss_fn = kto.kto_loss(r.model_cfg, settings, method.apply_fn, method.bind_rng)
    # Held-out pairs scored by the implicit reward beta * log(pi / pi_ref), as DPO reports it.
    pair_settings = objective.from_config({"loss_type": ("sigmoid",), "beta": settings.beta},
                                          mode)
    evaluate = make_evaluator(objective.preference_loss(r.model_cfg, pair_settings,
                                                        method.apply_fn), r.placement,
                              eval_batches)
    before = evaluate(0, r.starting_params()) if bool(kcfg.eval_before) else {}
    if before:
        print("[kto] before: " + _fmt(before))
    result = r.train(loss_fn, train_iter, on_eval=evaluate)
    after = dict(result.evals[-1]) if result.evals else evaluate(int(t.steps), result.params)
    after.pop("step", None)
    print("[kto] after:  " + _fmt(after))
    summary = {"trainer": "kto", "loss_type": settings.loss_type, "beta": settings.beta,
               "reference": mode, "train_examples": len(examples), "desirable": n_d,
               "weight_balance": balance, "eval_pairs": pairs.n_eval,
               "before": before, "after": after,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "wall_s": result.wall_s,
               "resumed_from": result.resumed_from,
               "exported_hf_dir": r.export_hf(result.params)}
    r.write_summary(summary)
    return summary


def _fmt(m: dict) -> str:
    keys = ("eval_accuracy", "eval_margin", "eval_rewards_chosen", "eval_rewards_rejected",
            "eval_logps_accuracy")
    return " ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)
