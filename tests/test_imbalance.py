"""Imbalance toolkit: source mixtures, over/undersampling, stratified batches, class weights."""
from collections import Counter

import numpy as np
import pytest

from ftjax.data.errors import DataError
from ftjax.data.imbalance import (class_weights, mixture_indices, oversample,
                                  stratified_batches, undersample)


def test_mixture_proportions_match_weights():
    sizes, weights = [1000, 50, 300], [0.5, 0.3, 0.2]
    src, ex = mixture_indices(sizes, weights, seed=0, num_examples=20000)
    frac = np.bincount(src, minlength=3) / len(src)
    # multinomial std at n=20000 is <= 0.0036
    assert np.allclose(frac, weights, atol=0.015)
    for i, s in enumerate(sizes):
        e = ex[src == i]
        assert e.min() >= 0 and e.max() < s
    # The small, heavily weighted source is cycled through fully before repeating.
    first = ex[src == 1][:50]
    assert sorted(first.tolist()) == list(range(50))
    s2, e2 = mixture_indices(sizes, weights, seed=0, num_examples=20000)
    assert np.array_equal(src, s2) and np.array_equal(ex, e2)
    s3, _ = mixture_indices(sizes, weights, seed=1, num_examples=20000)
    assert not np.array_equal(src, s3)


def test_mixture_errors():
    with pytest.raises(DataError, match="2 weights for 3"):
        mixture_indices([1, 2, 3], [0.5, 0.5], 0, 10)
    with pytest.raises(DataError, match="source 1 has weight"):
        mixture_indices([5, 0], [0.5, 0.5], 0, 10)
    with pytest.raises(DataError, match="not all 0"):
        mixture_indices([5, 5], [0, 0], 0, 10)
    src, _ = mixture_indices([5, 0], [1.0, 0.0], 0, 10)  # an empty source with weight 0 is fine
    assert np.all(src == 0)


def _labels():
    return ["a"] * 90 + ["b"] * 25 + ["c"] * 5


def test_oversample_balanced_and_targets():
    y = _labels()
    idx = oversample(y, "balanced", seed=0)
    got = Counter(y[i] for i in idx)
    assert got == {"a": 90, "b": 90, "c": 90}
    assert set(range(len(y))) <= set(idx.tolist())      # every original kept
    idx = oversample(y, {"a": 0.5, "b": 0.25, "c": 0.25}, seed=0)
    got = Counter(y[i] for i in idx)
    assert got == {"a": 90, "b": 45, "c": 45}
    # The repeats of 'c' spread over all its examples (5 originals, 40 extra: 9 copies each).
    c_counts = Counter(i for i in idx.tolist() if y[i] == "c")
    assert set(c_counts.values()) == {9}
    assert np.array_equal(idx, oversample(y, {"a": 0.5, "b": 0.25, "c": 0.25}, seed=0))


def test_undersample_balanced_and_targets():
    y = _labels()
    idx = undersample(y, "balanced", seed=0)
    assert len(np.unique(idx)) == len(idx)
    assert Counter(y[i] for i in idx) == {"a": 5, "b": 5, "c": 5}
    idx = undersample(y, {"a": 0.6, "b": 0.3, "c": 0.1}, seed=1)
    assert Counter(y[i] for i in idx) == {"a": 30, "b": 15, "c": 5}
    assert not np.array_equal(idx, undersample(y, {"a": 0.6, "b": 0.3, "c": 0.1}, seed=2))


def test_resample_target_errors():
    with pytest.raises(DataError, match=r"missing \['c'\]"):
        oversample(_labels(), {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"not in the data \['z'\]"):
        undersample(_labels(), {"a": 1, "b": 1, "c": 1, "z": 1})


@pytest.mark.parametrize("batch_size", [8, 16, 13])
def test_stratified_batches_every_batch_in_proportion(batch_size):
    rng = np.random.default_rng(0)
    y = list(rng.permutation(["a"] * 300 + ["b"] * 80 + ["c"] * 20 + ["d"] * 7))
    n = len(y)
    batches = stratified_batches(y, batch_size, seed=3)
    assert batches.shape == (n // batch_size, batch_size)
    flat = batches.ravel()
    assert len(np.unique(flat)) == len(flat)                  # no example twice
    share = Counter(y)
    for row in batches:
        got = Counter(y[i] for i in row)
        for lab, cnt in share.items():
            assert abs(got[lab] - batch_size * cnt / n) < 1, (lab, got[lab])
    again = stratified_batches(y, batch_size, seed=3)
    assert np.array_equal(batches, again)
    full = stratified_batches(y, batch_size, seed=3, drop_remainder=False)
    if n % batch_size:
        rest = full[-1]
        assert (rest >= 0).sum() == n % batch_size
        assert sorted(np.concatenate([flat, rest[rest >= 0]]).tolist()) == list(range(n))


def test_stratified_batches_too_few():
    with pytest.raises(DataError, match="fewer than one batch"):
        stratified_batches(["a", "b"], 4)


def test_class_weights_schemes():
    counts = np.array([100, 10, 1])
    w = class_weights(counts, "inverse")
    assert np.allclose(w, counts.sum() / (3 * counts))          # sklearn "balanced"
    assert np.isclose((w * counts).sum(), counts.sum())          # mean over examples = 1
    s = class_weights(counts, "sqrt_inverse")
    assert np.allclose(s / s[0], np.sqrt(counts[0] / counts))
    e = class_weights(counts, "effective_number", beta=0.99)
    ref = (1 - 0.99) / (1 - 0.99 ** counts)
    assert np.allclose(e / e[0], ref / ref[0])
    assert np.isclose((e * counts).sum(), counts.sum())
    # beta -> 0: every class weighs the same; beta -> 1: approaches inverse frequency.
    assert np.allclose(class_weights(counts, "effective_number", beta=0.0), 1.0)
    near_inv = class_weights(counts, "effective_number", beta=1 - 1e-9)
    assert np.allclose(near_inv, w, rtol=1e-4)
    d = class_weights({"b": 10, "a": 100, "c": 1})
    assert np.allclose(d, w)                                   # sorted label order


def test_class_weights_errors():
    with pytest.raises(DataError, match=r"\['x'\] have no training examples"):
        class_weights({"x": 0, "y": 3})
    with pytest.raises(DataError, match="not known"):
        class_weights([1, 2], "log")
