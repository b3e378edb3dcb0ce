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
    r = Run.build(cfg, workdir, name="kto")
    if uses_files(cfg):
        return run_files(cfg, workdir, r)
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
    return _train_and_report(r, loss_fn, train_iter, evaluate, before, _fmt, {
        "loss_type": settings.loss_type, "beta": settings.beta, "reference": mode,
        "train_examples": len(examples), "desirable": n_d, "weight_balance": balance,
        "eval_pairs": pairs.n_eval})


def _train_and_report(r: Run, loss_fn, train_iter, evaluate, before: dict, fmt,
                      info: dict) -> dict:
    """Both data paths: train, evaluate after, write summary.json (with `info`)."""
    try:
        result = r.train(loss_fn, train_iter, on_eval=evaluate)
    finally:
        if hasattr(train_iter, "close"):
            train_iter.close()
    after = dict(result.evals[-1]) if result.evals else evaluate(int(r.cfg.train.steps),
                                                                 result.params)
    after.pop("step", None)
    print("[kto] after:  " + fmt(after))
    summary = {"trainer": "kto", **info, "before": before, "after": after,
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


def kto_evaluator(loss_fn, placement, batches):
    """`(step, params) -> metrics` over every validation example: the KTO loss, the KL
    baseline, and the mean implicit reward beta * log(pi / pi_ref) of desirable and of
    undesirable examples, and their gap (which training should widen)."""
    step_fn = jax.jit(lambda p, b: loss_fn(p, b, None)[1])

    def evaluate(step: int, params) -> dict:
        tot: dict[str, float] = {}
        for b in batches:
            st = jax.device_get(step_fn(params, placement.put_batch(b)))
            for k, v in st.items():
                if np.ndim(v) == 0:
                    tot[k] = tot.get(k, 0.0) + float(v)
        n = max(tot.get("tokens", 0.0), 1.0)
        rd = tot["rewards_desirable"] / max(tot["n_desirable"], 1.0)
        ru = tot["rewards_undesirable"] / max(tot["n_undesirable"], 1.0)
        return {"eval_loss": tot["nll"] / n, "eval_kl": tot["kl"] / n,
                "eval_rewards_desirable": rd, "eval_rewards_undesirable": ru,
                "eval_reward_gap": rd - ru, "eval_examples": tot.get("tokens", 0.0)}

    return evaluate


def run_files(cfg: Any, workdir: str, r: Run) -> dict:
    """KTO on the user's unpaired data (data.format=unpaired: prompt, completion, label)
    through the data pipeline; KL rows are built in each batch from the next example's
    completion (`align.kto.kl_layout`), so the reference is strip or a frozen copy."""
    from ftjax.data import pipeline
    from ftjax.data.errors import DataError
    from ftjax.train.run import prepare_data
    t, kcfg, tok, method = cfg.train, cfg.kto, r.tokenizer, r.method
    prepared = prepare_data(cfg, tok, workdir)
    if prepared.kind != "unpaired":
        raise DataError(f"trainer 'kto' trains on unpaired feedback (prompt, completion, label), "
                        f"but this data is {prepared.kind!r}; set data.format=unpaired (and "
                        "data.field_map if the fields are named differently)")
    eval_split = cfg.data.get("eval_split", "validation")
    if eval_split not in prepared.splits:
        raise DataError(f"data.eval_split={eval_split!r} is not a split of the prepared data "
                        f"({sorted(prepared.splits)}); keep a validation ratio in "
                        "data.splits.ratios")
    mode = str(kcfg.reference)
    if mode == "precompute":
        raise ValueError("kto.reference='precompute' needs KL rows fixed per example, which the "
                         "synthetic data has; with files the KL rows are built per batch: use "
                         "strip (adapters), copy or auto")
    mode = reference.resolve_mode(mode, r.abstract_params, method.train_patterns,
                                  cfg.get("peft"))
    mode = "copy" if mode == "precompute" else mode
    settings = kto.from_config(kcfg, mode)
    bs, seq = int(t.batch_size), int(t.seq_len)
    pi, pc = jax.process_index(), jax.process_count()
    train_iter = kto.WithKLRows(pipeline.make_loader(prepared, "train", tok, bs, seq,
                                                     int(cfg.seed), pi, pc), tok.pad_id)
    eval_batches = [kto.kl_layout(b, tok.pad_id)
                    for b in pipeline.eval_batches(prepared, eval_split, tok, bs, seq, pi, pc)]
    if mode == "copy":
        train_iter = precompute.WithReference(train_iter, r.starting_params(), r.model_cfg,
                                              r.placement, method.apply_fn)
        eval_batches = [train_iter.attach(b) for b in eval_batches]
    n_train = len(prepared.split("train"))
    print(f"[kto] {n_train} unpaired training examples from files; loss {settings.loss_type} "
          f"beta={settings.beta} reference={mode}")
    loss_fn = kto.kto_loss(r.model_cfg, settings, method.apply_fn, method.bind_rng)
    evaluate = kto_evaluator(loss_fn, r.placement, eval_batches)
    before = evaluate(0, r.starting_params()) if bool(kcfg.eval_before) else {}
    if before:
        print("[kto] before: " + _fmt_files(before))
    return _train_and_report(r, loss_fn, train_iter, evaluate, before, _fmt_files, {
        "loss_type": settings.loss_type, "beta": settings.beta, "reference": mode,
        "train_examples": n_train,
        "data": {"source": "files", "fingerprint": prepared.fingerprint,
                 "splits": {k: len(v) for k, v in prepared.splits.items()}}})


def _fmt_files(m: dict) -> str:
    keys = ("eval_loss", "eval_kl", "eval_rewards_desirable", "eval_rewards_undesirable",
            "eval_reward_gap")
    return " ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)
