"""Packing: the packed loss equals the per-document loss, and the packing invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from ftjax import models
from ftjax.data import packing
from ftjax.data.errors import DataError
from ftjax.train.losses import token_cross_entropy
from ftjax.train.run import model_config
from ftjax.train.step import sft_loss

# init_std 0.3: a random model that attends sharply, so leaking across documents shows.
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            max_position_embeddings=64, init_std=0.3)


def random_docs(seed, n, lo=2, hi=30, vocab=99):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        mask = np.zeros(k, np.float32)
        mask[int(rng.integers(1, k)):] = 1.0  # completion-only: a prompt, then trained tokens
        docs.append({"tokens": rng.integers(3, vocab, k).astype(np.int32), "loss_mask": mask})
    return docs


def token_nll(params, cfg, rows):
    logits, _ = models.apply(params, cfg, jnp.asarray(rows["inputs"]),
                             positions=jnp.asarray(rows["positions"]),
                             segment_ids=jnp.asarray(rows["segment_ids"]))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    targets = jnp.asarray(rows["targets"])[..., None]
    return -np.asarray(jnp.take_along_axis(logp, targets, -1)[..., 0])


@pytest.mark.parametrize("family,kv", [("llama", 2), ("gpt2", 4)])
def test_packed_loss_equals_unpacked(family, kv):
    cfg = model_config(common.model(family, num_kv_heads=kv, **TINY))
    params = models.init(cfg, jax.random.PRNGKey(0))
    docs = random_docs(0, 24, hi=20)
    seq = 48
    packed = packing.pack(docs, seq, "best_fit")
    alone = packing.pad_rows(docs, seq)
    assert packed.stats.rows < alone.stats.rows  # several documents share rows
    loss = sft_loss(cfg)
    p_sum, p_stats = loss(params, packed.rows, None)
    u_sum, u_stats = loss(params, alone.rows, None)
    trained = sum(d["loss_mask"][1:].sum() for d in docs)
    assert float(p_stats["tokens"]) == float(u_stats["tokens"]) == trained
    np.testing.assert_allclose(float(p_sum), float(u_sum), rtol=1e-5)

    # Per document, token by token: each packed segment sees exactly what it sees alone.
    p_nll, u_nll = token_nll(params, cfg, packed.rows), token_nll(params, cfg, alone.rows)
    for row, members in enumerate(packed.bins):
        for seg, d in enumerate(members, start=1):
            got = p_nll[row][packed.rows["segment_ids"][row] == seg]
            want = u_nll[d][alone.rows["segment_ids"][d] == 1]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # The parity is not vacuous: without document isolation the packed loss changes.
    leaky = dict(packed.rows, segment_ids=(packed.rows["segment_ids"] > 0).astype(np.int32))
    assert abs(float(loss(params, leaky, None)[0]) - float(u_sum)) > 1e-2 * float(u_sum)
    if cfg.position == "learned":  # and with learned positions, so does not restarting them
        flat = np.broadcast_to(np.arange(seq, dtype=np.int32), packed.rows["positions"].shape)
        shifted = dict(packed.rows, positions=flat)
        assert abs(float(loss(params, shifted, None)[0]) - float(u_sum)) > 1e-2 * float(u_sum)


def test_loss_mask_and_positions_per_document():
    docs = [{"tokens": [1, 5, 6, 7, 2], "loss_mask": [0, 0, 1, 1, 1]},
            {"tokens": [1, 8, 2], "loss_mask": [0, 1, 1]}]
    rows = packing.pack(docs, 8, "first_fit", decreasing=False).rows
    np.testing.assert_array_equal(rows["inputs"][0], [1, 5, 6, 7, 1, 8, 0, 0])
    np.testing.assert_array_equal(rows["targets"][0], [5, 6, 7, 2, 8, 2, 0, 0])
    np.testing.assert_array_equal(rows["loss_mask"][0], [0, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 0, 1, 0, 0])
    assert rows["inputs"].dtype == np.int32 and rows["loss_mask"].dtype == np.float32


def unpack(rows, r, seg):
    """A document's tokens back from its row: inputs of the segment + its last target."""
    sel = rows["segment_ids"][r] == seg
    return np.concatenate([rows["inputs"][r][sel], rows["targets"][r][sel][-1:]])


@pytest.mark.parametrize("method", packing.METHODS)
@pytest.mark.parametrize("decreasing", [True, False])
def test_every_token_exactly_once(method, decreasing):
    docs = random_docs(1, 300, hi=60)
    seq = 64
    out = packing.pack(docs, seq, method, decreasing=decreasing)
    assert sorted(i for b in out.bins for i in b) == list(range(len(docs)))
    for r, members in enumerate(out.bins):
        seg = out.rows["segment_ids"][r]
        used = sum(len(docs[d]["tokens"]) - 1 for d in members)
        assert used <= seq
        # Documents are contiguous, in order, and padding only follows them.
        sizes = [len(docs[d]["tokens"]) - 1 for d in members]
        np.testing.assert_array_equal(seg[:used], np.repeat(np.arange(1, len(members) + 1), sizes))
        assert not seg[used:].any() and not out.rows["loss_mask"][r][used:].any()
        for s, d in enumerate(members, start=1):
            np.testing.assert_array_equal(unpack(out.rows, r, s), docs[d]["tokens"])
            np.testing.assert_array_equal(out.rows["loss_mask"][r][seg == s],
                                          docs[d]["loss_mask"][1:])
            np.testing.assert_array_equal(out.rows["positions"][r][seg == s],
                                          np.arange(len(docs[d]["tokens"]) - 1))
    st = out.stats
    assert st.tokens == int((out.rows["segment_ids"] > 0).sum())
    assert st.capacity == st.rows * seq and st.efficiency == pytest.approx(st.tokens / st.capacity)


def naive_bins(lengths, cap, best):
    free, bins = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(free)) if free[b] >= lengths[i]]
        if not fits:
            free.append(cap)
            bins.append([])
            fits = [len(free) - 1]
        b = min(fits, key=lambda b: (free[b], b)) if best else fits[0]
        free[b] -= lengths[i]
        bins[b].append(i)
    return bins


@pytest.mark.parametrize("method", packing.METHODS)
def test_assignment_matches_naive_reference(method):
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 40, 400).tolist()
    assert packing.assign_bins(lengths, 50, method) == naive_bins(lengths, 50, method == "best_fit")


def test_best_fit_uses_no_more_rows_than_first_fit():
    # On realistic (random-length) data: best-fit-decreasing <= first-fit in arrival order.
    for seed in range(5):
        docs = random_docs(10 + seed, 500, hi=100)
        ff = packing.pack(docs, 128, "first_fit", decreasing=False).stats
        bfd = packing.pack(docs, 128, "best_fit", decreasing=True).stats
        assert bfd.rows <= ff.rows
        assert bfd.efficiency >= ff.efficiency > 0.5
        assert bfd.tokens == ff.tokens


def test_overflow_policies_are_counted():
    docs = random_docs(3, 20, lo=2, hi=10) + [
        {"tokens": np.arange(3, 40), "loss_mask": np.ones(37)}, {"tokens": [5], "loss_mask": [1.0]}]
    t = packing.pack(docs, 16, overflow="truncate")
    assert t.stats.truncated == 1 and t.stats.dropped_too_short == 1 and t.stats.documents == 21
    long_row = next(r for r, b in enumerate(t.bins) if 20 in b)
    np.testing.assert_array_equal(unpack(t.rows, long_row, t.bins[long_row].index(20) + 1),
                                  np.arange(3, 20))  # first seq_len + 1 tokens kept
    d = packing.pack(docs, 16, overflow="drop")
    assert d.stats.dropped_too_long == 1 and d.stats.documents == 20
    assert all(20 not in b and 21 not in b for b in d.bins)
    with pytest.raises(DataError, match=r"document 20 has 37 tokens .*seq_len=16"):
        packing.pack(docs, 16, overflow="error")
    with pytest.raises(DataError, match="unknown method"):
        packing.pack(docs, 16, "next_fit")


def test_pad_rows_is_one_document_per_row():
    docs = random_docs(4, 7)
    out = packing.pad_rows(docs, 32)
    assert out.rows["inputs"].shape == (7, 32) and out.bins == [[i] for i in range(7)]
    assert set(np.unique(out.rows["segment_ids"])) <= {0, 1}
    for r, d in enumerate(docs):
        np.testing.assert_array_equal(unpack(out.rows, r, 1), d["tokens"])
