"""Trainer "classify": sequence classification with a head on the causal LM, any PEFT method.

Objective: `ftjax.train.classify_head` (cross-entropy, class-weighted or focal loss on the
last real token's hidden state). Data: classification records through the data pipeline
(`data.format=classification`; imbalance handling in `data.imbalance`). Evaluation: accuracy,
per-class and macro precision / recall / F1, PR-AUC (`ftjax.eval.classification`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np

from ftjax.data.classification import class_counts
from ftjax.data.imbalance import CLASS_WEIGHT_SCHEMES
from ftjax.eval.classification import classification_metrics, format_metrics
from ftjax.train.batches import Rank2Iterator, as_rank2
from ftjax.train.classify_head import LOSSES, classify_loss, head_params, make_predict
from ftjax.train.run import Run, model_config, prepare_data, tokenizer_for


# The trainer's own section, every setting with its default (`configs/classify_file.py`).
DEFAULTS = {"classify": dict(
    loss="ce",                  # ce | weighted | focal
    class_weights="inverse",    # inverse | sqrt_inverse | effective_number
    beta=0.999,                 # effective_number: (1 - beta) / (1 - beta^n_c)
    gamma=2.0,                  # focal: (1 - p_t)^gamma
    focal_alpha="none",         # focal: none | class_weights (alpha_t = w[y])
)}
# Refused before the run builds anything (`trainers/_validate.py`).
CHECKS = {"classify": dict(loss=LOSSES, class_weights=CLASS_WEIGHT_SCHEMES, beta="in [0, 1)",
                           gamma=">= 0", focal_alpha=("none", "class_weights"))}


def loss_weights(kcfg: Any, counts: np.ndarray, classes: Sequence[str]):
    """(class_weight, alpha) for the configured loss: class weights for "weighted", and for
    "focal" when classify.focal_alpha="class_weights"."""
    from ftjax.data.imbalance import class_weights
    loss = kcfg.loss
    alpha_mode = kcfg.focal_alpha or "none"
    if alpha_mode not in ("none", "class_weights"):
        raise ValueError(f"classify.focal_alpha={alpha_mode!r}; use 'none' or 'class_weights'")
    if loss == "weighted" or (loss == "focal" and alpha_mode == "class_weights"):
        w = class_weights(dict(zip(classes, counts)), kcfg.class_weights, float(kcfg.beta))
        # class_weights returns sorted-label order; put it back into class-list order
        order = {c: i for i, c in enumerate(sorted(classes, key=str))}
        w = np.array([w[order[c]] for c in classes])
        return (w, None) if loss == "weighted" else (None, w)
    return None, None


def build(cfg: Any, workdir: str, num_classes: int, *, model_cfg=None, **kw) -> Run:
    """The run with a fresh classification head added after the PEFT transform."""
    model_cfg = model_cfg or model_config(cfg.model)
    std = float(getattr(model_cfg, "init_std", 0.02) or 0.02)
    return Run.build(cfg, workdir, name="classify", model_cfg=model_cfg,
                     add_params=head_params(model_cfg.hidden_size, num_classes, std), **kw)


def train_classifier(r: Run, train_iter, eval_batches: Sequence[dict] = (), *,
                     loss: str = "ce", class_weight=None, gamma: float = 2.0, alpha=None,
                     class_names: Optional[Sequence[str]] = None):
    """Trains `r` (built with `build`) with the chosen loss and per-eval classification
    metrics. Returns (TrainResult, predict) where predict(params, batches) gives probs and
    labels."""
    predict = make_predict(r.model_cfg, r.placement, r.method.apply_fn)

    def on_eval(step, params):
        if not eval_batches:
            return {}
        probs, labels = predict(params, eval_batches)
        m = classification_metrics(labels, probs, class_names)
        return {"macro_f1": m["macro_f1"], "macro_recall": m["macro_recall"],
                "macro_pr_auc": m["macro_pr_auc"]}

    loss_fn = classify_loss(r.model_cfg, loss, class_weight=class_weight, gamma=gamma,
                            alpha=alpha, apply_fn=r.method.apply_fn, bind_rng=r.method.bind_rng)
    result = r.train(loss_fn, Rank2Iterator(train_iter),
                     eval_batches=[as_rank2(b) for b in eval_batches], on_eval=on_eval)
    return result, predict


def run(cfg: Any, workdir: str) -> dict:
    from ftjax.data import pipeline
    if cfg.get("export", {}).get("hf_dir", ""):
        raise ValueError("export.hf_dir: a classification head has no place in a causal-LM "
                         "Hugging Face export; unset export.hf_dir (the ftjax checkpoint holds "
                         "the head)")
    kcfg = cfg.classify
    if kcfg.loss not in LOSSES:
        raise ValueError(f"classify.loss={kcfg.loss!r} is not known; choose one of {LOSSES}")
    tok, t = tokenizer_for(cfg), cfg.train
    bsz, seq_len, seed = int(t.batch_size), int(t.seq_len), int(cfg.seed)
    pi, pc = jax.process_index(), jax.process_count()
    prepared = prepare_data(cfg, tok, workdir)
    if prepared.kind != "classification":
        raise ValueError(f"trainer 'classify' needs classification data ({{text, label}}); "
                         f"the data is of kind {prepared.kind!r} (set data.format="
                         "'classification' and map the fields with data.field_map)")
    classes = list(prepared.labels)
    counts = class_counts(prepared.split_labels["train"], classes)
    cw, alpha = loss_weights(kcfg, counts, classes)
    print("classify: classes " + ", ".join(f"{c}={n}" for c, n in zip(classes, counts))
          + f" (train); loss {kcfg.loss}"
          + ("" if cw is None else " class weights " + np.array2string(cw, precision=3))
          + ("" if alpha is None else " alpha " + np.array2string(alpha, precision=3)))
    eval_split = cfg.data.get("eval_split", "validation")
    eval_b = (pipeline.eval_batches(prepared, eval_split, tok, bsz, seq_len, pi, pc)
              if eval_split in prepared.splits else [])
    train_iter = pipeline.make_loader(prepared, "train", tok, bsz, seq_len, seed, pi, pc)
    r = build(cfg, workdir, len(classes), tokenizer=tok)
    try:
        result, predict = train_classifier(r, train_iter, eval_b, loss=kcfg.loss,
                                           class_weight=cw, gamma=float(kcfg.gamma),
                                           alpha=alpha, class_names=classes)
    finally:
        if hasattr(train_iter, "close"):
            train_iter.close()
    metrics = {}
    for split in [s for s in (eval_split, "test") if s in prepared.splits]:
        batches = eval_b if split == eval_split else pipeline.eval_batches(
            prepared, split, tok, bsz, seq_len, pi, pc)
        probs, labels = predict(result.params, batches)
        metrics[split] = classification_metrics(labels, probs, classes)
        print(f"[{split}] " + format_metrics(metrics[split]))
    summary = {"loss": kcfg.loss, "classes": classes, "train_counts": counts.tolist(),
               "class_weight": None if cw is None else cw.tolist(),
               "alpha": None if alpha is None else alpha.tolist(),
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "metrics": metrics, "wall_s": result.wall_s,
               "stopped_early": result.stopped_early, "resumed_from": result.resumed_from}
    r.write_summary(summary)
    return summary
