"""Classification metrics: accuracy, confusion matrix, per-class and macro precision / recall /
F1, and PR-AUC as average precision (one-vs-rest per class, then macro), in numpy.

Conventions follow scikit-learn: confusion rows are true classes and columns predictions; a
precision or recall whose denominator is 0 is 0; average precision is
AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (no interpolation). A class
with no positive examples has no AP (nan) and is left out of the macro AP.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["confusion_matrix", "precision_recall_f1", "average_precision",
           "classification_metrics", "format_metrics"]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """[C, C] int64 counts; entry (i, j) = examples of true class i predicted as j."""
    t = np.asarray(y_true, np.int64)
    p = np.asarray(y_pred, np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    for name, v in (("y_true", t), ("y_pred", p)):
        if len(v) and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} holds a class outside 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def precision_recall_f1(cm: np.ndarray) -> dict:
    """Per-class precision, recall, F1 and support from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    precision = _safe_div(tp, cm.sum(0))
    recall = _safe_div(tp, cm.sum(1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(1)}


def average_precision(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Average precision of binary labels (1 = positive) ranked by `scores` (higher = more
    positive); tied scores form one threshold. nan when there is no positive."""
    y = np.asarray(y_true, np.float64)
    s = np.asarray(scores, np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification_metrics(y_true: Sequence[int], scores: np.ndarray,
                           class_names: Optional[Sequence[str]] = None) -> dict:
    """All metrics from true class ids [N] and class scores [N, C] (probabilities or logits;
    the prediction is the argmax). Per-class values are lists in class order."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    y = np.asarray(y_true, np.int64)
    c = scores.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} score columns")
    pred = scores.argmax(-1)
    cm = confusion_matrix(y, pred, c)
    prf = precision_recall_f1(cm)
    ap = np.array([average_precision(y == k, scores[:, k]) for k in range(c)])
    present = prf["support"] > 0
    n = max(len(y), 1)
    return {
        "n": int(len(y)),
        "accuracy": float(np.trace(cm) / n),
        "classes": names,
        "precision": prf["precision"].tolist(),
        "recall": prf["recall"].tolist(),
        "f1": prf["f1"].tolist(),
        "support": prf["support"].tolist(),
        "average_precision": [None if np.isnan(a) else float(a) for a in ap],
        "macro_precision": float(prf["precision"].mean()),
        "macro_recall": float(prf["recall"].mean()),
        "macro_f1": float(prf["f1"].mean()),
        "weighted_f1": float((prf["f1"] * prf["support"]).sum() / n),
        "macro_pr_auc": float(np.nanmean(ap)) if present.any() else float("nan"),
        "confusion_matrix": cm.tolist(),
        # the same per-class values by class name (sweep metric paths such as
        # `metrics.validation.per_class.swap.recall` read these)
        "per_class": {str(name): {"precision": float(prf["precision"][k]),
                                  "recall": float(prf["recall"][k]),
                                  "f1": float(prf["f1"][k]),
                                  "support": int(prf["support"][k])}
                      for k, name in enumerate(names)},
    }


def format_metrics(m: dict) -> str:
    """A readable table of `classification_metrics` output, with the confusion matrix labelled
    by class name (rows true, columns predicted)."""
    names = [str(n) for n in m["classes"]]
    w = max([len("class")] + [len(n) for n in names])
    lines = [f"accuracy {m['accuracy']:.4f}  macro P/R/F1 {m['macro_precision']:.4f} / "
             f"{m['macro_recall']:.4f} / {m['macro_f1']:.4f}  macro PR-AUC "
             f"{m['macro_pr_auc']:.4f}  (n={m['n']})",
             f"{'class':<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'AP':>9} {'support':>8}"]
    for i, name in enumerate(names):
        ap = m["average_precision"][i]
        lines.append(f"{name:<{w}} {m['precision'][i]:>9.4f} {m['recall'][i]:>9.4f} "
                     f"{m['f1'][i]:>9.4f} {('-' if ap is None else f'{ap:.4f}'):>9} "
                     f"{m['support'][i]:>8}")
    cm = m["confusion_matrix"]
    corner = "true \\ pred"
    rw = max([len(corner)] + [len(n) for n in names])
    cw = [max([6, len(n)] + [len(str(row[j])) for row in cm]) for j, n in enumerate(names)]
    lines.append("confusion matrix (rows: true class, columns: predicted class):")
    lines.append(f"  {corner:<{rw}} " + " ".join(f"{n:>{c}}" for n, c in zip(names, cw)))
    lines += [f"  {name:<{rw}} " + " ".join(f"{v:>{c}}" for v, c in zip(row, cw))
              for name, row in zip(names, cm)]
    return "\n".join(lines)
