"""Evaluation metrics: multiple choice against an independent transcription of lm-eval's
process_results, ECE by hand and on synthetic calibrated data, SQuAD-style matching, ROUGE-L
and BLEU against hand values and the libraries, answer extraction, pass@k against brute-force
enumeration, and the perplexity closed forms."""
import itertools
import math
import statistics

import numpy as np
import pytest

from ftjax.eval import metrics as M


# ------------------------------------------------------------------------------------------
# Multiple choice
# ------------------------------------------------------------------------------------------

def _lm_eval_reference(lls, choices, gold):
    """lm-evaluation-harness `multiple_choice` process_results, transcribed for the test."""
    completion_len = np.array([float(len(i)) for i in choices])
    pred = np.argmax(lls)
    pred_norm = np.argmax(np.asarray(lls) / completion_len)
    if isinstance(gold, list):
        return (1.0 if pred in gold else 0.0), (1.0 if pred_norm in gold else 0.0)
    return (1.0 if pred == gold else 0.0), (1.0 if pred_norm == gold else 0.0)


def test_multiple_choice_acc_and_acc_norm_disagree():
    # The long choice has the higher total log-likelihood per character (-6/33 > -5/5) but the
    # lower total, so argmax(lls) picks the short one and the length-normalised argmax the long.
    choices = ["Paris", "the capital city of France, Paris"]
    assert len(choices[1]) == 33
    out = M.multiple_choice([-5.0, -6.0], choices, gold=1)
    assert (out["pred"], out["pred_norm"]) == (0, 1)
    assert (out["acc"], out["acc_norm"]) == (0.0, 1.0)
    out0 = M.multiple_choice([-5.0, -6.0], choices, gold=0)
    assert (out0["acc"], out0["acc_norm"]) == (1.0, 0.0)
    # probs: softmax over the two lls.
    p1 = 1.0 / (1.0 + math.exp(1.0))
    np.testing.assert_allclose(out["probs"], [1 - p1, p1], rtol=1e-12)
    assert out["confidence"] == pytest.approx(1 - p1)


def test_multiple_choice_ties_take_first_index():
    out = M.multiple_choice([-2.0, -1.0, -1.0], ["aa", "bb", "cc"], gold=2)
    assert out["pred"] == 1 and out["pred_norm"] == 1
    assert out["acc"] == 0.0 and out["acc_norm"] == 0.0
    np.testing.assert_allclose(out["probs"][1], out["probs"][2])


def test_multiple_choice_list_gold_and_numpy_ints():
    out = M.multiple_choice([-3.0, -1.0, -2.0], ["a", "b", "c"], gold=[0, 1])
    assert out["acc"] == 1.0 and out["acc_norm"] == 1.0
    out = M.multiple_choice([-3.0, -1.0, -2.0], ["a", "b", "c"], gold=[0, 2])
    assert out["acc"] == 0.0
    assert M.multiple_choice([-3.0, -1.0], ["a", "b"], gold=np.int64(1))["acc"] == 1.0


def test_multiple_choice_lengths_are_characters_not_bytes():
    # "é" is 1 character but 2 UTF-8 bytes. By characters -2.2/2 = -1.1 < -3/3 = -1, so the
    # normalised prediction is choice 1; by bytes it would be -2.2/4 = -0.55 > -1, choice 0.
    out = M.multiple_choice([-2.2, -3.0], ["éé", "abc"], gold=1)
    assert out["pred_norm"] == 1


def test_multiple_choice_probs_stable_and_normalised():
    lls = [-1000.0, -1001.0, -1003.0]
    out = M.multiple_choice(lls, ["x", "y", "z"], gold=0)
    ll = np.array(lls)
    want = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
    np.testing.assert_allclose(out["probs"], want, rtol=1e-12)
    assert sum(out["probs"]) == pytest.approx(1.0, abs=1e-12)
    assert all(isinstance(p, float) for p in out["probs"])


def test_multiple_choice_matches_lm_eval_formula_on_random_cases():
    rng = np.random.default_rng(0)
    alphabet = list("abcdefgh ,.é")
    n_disagree = 0
    for _ in range(200):
        n = int(rng.integers(2, 7))
        choices = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 25)))) for _ in range(n)]
        lls = np.round(-rng.exponential(10.0, size=n), 0)  # rounding makes ties common
        if rng.random() < 0.3:
            gold = sorted(set(rng.integers(0, n, size=2).tolist()))
        else:
            gold = int(rng.integers(0, n))
        out = M.multiple_choice(lls.tolist(), choices, gold)
        acc, acc_norm = _lm_eval_reference(lls, choices, gold)
        assert (out["acc"], out["acc_norm"]) == (acc, acc_norm), (lls, choices, gold)
        assert out["pred"] == int(np.argmax(lls))
        assert out["confidence"] == pytest.approx(max(out["probs"]))
        n_disagree += out["pred"] != out["pred_norm"]
    assert n_disagree > 20  # the cases exercise length normalisation, not only argmax


def test_multiple_choice_errors():
    with pytest.raises(ValueError, match="choice 1 is the empty string"):
        M.multiple_choice([-1.0, -2.0], ["a", ""], gold=0)
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 choices"):
        M.multiple_choice([-1.0, -2.0], ["a", "b", "c"], gold=0)
    with pytest.raises(ValueError, match="gold index 5 is outside 0..1"):
        M.multiple_choice([-1.0, -2.0], ["a", "b"], gold=5)
    with pytest.raises(ValueError, match="choices.index"):
        M.multiple_choice([-1.0, -2.0], ["a", "b"], gold="a")
    with pytest.raises(ValueError, match="NaN"):
        M.multiple_choice([float("nan"), -2.0], ["a", "b"], gold=0)


# ------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------

def test_ece_hand_computed_three_bins():
    conf = [0.2, 0.3, 0.5, 0.6, 0.9, 1.0]
    correct = [0, 1, 1, 0, 1, 1]
    # Bins (0,1/3], (1/3,2/3], (2/3,1]: conf means .25, .55, .95; accuracies .5, .5, 1.
    # ECE = 2/6 * (.25 + .05 + .05).
    assert M.expected_calibration_error(conf, correct, n_bins=3) == pytest.approx(0.35 / 3)
    bins = M.reliability_bins(conf, correct, n_bins=3)
    assert bins["count"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(bins["confidence"], [0.25, 0.55, 0.95])
    np.testing.assert_allclose(bins["accuracy"], [0.5, 0.5, 1.0])


def test_reliability_bins_edges_are_right_closed():
    # 0 goes to the first bin; 0.3 (on an edge, and 0.3 * 10 > 3 in floats) to (0.2, 0.3].
    bins = M.reliability_bins([0.0, 0.3, 0.30001, 1.0, 0.1], [1, 1, 1, 1, 1], n_bins=10)
    assert bins["count"].tolist() == [2, 0, 1, 1, 0, 0, 0, 0, 0, 1]
    assert np.isnan(bins["confidence"][1]) and np.isnan(bins["accuracy"][1])
    bins3 = M.reliability_bins([1 / 3, 2 / 3], [0, 0], n_bins=3)
    assert bins3["count"].tolist() == [1, 1, 0]


def test_ece_perfectly_calibrated_and_confidently_wrong():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    correct = rng.random(p.size) < p
    assert M.expected_calibration_error(p, correct) < 0.02
    assert M.expected_calibration_error(np.full(1000, 0.99), np.zeros(1000)) == pytest.approx(0.99)
    assert M.expected_calibration_error([1.0] * 10, [False] * 10) == 1.0


def test_ece_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error([-0.5], [1])
    with pytest.raises(ValueError, match="same length"):
        M.expected_calibration_error([0.5, 0.6], [1])
    with pytest.raises(ValueError, match="0/1"):
        M.expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError, match="n_bins"):
        M.expected_calibration_error([0.5], [1], n_bins=0)


# ------------------------------------------------------------------------------------------
# SQuAD-style matching
# ------------------------------------------------------------------------------------------

def test_normalize_answer():
    assert M.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.normalize_answer("theater anthem") == "theater anthem"  # whole words only


def test_exact_match():
    assert M.exact_match("The Cat!", "cat") == 1.0
    assert M.exact_match("The Cat!", "cat", normalize=False) == 0.0
    assert M.exact_match("cat", "cat", normalize=False) == 1.0
    assert M.exact_match("a dog", ["cat", "the dog."]) == 1.0
    assert M.exact_match("dog", ["cat", "cats"]) == 0.0
    with pytest.raises(ValueError, match="no reference"):
        M.exact_match("x", [])


def test_token_f1():
    # "cat sat" vs "cat sat down": P = 1, R = 2/3 -> F1 = 0.8.
    assert M.token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    # Repeated tokens count min(#pred, #ref) times: "x x y" vs "x y y" overlap in 2 tokens,
    # so P = R = 2/3.
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert M.token_f1("The cat sat.", ["dog", "cat sat"]) == 1.0  # max over references
    assert M.token_f1("dog", ["cat", "mouse"]) == 0.0
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("the", "!") == 1.0  # both empty after normalisation
    assert M.token_f1("cat", "") == 0.0
    assert M.token_f1("", "cat") == 0.0


# ------------------------------------------------------------------------------------------
# ROUGE-L and BLEU
# ------------------------------------------------------------------------------------------

def test_rouge_l():
    assert M.rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6.
    assert M.rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    multi = M.rouge_l(["the cat sat on the mat", "the cat sat on the mat"],
                      [["completely different words", "the cat sat on the mat"],
                       "the cat lay on the mat"])
    assert multi == pytest.approx((1.0 + 5 / 6) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.rouge_l(["a", "b"], ["a"])


def test_bleu():
    import sacrebleu
    sents = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine lives"]
    assert M.bleu(sents, sents) == pytest.approx(100.0)
    preds = ["the cat is on the mat today", "there is a cat on the mat", "hello there my friend"]
    refs = [["the cat sits on the mat today", "a cat is on the mat today"],
            ["there is a cat on the mat", "a cat is on the mat"],
            ["hello my dear friend", "hi there friend of mine"]]
    want = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[1] for r in refs]]).score
    assert M.bleu(preds, refs) == pytest.approx(want)
    assert 0.0 < want < 100.0
    single = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score
    assert M.bleu(preds, [r[0] for r in refs]) == pytest.approx(single)
    with pytest.raises(ValueError, match="ragged references: example 0 has 2, example 1 has 1"):
        M.bleu(preds, [refs[0], refs[1][:1], refs[2]])


# ------------------------------------------------------------------------------------------
# Answer extraction
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("She buys 3 packs of 5, so the answer is 1,234.", "1234"),
    ("Each costs $2. Total:\n#### -7", "-7"),
    ("He paid $1,234.50 for 2 items", "2"),
    ("Total cost is $1,234.50", "1234.50"),
    ("pages 3-4", "4"),
    ("the list 1,2,3", "3"),
    ("It drops to \u221212 degrees.", "-12"),
    ("no digits at all", ""),
])
def test_extract_last_number(text, want):
    assert M.extract_answer(text, "last_number") == want


def test_extract_answer_modes():
    assert M.extract_answer("  42 \n", "none") == "42"
    assert M.extract_answer("\n  \n  first line \nsecond", "first_line") == "first line"
    assert M.extract_answer(" \n ", "first_line") == ""
    assert M.extract_answer("So the answer is (B).", r"regex:answer is \((\w)\)") == "B"
    assert M.extract_answer("I pick C, not D", r"regex:\b[A-D]\b") == "C"
    assert M.extract_answer("nothing here", r"regex:answer is (\w+)") == ""
    with pytest.raises(ValueError, match=r"bad regular expression '\(unclosed'"):
        M.extract_answer("x", "regex:(unclosed")
    with pytest.raises(ValueError, match="unknown how='last'"):
        M.extract_answer("x", "last")


def test_truncate_at_stop():
    assert M.truncate_at_stop("4\n\nQ: next question", ["Q:", "\n\n"]) == "4"
    assert M.truncate_at_stop("abc</s>def", "</s>") == "abc"
    assert M.truncate_at_stop("abc", ["x"]) == "abc"
    with pytest.raises(ValueError, match="non-empty"):
        M.truncate_at_stop("abc", ["x", ""])


# ------------------------------------------------------------------------------------------
# pass@k
# ------------------------------------------------------------------------------------------

def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                want = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
                assert M.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert M.pass_at_k(10, 0, 5) == 0.0
    assert M.pass_at_k(10, 10, 1) == 1.0
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(10, 6, 5) == 1.0  # n - c < k
    want = 1 - math.comb(197, 100) / math.comb(200, 100)
    assert M.pass_at_k(200, 3, 100) == pytest.approx(want, rel=1e-12)
    for args, msg in [((3, 1, 4), "k=4 exceeds"), ((3, 4, 1), "c=4"), ((-1, 0, 1), "n >= 0"),
                      ((3, -1, 1), "c >= 0"), ((3, 1, 0), "k >= 1"), ((3.5, 1, 1), "integers")]:
        with pytest.raises(ValueError, match=msg):
            M.pass_at_k(*args)


# ------------------------------------------------------------------------------------------
# Perplexity-type aggregations and standard errors
# ------------------------------------------------------------------------------------------

def test_perplexity_closed_forms():
    # A uniform model over V symbols has NLL ln V per symbol, so perplexity V.
    assert M.perplexity(50 * math.log(32000), 50) == pytest.approx(32000)
    assert M.word_perplexity(12 * math.log(7), 12) == pytest.approx(7)
    # 8 bits per byte = ln(256) nats per byte; byte perplexity is 2 ** bits_per_byte.
    assert M.bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    nll, n_bytes = 123.4, 77
    assert M.bits_per_byte(nll, n_bytes) == pytest.approx(nll / n_bytes / math.log(2))
    assert M.byte_perplexity(nll, n_bytes) == pytest.approx(2 ** M.bits_per_byte(nll, n_bytes))
    assert M.perplexity(0.0, 3) == 1.0
    assert M.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="negate"):
        M.perplexity(-3.0, 2)
    with pytest.raises(ValueError, match="number of bytes"):
        M.bits_per_byte(3.0, 0)


def test_mean_stderr():
    v = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert M.mean_stderr(v) == pytest.approx(statistics.stdev(v) / math.sqrt(len(v)))
    assert M.mean_stderr([0, 1, 1, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert M.mean_stderr([5.0]) == 0.0
    assert M.mean_stderr([]) == 0.0
