"""Trainer "dpo": preference fine-tuning (DPO and its variants, ORPO, SimPO) with any PEFT method.

Reuses `loop.train` with the preference objective (`objective.preference_loss`). Data: the
synthetic suite turned into pairs in memory (`data.tasks`, `data.corruption`), or a preference
file through the data pipeline (`data.source`). Evaluation on the validation pairs reports the
preference (reward) accuracy, margins, rewards and log-probs; with synthetic data also the
exact match of greedy generations before and after training. See docs/alignment.md.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ftjax import models
from ftjax.align import objective, precompute, reference
from ftjax.align.data import PreferenceLoader, synthetic_pairs
from ftjax.peft import get_method
from ftjax.train import loop, sft

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_init_from(cfg: Any) -> Any:
    """A copy of cfg whose `model.init_from` file path exists: relative paths that do not exist
    under the current directory are taken relative to the repository root."""
    src = cfg.model.get("init_from", "") or ""
    if not src or src.startswith("hf:") or os.path.exists(src):
        return cfg
    alt = os.path.join(REPO_ROOT, src)
    if not os.path.isabs(src) and os.path.exists(alt):
        cfg = copy.deepcopy(cfg)
        cfg.model.init_from = alt
        return cfg
    raise FileNotFoundError(f"model.init_from={src!r} not found (looked under {os.getcwd()!r} "
                            f"and the repository root {REPO_ROOT!r})")


def make_evaluator(loss_fn, placement: loop.Placement, batches: Sequence[dict],
                   prefix: str = "eval_") -> Callable[[int, Any], dict]:
    """`(step, full_params) -> metrics` over every validation pair: loss, reward accuracy,
    margin, rewards and log-probs, each a mean per pair (padding rows count nowhere)."""
    step_fn = jax.jit(lambda p, b: loss_fn(p, b, None)[1])

    def evaluate(step: int, params: Any) -> dict:
        tot: dict[str, float] = {}
        for b in batches:
            s = jax.device_get(step_fn(params, placement.put_batch(b)))
            for k, v in s.items():
                tot[k] = tot.get(k, 0.0) + float(v)
        n = max(tot.get("tokens", 0.0), 1.0)
        out = {f"{prefix}{'loss' if k == 'nll' else 'accuracy' if k == 'correct' else k}": v / n
               for k, v in tot.items() if k not in ("tokens", "broken_pairs")}
        out[f"{prefix}pairs"] = tot.get("tokens", 0.0)
        return out

    return evaluate


def _pipeline_pairs(cfg: Any, tok, workdir: str):
    """Preference loaders from the data pipeline (`data.source`)."""
    try:
        from ftjax.data import pipeline  # noqa: F401  (engineer F's module)
    except ImportError:
        raise ValueError("data.source is set but ftjax.data.pipeline is not available in this "
                         "checkout; use the synthetic data (data.source='')") from None
    raise NotImplementedError("the DPO trainer does not read data.source yet: wire "
                              "pipeline.prepare/make_loader here (docs/alignment.md)")


def run(cfg: Any, workdir: str) -> dict:
    cfg = resolve_init_from(cfg)
    tok = sft.tokenizer_for(cfg)
    model_cfg = sft.model_config(cfg.model)
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
    d, t, dcfg = cfg.data, cfg.train, cfg.dpo
    if d.get("source", ""):
        return _pipeline_pairs(cfg, tok, workdir)
    train_pairs, eval_pairs = synthetic_pairs(tuple(d.tasks), int(d.n_per_task), int(d.seed),
                                              float(d.test_frac), d.get("corruption", "perturb"))
    method = get_method(cfg.get("peft"))
    sft.check_exportable(cfg)
    init_params = sft.initial_params(cfg, model_cfg)
    base_abstract = (models.param_shapes(model_cfg) if getattr(init_params, "on_host", False)
                     else jax.eval_shape(init_params))
    tkey = loop.transform_key(int(cfg.seed))
    full_abstract = (jax.eval_shape(method.transform, base_abstract, tkey) if method.transform
                     else base_abstract)
    placement = loop.Placement(cfg, model_cfg, abstract_params=full_abstract)
    mode = reference.resolve_mode(dcfg.get("reference", "auto"), full_abstract,
                                  method.train_patterns, cfg.get("peft"), indexed_data=True)
    settings = objective.from_config(dcfg, mode)
    if not settings.uses_reference:
        mode = "none"
    print(f"[dpo] loss {list(settings.loss_types)} beta={settings.beta} reference={mode}; "
          f"{len(train_pairs)} train / {len(eval_pairs)} validation pairs")

    bs, seq_len = int(t.batch_size), int(t.seq_len)
    ref_bs = int(dcfg.get("ref_batch_size", 0) or bs)
    ref_cols = {"train": None, "eval": None}
    ref_params = None
    starting = lambda: reference.starting_reference(init_params, model_cfg, placement,
                                                    method.transform, tkey)
    if mode == "precompute":
        key = precompute.cache_key(cfg.model.to_dict(), cfg.get("peft").to_dict(), int(cfg.seed),
                                   seq_len, tok.vocab_size, precompute.pairs_fingerprint(train_pairs),
                                   precompute.pairs_fingerprint(eval_pairs))
        path = os.path.join(workdir, f"ref_logps_{key}.npz")
        arrays = precompute.load_cache(path, {"train": len(train_pairs), "eval": len(eval_pairs)})
        if arrays is None:
            ref = starting()
            arrays = {}
            for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
                c, r = precompute.precompute_pairs(ref, model_cfg, pairs, tok, ref_bs, seq_len,
                                                   placement)
                arrays[f"{split}_chosen"], arrays[f"{split}_rejected"] = c, r
            del ref
            precompute.save_cache(path, arrays)
            print(f"[dpo] reference log-probs of {len(train_pairs) + len(eval_pairs)} pairs "
                  f"computed once and cached in {path}")
        else:
            print(f"[dpo] reference log-probs read from {path}")
        ref_cols = {s: (arrays[f"{s}_chosen"], arrays[f"{s}_rejected"]) for s in ref_cols}
    elif mode == "copy":
        ref_params = starting()

    pk = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = PreferenceLoader(train_pairs, tok, bs, seq_len, int(cfg.seed),
                                  ref_logps=ref_cols["train"], **pk)
    eval_batches = list(PreferenceLoader(eval_pairs, tok, bs, seq_len, 0, shuffle=False,
                                         drop_remainder=False, num_epochs=1,
                                         ref_logps=ref_cols["eval"], **pk))
    if mode == "copy":
        with_ref = precompute.WithReference(train_iter, ref_params, model_cfg, placement)
        eval_batches = [with_ref.attach(b) for b in eval_batches]
        train_iter = with_ref

    loss_fn = objective.preference_loss(model_cfg, settings, method.apply_fn, method.bind_rng)
    evaluate = make_evaluator(loss_fn, placement, eval_batches)
    n_em = int(d.get("eval_examples", 0))
    em_examples = [{"prompt": p["prompt"], "answer": p["chosen"]} for p in eval_pairs[:n_em]]

    def exact_match(params) -> float | None:
        if not em_examples:
            return None
        from ftjax.eval.harness import exact_match_eval
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        return exact_match_eval(params, model_cfg, tok, em_examples,
                                max_new_tokens=int(d.max_new_tokens),
                                apply_fn=method.apply_fn)["exact_match"]

    before = {}
    if bool(dcfg.get("eval_before", True)):
        params0 = reference.starting_policy(init_params, model_cfg, placement, method.transform,
                                            tkey)
        before = evaluate(0, params0)
        before["exact_match"] = exact_match(params0)
        del params0
        print("[dpo] before: " + _fmt(before))

    result = loop.train(cfg, workdir, model_cfg=model_cfg, init_params=init_params,
                        loss_fn=loss_fn, train_iter=train_iter, eval_batches=(),
                        name="dpo", placement=placement, on_eval=evaluate,
                        transform=method.transform, train_patterns=method.train_patterns,
                        wrap_optimizer=method.wrap_optimizer)
    after = dict(result.evals[-1]) if result.evals else evaluate(int(t.steps), result.params)
    after.pop("step", None)
    after["exact_match"] = exact_match(result.params)
    print("[dpo] after:  " + _fmt(after))
    exported = sft.export_hf(cfg, model_cfg, result.params)
    summary = {"trainer": "dpo", "loss_type": list(settings.loss_types), "beta": settings.beta,
               "reference": mode, "train_pairs": len(train_pairs),
               "eval_pairs": len(eval_pairs), "before": before, "after": after,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "wall_s": result.wall_s,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from,
               "exported_hf_dir": exported}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _fmt(m: dict) -> str:
    keys = ("eval_loss", "eval_accuracy", "eval_margin", "eval_logps_accuracy", "exact_match")
    return " ".join(f"{k}={m[k]:.4f}" for k in keys if m.get(k) is not None)
