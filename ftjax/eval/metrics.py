"""Scoring functions of the evaluation stage, in plain Python and numpy: multiple-choice accuracy,
calibration, SQuAD-style answer matching, ROUGE-L and BLEU, answer extraction from generations,
pass@k, and perplexity-type aggregations of summed negative log-likelihoods.

These are the formulas a reader compares ftjax's numbers against, so each follows one named
reference exactly: lm-evaluation-harness for multiple choice, loglikelihood_rolling
aggregations and standard errors; the SQuAD v1.1 evaluation script for answer normalisation,
exact match and token F1; Chen et al. 2021 for pass@k; the `rouge_score` and `sacrebleu`
libraries themselves for ROUGE-L and BLEU (imported lazily, so the rest works without them).
No JAX: the harness turns model outputs into floats and strings, and this module scores them.
"""
from __future__ import annotations

import collections
import math
import operator
import re
import string
from typing import Sequence, Union

import numpy as np

__all__ = ["multiple_choice", "expected_calibration_error", "reliability_bins",
           "normalize_answer", "exact_match", "token_f1", "rouge_l", "bleu",
           "extract_answer", "truncate_at_stop", "pass_at_k", "perplexity", "bits_per_byte",
           "byte_perplexity", "word_perplexity", "mean_stderr"]

Refs = Union[str, Sequence[str]]

_INSTALL_HINT = "pip install rouge-score sacrebleu"


# ------------------------------------------------------------------------------------------
# Multiple choice
# ------------------------------------------------------------------------------------------

def _gold_indices(gold, n_choices: int) -> list[int]:
    """`gold` as a non-empty list of valid choice indices, or a ValueError saying what is wrong."""
    if isinstance(gold, (str, bytes)):
        raise ValueError(f"multiple_choice: gold must be a choice index or a list of indices, got "
                         f"the string {gold!r}; pass choices.index(gold) instead")
    golds = list(gold) if isinstance(gold, (list, tuple, np.ndarray)) else [gold]
    if not golds:
        raise ValueError("multiple_choice: gold is an empty list; give at least one choice index")
    out = []
    for g in golds:
        if isinstance(g, (bool, np.bool_)):
            raise ValueError(f"multiple_choice: gold {g!r} is a bool; give a choice index")
        try:
            i = operator.index(g)
        except TypeError:
            raise ValueError(f"multiple_choice: gold {g!r} is not an integer choice "
                             f"index") from None
        if not 0 <= i < n_choices:
            raise ValueError(f"multiple_choice: gold index {i} is outside 0..{n_choices - 1} "
                             f"({n_choices} choices)")
        out.append(i)
    return out


def multiple_choice(lls: Sequence[float], choices: Sequence[str],
                    gold: Union[int, Sequence[int]]) -> dict:
    """Score one multiple-choice question from the log-likelihood of each choice, exactly as
    lm-evaluation-harness's `multiple_choice` process_results does.

    acc = 1.0 when argmax(lls) is the gold index (with a list of golds: is among them);
    acc_norm does the same with argmax(lls / completion_len), where completion_len is the
    Python character length of each choice string *without* the target delimiter (the leading
    space lm-eval puts before a continuation is not counted); for ASCII choices that equals the
    byte length. Ties go to the first index (np.argmax). Also returns the predictions, the
    softmax of lls over the choices ("probs", renormalised over this choice set only) and the
    probability of the prediction ("confidence"), for calibration.
    Returns {"acc", "acc_norm", "pred", "pred_norm", "probs", "confidence"}.
    """
    ll = np.asarray(lls, np.float64)
    if ll.ndim != 1 or ll.size == 0:
        raise ValueError(f"multiple_choice: lls must be a non-empty 1-D list of log-likelihoods, "
                         f"got shape {ll.shape}")
    if len(choices) != ll.size:
        raise ValueError(f"multiple_choice: {ll.size} log-likelihoods for {len(choices)} choices; "
                         f"give one log-likelihood per choice")
    if np.isnan(ll).any() or (ll == np.inf).any():
        raise ValueError(f"multiple_choice: lls hold NaN or +inf ({ll.tolist()}); a "
                         f"log-likelihood is a finite number <= 0 (or -inf)")
    if not np.isfinite(ll).any():
        raise ValueError("multiple_choice: every log-likelihood is -inf; nothing to choose from")
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise ValueError(f"multiple_choice: choice {i} is {type(c).__name__}, not a string")
        if len(c) == 0:
            raise ValueError(f"multiple_choice: choice {i} is the empty string; acc_norm divides "
                             f"by the choice's character length, so every choice needs text")
    golds = _gold_indices(gold, ll.size)
    completion_len = np.array([float(len(c)) for c in choices])
    pred = int(np.argmax(ll))
    pred_norm = int(np.argmax(ll / completion_len))
    # Softmax with the max subtracted, so large |lls| do not overflow.
    z = np.exp(ll - ll.max())
    probs = z / z.sum()
    return {"acc": 1.0 if pred in golds else 0.0,
            "acc_norm": 1.0 if pred_norm in golds else 0.0,
            "pred": pred, "pred_norm": pred_norm,
            "probs": probs.tolist(), "confidence": float(probs[pred])}


# ------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------

def _positive_int(v, what: str) -> int:
    """`v` as an int >= 1, or a ValueError naming `what`."""
    try:
        i = operator.index(v)
    except TypeError:
        i = None
    if i is None or isinstance(v, (bool, np.bool_)) or i < 1:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return i


def _calibration_inputs(confidences, correct, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidences, np.float64)
    corr = np.asarray(correct, np.float64)
    if conf.ndim != 1 or conf.shape != corr.shape:
        raise ValueError(f"confidences {conf.shape} and correct {corr.shape} must be 1-D lists "
                         f"of the same length")
    if conf.size == 0:
        raise ValueError("calibration needs at least one prediction; confidences is empty")
    if np.isnan(conf).any() or conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError("confidences must be probabilities in [0, 1] (take the softmax "
                         "probability of the prediction, not a log-probability)")
    if not np.isin(corr, (0.0, 1.0)).all():
        raise ValueError("correct must hold 0/1 or booleans (was the prediction right)")
    _positive_int(n_bins, "n_bins")
    return conf, corr


def reliability_bins(confidences: Sequence[float], correct: Sequence[Union[bool, int]],
                     n_bins: int = 10) -> dict:
    """Per-bin statistics of a reliability diagram, for reports and plots.

    Equal-width bins over [0, 1]: bin i holds confidences in (i/n, (i+1)/n], and a confidence
    of exactly 0 goes to bin 0. Returns numpy arrays {"edges" [n+1], "count" [n] (int),
    "confidence" [n] (mean confidence), "accuracy" [n] (fraction correct)}; the means of an
    empty bin are nan (check "count").
    """
    conf, corr = _calibration_inputs(confidences, correct, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") gives the first edge >= c, so c == edge i+1 lands in bin i:
    # right-closed bins. Using the linspace edges (not ceil(c * n)) keeps e.g. c = 0.3 in
    # (0.2, 0.3], where 0.3 * 10 = 3.0000000000000004 would push it into the next bin.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=corr, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(confidences: Sequence[float],
                               correct: Sequence[Union[bool, int]], n_bins: int = 10) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins (Naeini
    et al. 2015; Guo et al. 2017, eq. 3). Bins as in `reliability_bins`."""
    bins = reliability_bins(confidences, correct, n_bins)
    filled = bins["count"] > 0
    weight = bins["count"][filled] / bins["count"].sum()
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(weight * gap))


# ------------------------------------------------------------------------------------------
# SQuAD-style answer matching
# ------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _ref_list(refs: Refs, fn: str) -> list[str]:
    out = [refs] if isinstance(refs, str) else list(refs)
    if not out:
        raise ValueError(f"{fn}: no reference answers; give a string or a non-empty list")
    for i, r in enumerate(out):
        if not isinstance(r, str):
            raise ValueError(f"{fn}: reference {i} is {type(r).__name__}, not a string")
    return out


def exact_match(pred: str, refs: Refs, normalize: bool = True) -> float:
    """1.0 when `pred` equals any reference (after `normalize_answer` on both when `normalize`,
    else as raw strings, untouched), else 0.0."""
    f = normalize_answer if normalize else (lambda s: s)
    p = f(pred)
    return float(any(p == f(r) for r in _ref_list(refs, "exact_match")))


def token_f1(pred: str, refs: Refs) -> float:
    """Bag-of-tokens F1 between normalised `pred` and each reference, maximised over references
    (SQuAD v1.1). Both empty after normalisation -> 1.0; one empty -> 0.0."""
    p_tokens = normalize_answer(pred).split()
    best = 0.0
    for ref in _ref_list(refs, "token_f1"):
        r_tokens = normalize_answer(ref).split()
        if not p_tokens or not r_tokens:
            score = float(p_tokens == r_tokens)
        else:
            # Multiset intersection: a token counts min(#pred, #ref) times.
            same = sum((collections.Counter(p_tokens) & collections.Counter(r_tokens)).values())
            if same == 0:
                score = 0.0
            else:
                precision, recall = same / len(p_tokens), same / len(r_tokens)
                score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


# ------------------------------------------------------------------------------------------
# ROUGE-L and BLEU (through their reference implementations)
# ------------------------------------------------------------------------------------------

def _corpus_refs(preds: Sequence[str], refs: Sequence[Refs], fn: str) -> list[list[str]]:
    if isinstance(preds, str) or isinstance(refs, str):
        raise ValueError(f"{fn}: preds and refs are corpora (lists, one entry per example), not "
                         f"single strings; wrap a single example as [pred], [ref]")
    if len(preds) != len(refs):
        raise ValueError(f"{fn}: {len(preds)} predictions but {len(refs)} references; give one "
                         f"reference (or one list of references) per prediction")
    if not preds:
        raise ValueError(f"{fn}: empty corpus; give at least one prediction")
    for i, p in enumerate(preds):
        if not isinstance(p, str):
            raise ValueError(f"{fn}: prediction {i} is {type(p).__name__}, not a string")
    return [_ref_list(r, f"{fn} (example {i})") for i, r in enumerate(refs)]


def rouge_l(preds: Sequence[str], refs: Sequence[Refs]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence, Lin 2004) over examples, computed by
    `rouge_score` without stemming; an example with several references takes the best one."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError(f"rouge_l needs the rouge-score package: {_INSTALL_HINT}") from e
    ref_lists = _corpus_refs(preds, refs, "rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # RougeScorer.score takes (target, prediction), in that order.
    per_example = [max(scorer.score(r, p)["rougeL"].fmeasure for r in rs)
                   for p, rs in zip(preds, ref_lists)]
    return float(np.mean(per_example))


def bleu(preds: Sequence[str], refs: Sequence[Refs], *, tokenize: str = "13a") -> float:
    """Corpus BLEU (Papineni et al. 2002) by `sacrebleu.corpus_bleu` with its defaults, on
    sacrebleu's 0-100 scale. `refs[i]` is the reference of prediction i, or a list of them; every
    example needs the same number of references (sacrebleu reads them as parallel streams)."""
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError(f"bleu needs the sacrebleu package: {_INSTALL_HINT}") from e
    ref_lists = _corpus_refs(preds, refs, "bleu")
    counts = {len(r) for r in ref_lists}
    if len(counts) > 1:
        first_bad = next(i for i, r in enumerate(ref_lists) if len(r) != len(ref_lists[0]))
        raise ValueError(f"bleu: ragged references: example 0 has {len(ref_lists[0])}, example "
                         f"{first_bad} has {len(ref_lists[first_bad])}; sacrebleu needs the same "
                         f"number per example (repeat a reference or drop extras to even them)")
    # Per-example lists [N][K] -> sacrebleu's K reference streams of N sentences each.
    streams = [list(s) for s in zip(*ref_lists)]
    return float(sacrebleu.corpus_bleu(list(preds), streams, tokenize=tokenize).score)


# ------------------------------------------------------------------------------------------
# Extracting answers from generations
# ------------------------------------------------------------------------------------------

# A number not glued to a preceding digit or '.': optional minus (ASCII or U+2212), then either
# digits with thousands commas (1,234,567: groups of exactly three) or plain digits, then an
# optional decimal part; or a bare decimal (.5). A sentence-final period is not part of it.
_NUMBER = re.compile(r"(?<![\d.])[-\u2212]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def extract_answer(text: str, how: str) -> str:
    """Pull the answer out of a generation. `how`: "none" (text stripped), "first_line" (first
    non-empty line, stripped), "last_number" (GSM8K style: the last number, commas removed, sign
    kept, "" when none) or "regex:<pattern>" (first match, its group 1 when the pattern has a
    group, else the whole match, stripped; "" when none)."""
    if how == "none":
        return text.strip()
    if how == "first_line":
        return next((line.strip() for line in text.splitlines() if line.strip()), "")
    if how == "last_number":
        found = _NUMBER.findall(text)
        return found[-1].replace(",", "").replace("\u2212", "-") if found else ""
    if how.startswith("regex:"):
        pattern = how[len("regex:"):]
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"extract_answer: bad regular expression {pattern!r} in "
                             f"how={how!r}: {e}") from None
        m = rx.search(text)
        if m is None:
            return ""
        got = m.group(1) if rx.groups else m.group(0)
        return (got or "").strip()
    raise ValueError(f"extract_answer: unknown how={how!r}; use 'none', 'first_line', "
                     f"'last_number' or 'regex:<pattern>'")


def truncate_at_stop(text: str, stops: Union[str, Sequence[str]]) -> str:
    """`text` cut before the earliest occurrence of any stop string (unchanged when none occurs)."""
    stops = [stops] if isinstance(stops, str) else list(stops)
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ValueError(f"truncate_at_stop: stop {i} is {s!r}; stops must be non-empty "
                             f"strings (an empty one would cut everything)")
    cut = min((j for j in (text.find(s) for s in stops) if j >= 0), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------------------
# pass@k
# ------------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), the chance that a random k-subset holds a correct sample."""
    try:
        n, c, k = (operator.index(v) for v in (n, c, k))
    except TypeError:
        raise ValueError(f"pass_at_k: n, c, k must be integers, got {n!r}, {c!r}, {k!r}") from None
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass_at_k: need n >= 0, c >= 0, k >= 1; got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct out of only n={n} samples; c must be <= n")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds the n={n} samples drawn; draw n >= k "
                         f"samples per problem")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): the stable product form from the
    # paper's reference code, free of the huge binomials.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


# ------------------------------------------------------------------------------------------
# Perplexity-type aggregations and standard errors
# ------------------------------------------------------------------------------------------
# For a corpus, sum the NLL and the counts over all documents first and call once: lm-eval's
# loglikelihood_rolling aggregations are ratios of sums (weighted_perplexity), not means of
# per-document ratios.

def _check_nll(nll_sum: float, count: int, fn: str, unit: str) -> tuple[float, int]:
    nll = float(nll_sum)
    if math.isnan(nll) or nll < 0:
        raise ValueError(f"{fn}: nll_sum={nll_sum!r} must be a summed negative log-likelihood "
                         f">= 0 in nats (negate a summed log-likelihood)")
    return nll, _positive_int(count, f"{fn}: the number of {unit}")


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf  # math.exp overflows just above 709.78


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Token perplexity exp(nll_sum / n_tokens), with nll_sum in nats."""
    nll, n = _check_nll(nll_sum, n_tokens, "perplexity", "tokens")
    return _exp(nll / n)


def word_perplexity(nll_sum: float, n_words: int) -> float:
    """exp(nll_sum / n_words): lm-eval's word_perplexity of loglikelihood_rolling tasks."""
    nll, n = _check_nll(nll_sum, n_words, "word_perplexity", "words")
    return _exp(nll / n)


def byte_perplexity(nll_sum: float, n_bytes: int) -> float:
    """exp(nll_sum / n_bytes): lm-eval's byte_perplexity (count UTF-8 bytes of the text)."""
    nll, n = _check_nll(nll_sum, n_bytes, "byte_perplexity", "bytes")
    return _exp(nll / n)


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """nll_sum / (n_bytes * ln 2): lm-eval's bits_per_byte, a tokenizer-independent loss."""
    nll, n = _check_nll(nll_sum, n_bytes, "bits_per_byte", "bytes")
    return nll / (n * math.log(2))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean metric: sample standard deviation (ddof=1) / sqrt(n), as
    lm-eval reports it; 0.0 for fewer than two values."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1:
        raise ValueError(f"mean_stderr: values must be a 1-D list, got shape {v.shape}")
    if v.size < 2:
        return 0.0
    return float(np.std(v, ddof=1) / math.sqrt(v.size))
