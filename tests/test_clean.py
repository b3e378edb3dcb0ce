"""Cleaning: normalisation, PII masking, exact and MinHash near-dup removal, length filters,
and the data report's accounting."""
import json
import random

import numpy as np
import pytest

from ftjax.data import clean
from ftjax.data.clean import (Cleaner, CleanConfig, ExactDedup, LengthFilter, MinHashDedup,
                              mask_pii, normalize_text, shingles)
from ftjax.data.errors import DataError
from ftjax.data.report import DataReport, histogram, histogram_rows


def test_normalize_nfkc_controls_whitespace():
    s = "  \uff28\uff45llo\u200b  world\u00a0!\r\n\n\n\n    indented\x07 \t\n\ufb01  "
    assert normalize_text(s) == "Hello  world !\n\n    indented\nfi"
    assert normalize_text(s, whitespace="collapse") == "Hello world !\n\n indented\nfi"
    assert normalize_text("a\x00b\x1bc\u0085d") == "abcd"                 # C0 and C1 controls
    assert normalize_text("\ufb01", nfkc=False) == "\ufb01"
    assert normalize_text(" x ", whitespace="keep") == " x "
    with pytest.raises(DataError, match="whitespace"):
        normalize_text("x", whitespace="squash")


@pytest.mark.parametrize("text,kind", [
    ("john.doe+tag@mail.example.co.uk", "email"),
    ("a_b@x.io", "email"),
    ("+1 (555) 123-4567", "phone"),
    ("+44 20 7946 0958", "phone"),
    ("+33 1 23 45 67 89", "phone"),
    ("+91 98765 43210", "phone"),
    ("+8613800138000", "phone"),
    ("(555) 123-4567", "phone"),
    ("555-123-4567", "phone"),
    ("555.123.4567", "phone"),
    ("020 7946 0958", "phone"),
    ("555-0123", "phone"),
    ("1-800-555-0199", "phone"),
    ("192.168.0.1", "ipv4"),
    ("255.255.255.0", "ipv4"),
    ("2001:db8::8a2e:370:7334", "ipv6"),
    ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ipv6"),
    ("::ffff:10.0.0.1", "ipv6"),
    ("fe80::1%eth0", "ipv6"),
    ("::1", "ipv6"),
])
def test_pii_masked_with_typed_placeholder(text, kind):
    out, counts = mask_pii(f"contact: {text}. thanks")
    assert out == f"contact: {clean.PLACEHOLDERS[kind]}. thanks"
    assert counts == {kind: 1}


@pytest.mark.parametrize("text", [
    "add 849+23", "2002-09-23", "23/09/2002", "12:30:45", "00:1A:2B:3C:4D:5E",
    "order 12345678", "version 1.2.3", "pi 3.14159", "std::vector", "256.1.1.1",
    "1.2.3.4.5", "me@localhost", "score 12-7",
])
def test_pii_leaves_lookalikes_alone(text):
    assert mask_pii(text) == (text, {})


def test_pii_counts_and_kinds():
    text = "a@b.com, c@d.org, 10.0.0.1 and +1 555 123 4567"
    out, counts = mask_pii(text)
    assert counts == {"email": 2, "ipv4": 1, "phone": 1}
    assert out == "<EMAIL>, <EMAIL>, <IPV4> and <PHONE>"
    out, counts = mask_pii(text, kinds=("email",))
    assert counts == {"email": 2} and "10.0.0.1" in out
    with pytest.raises(DataError, match="unknown PII"):
        mask_pii(text, kinds=("ssn",))


def test_exact_dedup_uses_normalised_text():
    d = ExactDedup()
    assert d.add("Hello   World") is None
    assert d.add("hello world") == 0           # case and whitespace do not make it new
    assert d.add("hello world!") is None
    assert d.add("HELLO\nWORLD", index=17) == 0


def _words(rng, n):
    vocab = [f"w{i}" for i in range(400)]
    return [rng.choice(vocab) for _ in range(n)]


def _exact_jaccard(a, b, kind="word", n=3):
    sa, sb = shingles(a, kind, n), shingles(b, kind, n)
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimate_close_to_exact_jaccard():
    rng = random.Random(0)
    m = MinHashDedup(threshold=0.5, num_perm=256, seed=3)
    errs = []
    for trial in range(40):
        base = _words(rng, 60)
        other = list(base)
        for _ in range(rng.randint(0, 30)):   # edits of varying amounts
            other[rng.randrange(len(other))] = rng.choice(["x", "y", "z", "q"])
        a, b = " ".join(base), " ".join(other)
        j = _exact_jaccard(a, b)
        est = m.jaccard(m.signature(a), m.signature(b))
        sigma = np.sqrt(max(j * (1 - j), 1e-3) / m.num_perm)
        errs.append(abs(est - j) / sigma)
    assert np.mean(errs) < 1.2            # ~0.8 for an unbiased estimator
    assert max(errs) < 4.0


def test_minhash_removes_near_duplicates_keeps_distinct():
    rng = random.Random(1)
    originals = [" ".join(_words(rng, 50)) for _ in range(30)]
    near = []
    for o in originals[:10]:
        w = o.split()
        w[rng.randrange(50)] = "changed"     # one word changed: Jaccard ~0.89
        near.append(" ".join(w))
    m = MinHashDedup(threshold=0.7, num_perm=128, seed=0)
    kept = [m.add(t) for t in originals]
    assert kept == [None] * 30               # distinct texts (Jaccard ~0) all kept
    for i, t in enumerate(near):
        assert _exact_jaccard(t, originals[i]) > 0.8
        assert m.add(t) == i                 # flagged as a duplicate of its original


def test_minhash_deterministic_and_seeded():
    t = "the quick brown fox jumps over the lazy dog again and again"
    a = MinHashDedup(0.8, 64, seed=5).signature(t)
    assert np.array_equal(a, MinHashDedup(0.8, 64, seed=5).signature(t))
    assert not np.array_equal(a, MinHashDedup(0.8, 64, seed=6).signature(t))


def test_lsh_bands_follow_threshold():
    b_hi, r_hi = clean.lsh_params(0.9, 128)
    b_lo, r_lo = clean.lsh_params(0.3, 128)
    assert r_hi > r_lo and b_hi * r_hi <= 128 and b_lo * r_lo <= 128
    # The S-curve's midpoint sits near the threshold.
    for t, (b, r) in ((0.9, (b_hi, r_hi)), (0.3, (b_lo, r_lo))):
        assert abs((1 / b) ** (1 / r) - t) < 0.12


def test_length_filter():
    f = LengthFilter(min_chars=3, max_chars=5, min_tokens=2, max_tokens=4)
    assert f.check_chars("ab") == "too_short_chars"
    assert f.check_chars("abcdef") == "too_long_chars"
    assert f.check_chars("abcd") is None
    assert f.check_chars({"messages": [{"role": "user", "content": "ab"},
                                       {"role": "assistant", "content": "cd"}]}) is None
    assert f.check_tokens(1) == "too_short_tokens"
    assert f.check_tokens(5) == "too_long_tokens"
    assert f.check_tokens(3) is None


def _sft(u, a):
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def test_cleaner_stream_reasons_and_report_accounting(tmp_path):
    rng = random.Random(2)
    long_text = " ".join(_words(rng, 40))
    near = long_text.split()
    near[3] = "edited"
    examples = [
        _sft("mail me at bob@example.com", "ok, call +44 20 7946 0958"),   # kept, PII masked
        _sft("Mail  me at BOB@example.com", "ok, call +44 20 7946 0958"),   # exact duplicate
        _sft("   ", "\u200b"),                                            # empty after cleaning
        {"text": long_text},                                                # kept
        {"text": " ".join(near)},                                           # near duplicate
        {"text": "x" * 500},                                                # too long
        {"text": "Ｆｕｌｌ width"},                                          # kept, NFKC
        {"text": "tiny", "label": "a"},                                     # kept (4 chars)
    ]
    cfg = CleanConfig.from_config({"near_dup_threshold": 0.7, "max_chars": 300,
                                   "pii": "email+phone"})
    c = Cleaner(cfg)
    rep = DataReport()
    out = []
    for ex in examples:
        rep.seen("jsonl:x", "train")
        kept, reason = c.process(ex)
        if kept is None:
            rep.dropped("jsonl:x", "train", reason)
        else:
            rep.kept("jsonl:x", "train")
            out.append(kept)
    rep.add_pii("jsonl:x", "train", c.pii_counts)
    d = rep.to_dict()["sources"][0]
    assert d["dropped"] == {"empty": 1, "exact_duplicate": 1, "near_duplicate": 1,
                            "too_long_chars": 1}
    assert d["seen"] == d["kept"] + d["dropped_total"] == 8
    assert c.duplicate_of == {1: 0, 4: 3}
    assert out[0]["messages"][0]["content"] == "mail me at <EMAIL>"
    assert out[0]["messages"][1]["content"] == "ok, call <PHONE>"
    assert out[0]["messages"][0]["role"] == "user"
    assert out[2] == {"text": "Full width"} and out[3]["label"] == "a"
    assert c.pii_counts == {"email": 1, "phone": 1}
    rep.check()
    jpath, tpath = rep.save(str(tmp_path))
    saved = json.load(open(jpath))
    assert saved["sources"][0]["pii_masked"] == {"email": 1, "phone": 1}
    assert "exact_duplicate: 1" in open(tpath).read()


def test_clean_config_rejects_typos():
    with pytest.raises(DataError, match="near_dup_treshold"):
        CleanConfig.from_config({"near_dup_treshold": 0.8})
    assert CleanConfig.from_config({"pii": False}).pii == ()
    assert CleanConfig.from_config({"pii": True}).pii == clean.PII_KINDS


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------

def test_report_invariant_and_late_drops():
    rep = DataReport()
    rep.seen("a", "train", 10)
    rep.kept("a", "train", 8)
    rep.dropped("a", "train", "exact_duplicate", 2)
    rep.check()
    rep.dropped("a", "train", "too_long_tokens", 3, was_kept=True)  # later token filter
    rep.check()
    assert rep.to_dict()["sources"][0]["kept"] == 5
    rep.seen("b", "test", 4)
    rep.kept("b", "test", 3)
    with pytest.raises(DataError, match=r"b\[test\]: seen 4 != kept 3 \+ dropped 0"):
        rep.check()
    with pytest.raises(DataError, match="reason"):
        rep.dropped("a", "train", "")


@pytest.mark.parametrize("n,warn", [(999, True), (1000, False)])
def test_report_small_train_warning_boundary(n, warn):
    rep = DataReport()
    rep.set_split_size("train", n)
    assert any("training examples" in w for w in rep.warnings()) == warn


def test_report_warnings_imbalance_duplicates_truncation(tmp_path):
    rep = DataReport()
    rep.seen("s", "train", 100)
    rep.kept("s", "train", 70)
    rep.dropped("s", "train", "near_duplicate", 30)
    rep.add_counters("s", "train", {"truncated_examples": 10, "truncated_tokens": 99})
    rep.add_labels("train", ["a"] * 60 + ["b"] * 7 + ["c"] * 3)
    rep.add_lengths("train", [3, 5, 5, 9, 40])
    rep.set_split_size("train", 70)
    w = rep.warnings()
    assert any("label 'c' is 4.3% of the train data" in x for x in w)
    assert any("label 'b'" in x for x in w)              # 60 / 7 > 5
    assert any("30.0% of the examples are duplicates" in x for x in w)
    assert any("truncated" in x for x in w)
    rep.save(str(tmp_path))
    d = json.load(open(tmp_path / "data_report.json"))
    assert d["labels"]["train"] == {"a": 60, "b": 7, "c": 3}
    h = d["token_lengths"]["train"]
    assert h["n"] == 5 and h["min"] == 3 and h["max"] == 40 and sum(h["counts"]) == 5
    assert "WARNING" in (tmp_path / "data_report.txt").read_text()


def test_histogram_percentiles():
    h = histogram({i: 1 for i in range(1, 101)}, num_bins=10)
    assert (h["p50"], h["p90"], h["p99"], h["mean"]) == (50, 90, 99, 50.5)
    assert h["counts"] == [10] * 10 and h["bin_edges"][0] == 1


def test_report_histogram_rows_are_few_and_names_are_whole():
    """At most 10 bins of a round width; a run of empty bins is one row; paths are not cut."""
    h = histogram({20: 1, 23: 1, 31: 384})
    assert h["bin_edges"] == [20, 22, 24, 26, 28, 30, 32] and h["counts"] == [1, 1, 0, 0, 0, 384]
    assert histogram_rows(h) == [(20, 21, 1), (22, 23, 1), (24, 29, 0), (30, 31, 384)]
    wide = histogram({1: 5, 7: 1, 995: 2})  # 995 values -> width 100, 10 bins
    assert wide["bin_edges"][1] - wide["bin_edges"][0] == 100 and len(wide["counts"]) == 10
    assert histogram_rows(wide) == [(1, 100, 6), (101, 900, 0), (901, 1000, 2)]
    long_name = "experiments/data_samples/a_rather_long_directory_name/instruction.jsonl"
    rep = DataReport()
    rep.seen(long_name, "train", 3)
    rep.kept(long_name, "train", 3)
    rep.add_lengths("train", [20, 23] + [31] * 384)
    text = rep.to_text()
    assert f"{long_name} train" in text
    rows = [line for line in text.splitlines() if line.startswith("  ")]
    assert [r.split()[:2] for r in rows] == [["20-21", "1"], ["22-23", "1"], ["24-29", "0"],
                                             ["30-31", "384"]]


def test_near_dup_ignores_chat_structure():
    """Short, different conversations share roles and field names, not content: kept."""
    c = Cleaner(CleanConfig(near_dup_threshold=0.2, ngram=1, seed=1))  # structure: J=4/12
    a = _sft("hi there", "hello friend")
    b = _sft("what time", "noon today")
    assert c.process(a)[1] is None and c.process(b)[1] is None
    assert clean.content_text(a) == "hi there\nhello friend"
    assert c.process(_sft("Hi  there", "hello friend"))[1] == "exact_duplicate"
    assert c.process(_sft("hi there", "hello friend!"))[1] == "near_duplicate"
