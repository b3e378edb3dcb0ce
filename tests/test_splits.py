"""Splits: ratio (80/20, 3-way), stratified (label proportions within one example), K-fold;
seeded and reproducible; clear errors for impossible requests."""
from collections import Counter

import numpy as np
import pytest

from ftjax.data.errors import DataError
from ftjax.data.splits import (hash_order, kfold, kfold_assignments, ratio_split,
                               split_sizes, stratified_split)


def _check_partition(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n   # disjoint and covering
    assert allidx.min() == 0 and allidx.max() == n - 1


@pytest.mark.parametrize("n", [5, 10, 99, 101, 1003])
def test_ratio_split_default_80_20(n):
    tr, va = ratio_split(n, seed=1)
    _check_partition([tr, va], n)
    assert abs(len(tr) - 0.8 * n) <= 1 and abs(len(va) - 0.2 * n) <= 1


def test_ratio_split_three_way_seeded():
    parts = ratio_split(1000, (0.7, 0.2, 0.1), seed=3)
    assert [len(p) for p in parts] == [700, 200, 100]
    _check_partition(parts, 1000)
    again = ratio_split(1000, (0.7, 0.2, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = ratio_split(1000, (0.7, 0.2, 0.1), seed=4)
    assert not np.array_equal(parts[1], other[1])
    # Not just a prefix: the held-out part is spread over the whole range.
    assert parts[1].min() < 100 and parts[1].max() > 900


def test_hash_order_is_a_pinned_permutation():
    p = hash_order(10, seed=0)
    assert sorted(p.tolist()) == list(range(10))
    # Pinned: the order must not change across numpy versions or machines (no RNG streams).
    assert p.tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    assert not np.array_equal(p, hash_order(10, seed=1))


def test_split_sizes_sum_and_rounding():
    for n in range(0, 60):
        s = split_sizes(n, (0.5, 0.3, 0.2))
        assert s.sum() == n and np.all(np.abs(s - n * np.array([0.5, 0.3, 0.2])) < 1)


def test_ratio_split_errors():
    with pytest.raises(DataError, match="sum to 1"):
        ratio_split(10, (0.8, 0.3))
    with pytest.raises(DataError, match="positive"):
        ratio_split(10, (1.2, -0.2))
    with pytest.raises(DataError, match="empty"):
        ratio_split(3, (0.9, 0.05, 0.05))


def _labels(rng, counts):
    y = np.concatenate([[k] * n for k, n in counts.items()])
    return list(rng.permutation(y))


@pytest.mark.parametrize("ratios", [(0.8, 0.2), (0.7, 0.2, 0.1), (0.5, 0.25, 0.25)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_split_label_proportions_within_one(ratios, seed):
    rng = np.random.default_rng(seed)
    counts = {"a": 503, "b": 97, "c": 13, "d": 5 if len(ratios) == 2 else 3, "e": 41}
    y = _labels(rng, counts)
    parts = stratified_split(y, ratios, seed=seed)
    _check_partition(parts, len(y))
    for s, part in enumerate(parts):
        assert abs(len(part) - len(y) * ratios[s]) < 1
        got = Counter(y[i] for i in part)
        for lab, n in counts.items():
            assert abs(got[lab] - n * ratios[s]) < 1, (lab, s, got[lab], n * ratios[s])


def test_stratified_split_fuzz():
    rng = np.random.default_rng(7)
    for _ in range(200):
        k = rng.integers(2, 6)
        r = rng.dirichlet(np.ones(k)) + 0.02
        r = r / r.sum()
        counts = {f"l{i}": int(rng.integers(k, 40)) for i in range(rng.integers(1, 8))}
        y = _labels(rng, counts)
        if len(y) * r.min() < 1:
            continue
        parts = stratified_split(y, tuple(r), seed=int(rng.integers(100)))
        _check_partition(parts, len(y))
        for s, part in enumerate(parts):
            got = Counter(y[i] for i in part)
            assert all(abs(got[lab] - n * r[s]) < 1 for lab, n in counts.items())


def test_stratified_split_too_few_examples_names_label():
    y = ["a"] * 20 + ["b"] * 10 + ["rare"] * 2
    with pytest.raises(DataError, match=r"label 'rare' \(2 examples\)"):
        stratified_split(y, (0.8, 0.1, 0.1))
    assert len(stratified_split(y, (0.8, 0.2))) == 2          # 2 per label suffice for 2 splits


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_kfold_disjoint_and_covering(k):
    n = 53
    vals = []
    for f in range(k):
        tr, va = kfold(n, k, f, seed=2)
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == n
        vals.append(va)
    _check_partition(vals, n)
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(kfold(n, k, 1, seed=2)[1], vals[1])   # reproducible


def test_kfold_stratified_per_label_balance():
    rng = np.random.default_rng(0)
    counts = {"a": 50, "b": 23, "c": 6}
    y = _labels(rng, counts)
    k = 5
    a = kfold_assignments(y, k, seed=1, stratified=True)
    sizes = np.bincount(a, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    for f in range(k):
        got = Counter(y[i] for i in np.flatnonzero(a == f))
        for lab, n in counts.items():
            assert abs(got[lab] - n / k) < 1


def test_kfold_errors():
    with pytest.raises(DataError, match="k >= 2"):
        kfold(10, 1, 0)
    with pytest.raises(DataError, match="out of range"):
        kfold(10, 3, 3)
    with pytest.raises(DataError, match="at least 5 examples"):
        kfold(4, 5, 0)
    with pytest.raises(DataError, match=r"label 'b' \(2\)"):
        kfold(["a"] * 10 + ["b"] * 2, 3, 0, stratified=True)
    with pytest.raises(DataError, match="needs the labels"):
        kfold(10, 2, 0, stratified=True)
