"""Seeded, reproducible train/validation/test splits: by ratio, stratified by label, K-fold.

Every function returns sorted int64 index arrays. Randomness comes from a counter-based hash
of (seed, index) (`hash_order`), not from a numpy generator stream, so the same seed gives the
same split on any machine and numpy version.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence, Union

import numpy as np

from ftjax.data.errors import DataError

__all__ = ["hash_order", "split_sizes", "ratio_split", "stratified_split", "kfold",
           "kfold_assignments"]

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mix."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hash_order(n: int, seed: int, salt: int = 0) -> np.ndarray:
    """A seeded permutation of range(n): indices sorted by a hash of (seed, salt, index)."""
    base = _splitmix64(np.array([seed & (2**64 - 1)], np.uint64) ^ _splitmix64(
        np.array([salt & (2**64 - 1)], np.uint64)))
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ base)
    return np.argsort(keys, kind="stable").astype(np.int64)


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, np.float64)
    if r.ndim != 1 or len(r) < 2:
        raise DataError(f"split ratios {tuple(ratios)} need at least two entries, "
                        "e.g. (0.8, 0.2) or (0.8, 0.1, 0.1)")
    if np.any(r <= 0) or abs(r.sum() - 1.0) > 1e-6:
        raise DataError(f"split ratios {tuple(ratios)} must be positive and sum to 1 "
                        f"(they sum to {r.sum():g})")
    return r


def split_sizes(n: int, ratios: Sequence[float]) -> np.ndarray:
    """Sizes summing to n, each within 1 of n * ratio (largest-remainder rounding)."""
    r = _check_ratios(ratios)
    ideal = n * r
    sizes = np.floor(ideal).astype(np.int64)
    rest = n - int(sizes.sum())
    order = np.argsort(-(ideal - sizes), kind="stable")
    sizes[order[:rest]] += 1
    return sizes


def _nonempty(sizes: np.ndarray, n: int, ratios: Sequence[float], what: str) -> None:
    if np.any(sizes == 0):
        k = int(np.argmin(sizes))
        raise DataError(f"{what} of {n} examples with ratios {tuple(ratios)} leaves split {k} "
                        "empty; add data or raise that split's ratio")


def ratio_split(n: int, ratios: Sequence[float] = (0.8, 0.2), seed: int = 0) -> list[np.ndarray]:
    """Random split of range(n) into len(ratios) disjoint parts covering everything, sizes
    within 1 of n * ratio (default 80/20; three ratios give train/validation/test)."""
    sizes = split_sizes(n, ratios)
    _nonempty(sizes, n, ratios, "ratio split")
    perm = hash_order(n, seed)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _encode(labels: Sequence[Any]) -> tuple[np.ndarray, list]:
    """Labels -> (ids in first-appearance-independent sorted order, class list)."""
    names = sorted({str(x) for x in labels})
    index = {c: i for i, c in enumerate(names)}
    return np.array([index[str(x)] for x in labels], np.int64), names


def _round_matrix(ideal: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray) -> np.ndarray:
    """Integer matrix, each cell floor or ceil of `ideal`, with the given row and column sums.

    Controlled rounding: floors first, then the missing units of each row go to the columns
    with the largest outstanding deficit (Gale-Ryser greedy; cells with a larger fractional
    part first on ties). Each row needs fewer units than there are columns, so it succeeds.
    """
    out = np.floor(ideal).astype(np.int64)
    frac = ideal - out
    row_need = row_sums - out.sum(1)
    col_need = col_sums - out.sum(0)
    for i in np.argsort(-row_need, kind="stable"):
        k = int(row_need[i])
        if k == 0:
            continue
        order = np.lexsort((-frac[i], -col_need))  # primary: column deficit, then fraction
        cols = [j for j in order if col_need[j] > 0][:k]
        if len(cols) < k:
            raise AssertionError("controlled rounding failed")  # impossible by construction
        out[i, cols] += 1
        col_need[cols] -= 1
    if np.any(col_need != 0):
        raise AssertionError("controlled rounding failed")
    return out


def stratified_split(labels: Sequence[Any], ratios: Sequence[float] = (0.8, 0.2),
                     seed: int = 0, min_per_label: Optional[int] = None) -> list[np.ndarray]:
    """Split that keeps label proportions: every split's count of every label is within 1 of
    count(label) * ratio, and split sizes are within 1 of n * ratio.

    min_per_label: fewest examples a label may have (default: the number of splits, so each
    label can appear in every split); rarer labels are an error naming them.
    """
    r = _check_ratios(ratios)
    y, names = _encode(labels)
    n = len(y)
    sizes = split_sizes(n, ratios)
    _nonempty(sizes, n, ratios, "stratified split")
    counts = np.bincount(y, minlength=len(names))
    need = len(r) if min_per_label is None else int(min_per_label)
    rare = [(names[c], int(counts[c])) for c in range(len(names)) if counts[c] < need]
    if rare:
        raise DataError(
            "stratified split needs at least "
            f"{need} examples per label; too few for " +
            ", ".join(f"label {lab!r} ({cnt} example{'s' * (cnt != 1)})" for lab, cnt in rare) +
            "; merge or drop those labels, add examples, or use an unstratified ratio split")
    cells = _round_matrix(np.outer(counts, r), counts, sizes)  # [labels, splits]
    parts: list[list[np.ndarray]] = [[] for _ in r]
    for c in range(len(names)):
        idx = np.flatnonzero(y == c)
        idx = idx[hash_order(len(idx), seed, salt=c + 1)]
        bounds = np.concatenate([[0], np.cumsum(cells[c])])
        for s in range(len(r)):
            parts[s].append(idx[bounds[s]:bounds[s + 1]])
    return [np.sort(np.concatenate(p)) for p in parts]


def kfold_assignments(n_or_labels: Union[int, Sequence[Any]], k: int, seed: int = 0,
                      stratified: bool = False) -> np.ndarray:
    """Fold id (0..k-1) of every example; fold sizes differ by at most 1. Stratified: every
    label's examples are dealt round-robin over the folds, so each fold's count of each label
    is within 1 of count / k."""
    if isinstance(n_or_labels, (int, np.integer)):
        if stratified:
            raise DataError("stratified K-fold needs the labels, not a count")
        n, y, names = int(n_or_labels), None, None
    else:
        y, names = _encode(n_or_labels)
        n = len(y)
    if k < 2:
        raise DataError(f"K-fold needs k >= 2, got k={k}")
    if k > n:
        raise DataError(f"K-fold with k={k} needs at least {k} examples, got {n}")
    fold = np.empty(n, np.int64)
    if not stratified:
        fold[hash_order(n, seed)] = np.arange(n) % k
        return fold
    counts = np.bincount(y, minlength=len(names))
    rare = [(names[c], int(counts[c])) for c in range(len(names)) if counts[c] < k]
    if rare:
        raise DataError(f"stratified {k}-fold needs at least {k} examples per label; too few "
                        "for " + ", ".join(f"label {a!r} ({b})" for a, b in rare) +
                        "; lower k, merge or drop those labels, or use stratified=False")
    # Deal labels one after another over a single running counter: each label is spread
    # evenly, and the running counter keeps the fold sizes within 1 of each other.
    order = np.concatenate([np.flatnonzero(y == c)[hash_order(int(counts[c]), seed, salt=c + 1)]
                            for c in range(len(names))])
    fold[order] = (np.arange(n) + hash_order(k, seed, salt=-1)[0]) % k
    return fold


def kfold(n_or_labels: Union[int, Sequence[Any]], k: int, fold: int, seed: int = 0,
          stratified: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of fold `fold` of a seeded K-fold split. Over
    fold = 0..k-1 the validation parts are disjoint and cover every example once.
    n_or_labels: the number of examples, or their labels (needed when stratified)."""
    if not 0 <= fold < k:
        raise DataError(f"fold={fold} is out of range for k={k} (use 0..{k - 1})")
    a = kfold_assignments(n_or_labels, k, seed, stratified)
    return np.flatnonzero(a != fold), np.flatnonzero(a == fold)
