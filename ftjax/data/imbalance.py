"""Imbalance handling: weighted mixtures of sources, over/undersampling to target label
ratios, stratified batches, and class weights for the classification losses.

All sampling is seeded and deterministic; indices are int64 numpy arrays.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ftjax.data.errors import DataError
from ftjax.data.splits import hash_order

__all__ = ["mixture_indices", "target_counts", "oversample", "undersample",
           "stratified_batches", "class_weights", "CLASS_WEIGHT_SCHEMES"]


def _weights(weights: Sequence[float], n: int, what: str) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise DataError(f"{what}: got {len(w)} weights for {n} entries; give one weight each")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"{what}: weights {tuple(weights)} must be finite, >= 0 and not all 0")
    return w / w.sum()


def mixture_indices(sizes: Sequence[int], weights: Sequence[float], seed: int,
                    num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws `num_examples` (source, index) pairs: the source of each draw is sampled with
    probability proportional to its weight; within a source, examples are visited in a seeded
    shuffled order without replacement, reshuffled each time the source is exhausted (so a
    small source with a large weight is repeated, a large one with a small weight subsampled).

    Returns (source_ids [num_examples], example_ids [num_examples]).
    """
    sizes = [int(s) for s in sizes]
    p = _weights(weights, len(sizes), "mixture_indices")
    for i, (s, w) in enumerate(zip(sizes, p)):
        if w > 0 and s <= 0:
            raise DataError(f"mixture source {i} has weight {w:.3g} but no examples; drop it "
                            "or give it weight 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D6978]))
    src = rng.choice(len(sizes), size=num_examples, p=p)
    ex = np.empty(num_examples, np.int64)
    for i, s in enumerate(sizes):
        pos = np.flatnonzero(src == i)
        if not len(pos):
            continue
        epochs = -(-len(pos) // s)
        order = np.concatenate([hash_order(s, seed, salt=(i << 20) + e) for e in range(epochs)])
        ex[pos] = order[:len(pos)]
    return src.astype(np.int64), ex


def _label_ids(labels: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(x) for x in labels})
    index = {c: i for i, c in enumerate(names)}
    return np.array([index[str(x)] for x in labels], np.int64), names


def _target_ratios(names: list[str], target: Union[None, str, Mapping[str, float]]) -> np.ndarray:
    if target is None or target == "balanced":
        return np.full(len(names), 1.0 / len(names))
    if isinstance(target, str):
        raise DataError(f"target ratios {target!r}: use 'balanced' or a {{label: ratio}} dict")
    target = {str(k): float(v) for k, v in dict(target).items()}
    missing = [c for c in names if c not in target]
    extra = [c for c in target if c not in names]
    if missing or extra:
        raise DataError(f"target ratios must name exactly the labels present {names}; "
                        f"missing {missing}, not in the data {extra}")
    return _weights([target[c] for c in names], len(names), "target ratios")


def target_counts(counts: np.ndarray, ratios: np.ndarray, mode: str) -> np.ndarray:
    """Per-label counts with proportions `ratios`: "over" keeps every example (the total
    grows until no label needs fewer than it has), "under" keeps as many as possible
    without repeating any."""
    pos = ratios > 0
    if mode == "over":
        total = np.max(counts[pos] / ratios[pos])
        out = np.ceil(total * ratios - 1e-9).astype(np.int64)
        return np.where(pos, np.maximum(out, counts), 0)
    total = np.min(counts[pos] / ratios[pos])
    return np.where(pos, np.floor(total * ratios + 1e-9).astype(np.int64), 0)


def _resample(labels: Sequence[Any], target, seed: int, mode: str) -> np.ndarray:
    y, names = _label_ids(labels)
    if not len(y):
        raise DataError("cannot resample an empty dataset")
    counts = np.bincount(y, minlength=len(names))
    want = target_counts(counts, _target_ratios(names, target), mode)
    out = []
    for c in range(len(names)):
        idx = np.flatnonzero(y == c)
        reps = -(-int(want[c]) // len(idx))
        order = np.concatenate([idx[hash_order(len(idx), seed, salt=(c << 20) + e)]
                                for e in range(max(reps, 1))])
        # Oversampling keeps every original once and adds random repeats on top.
        out.append(order[:want[c]] if mode == "under" or want[c] <= len(idx)
                   else np.concatenate([idx, order[len(idx):want[c]]]))
    return np.sort(np.concatenate(out))


def oversample(labels: Sequence[Any], target: Union[None, str, Mapping[str, float]] = "balanced",
               seed: int = 0) -> np.ndarray:
    """Indices (sorted, with repeats) in which label proportions match `target` ("balanced"
    or {label: ratio}) by repeating minority examples; every example appears at least once."""
    return _resample(labels, target, seed, "over")


def undersample(labels: Sequence[Any], target: Union[None, str, Mapping[str, float]] = "balanced",
                seed: int = 0) -> np.ndarray:
    """Indices (sorted, no repeats) in which label proportions match `target` by dropping
    random majority examples."""
    return _resample(labels, target, seed, "under")


def stratified_batches(labels: Sequence[Any], batch_size: int, seed: int = 0,
                       drop_remainder: bool = True) -> np.ndarray:
    """Batches of example indices [num_batches, batch_size] in which every label's count is
    within 1 of batch_size * its share of the data (so every label with share >= 1/batch_size
    appears in every batch).

    The batches use n // batch_size * batch_size examples, chosen so that label proportions
    hold; the rest are left out (drop_remainder=True) or form a last, smaller batch
    returned with -1 padding.
    """
    y, names = _label_ids(labels)
    n, b = len(y), int(batch_size)
    if b < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    nb = n // b
    if nb == 0:
        raise DataError(f"stratified batches: {n} examples are fewer than one batch of {b}")
    counts = np.bincount(y, minlength=len(names))
    # Examples per label used in the full batches: largest-remainder share of nb * b.
    ideal = counts * (nb * b) / n
    used = np.floor(ideal).astype(np.int64)
    used[np.argsort(-(ideal - used), kind="stable")[:nb * b - used.sum()]] += 1
    base, extra = used // nb, used % nb
    # Label c contributes base[c] to every batch plus one to extra[c] batches; the extras of
    # consecutive labels are dealt cyclically, so every batch receives the same number.
    per_batch = np.tile(base, (nb, 1))
    start = 0
    for c in range(len(names)):
        per_batch[(start + np.arange(extra[c])) % nb, c] += 1
        start += int(extra[c])
    per_batch = per_batch[hash_order(nb, seed, salt=-2)]
    batches = np.empty((nb, b), np.int64)
    left = []
    pools = []
    for c in range(len(names)):
        idx = np.flatnonzero(y == c)
        idx = idx[hash_order(len(idx), seed, salt=c + 1)]
        pools.append(idx[:used[c]])
        left.append(idx[used[c]:])
    offsets = np.zeros(len(names), np.int64)
    for i in range(nb):
        row = []
        for c in range(len(names)):
            k = per_batch[i, c]
            row.append(pools[c][offsets[c]:offsets[c] + k])
            offsets[c] += k
        row = np.concatenate(row)
        batches[i] = row[hash_order(b, seed, salt=(i << 8) + 7)]
    if drop_remainder:
        return batches
    rest = np.concatenate(left)
    if not len(rest):
        return batches
    last = np.full((1, b), -1, np.int64)
    last[0, :len(rest)] = rest[hash_order(len(rest), seed, salt=-3)]
    return np.concatenate([batches, last])


CLASS_WEIGHT_SCHEMES = ("inverse", "sqrt_inverse", "effective_number")


def class_weights(counts: Union[Sequence[int], Mapping[Any, int]], scheme: str = "inverse",
                  beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights from training label counts, scaled so that the average weight
    over the training examples is 1 (so the loss keeps its scale).

    inverse: w_c proportional to 1 / n_c (then w_c = N / (C n_c), sklearn's "balanced").
    sqrt_inverse: proportional to 1 / sqrt(n_c). effective_number: proportional to
    (1 - beta) / (1 - beta^n_c), the inverse effective number of samples (Cui et al. 2019,
    "Class-Balanced Loss Based on Effective Number of Samples", eq. 3).
    counts: an array in class order, or a {label: count} dict (weights in sorted label order).
    """
    if isinstance(counts, Mapping):
        keys = sorted(counts, key=str)
        names = [str(k) for k in keys]
        n = np.array([counts[k] for k in keys], np.float64)
    else:
        n = np.asarray(counts, np.float64)
        names = [str(i) for i in range(len(n))]
    if n.ndim != 1 or not len(n):
        raise DataError("class_weights needs one count per class")
    empty = [names[i] for i in np.flatnonzero(n <= 0)]
    if empty:
        raise DataError(f"class_weights: class(es) {empty} have no training examples; remove "
                        "them from the class list or add examples")
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "sqrt_inverse":
        w = 1.0 / np.sqrt(n)
    elif scheme == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise DataError(f"effective_number needs 0 <= beta < 1, got {beta}")
        w = (1.0 - beta) / (1.0 - np.power(beta, n))
    else:
        raise DataError(f"class weight scheme {scheme!r} is not known; choose one of "
                        f"{CLASS_WEIGHT_SCHEMES}")
    return w * n.sum() / (w * n).sum()
