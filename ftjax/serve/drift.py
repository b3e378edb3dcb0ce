"""Drift of served prompts away from a reference set: token JS divergence and length PSI.

A `DriftMonitor` holds a reference set of prompts (token-id lists, e.g. the fine-tuning data:
`DriftMonitor.from_jsonl(path, tokenizer)`) and a sliding window of the `window` most recent
served prompts. At the `min_samples`-th prompt and then every `check_every` prompts it compares
the window with the reference by two statistics and alerts when either crosses its threshold.

**Token unigram drift: Jensen-Shannon divergence (base 2, in [0, 1]).** Token ids are put into
`token_buckets` (1024) cells by `id % token_buckets`: exact ids when the vocabulary is no larger,
a fixed partition of a big vocabulary otherwise (bounding the number of cells bounds the
small-sample noise). Over the support S = cells seen in the reference or the window, with
counts r_i and w_i and additive (Krichevsky-Trofimov) smoothing a = 0.5::

    p_i = (r_i + a) / sum_S (r + a)     q_i = (w_i + a) / sum_S (w + a)     m = (p + q) / 2
    JS = 1/2 KL(p || m) + 1/2 KL(q || m),     KL(x || y) = sum_i x_i log2(x_i / y_i)

0 for equal distributions, 1 for disjoint supports. A window of finite size reads above 0 even
without drift: the plug-in estimate is biased by about (|S| - 1) / (8 ln 2 * tokens in the
window), e.g. 0.02 for 32 prompts of the synthetic suite and 0.09 for 32 twenty-token prompts
of a 32k Zipf vocabulary. The monitor estimates that **no-drift level** for the window's
prompt count n (`DriftReport.token_js_floor`: the mean JS of 8 seeded n-prompt samples of the
reference against the rest of it, cached per n) and alerts when

    token_js - token_js_floor > token_js_threshold

so one threshold holds for every window size and tokenizer. `DriftReport.token_js` (and the
metric) is the raw JS.

**Prompt-length drift: population stability index (natural log).** Bin edges are the
reference length quantiles at j/B, j = 1 .. B-1 (duplicates from tied lengths merged); bins are
right-closed with open ends: (-inf, e_1], (e_1, e_2], ..., (e_k, inf). With the reference and
window fractions p_i and q_i per bin (counts + 0.5)::

    PSI = sum_i (q_i - p_i) ln(q_i / p_i)

Under no drift PSI is about (B - 1) / n for n window prompts, so 10 bins on the first 32-prompt
window would read ~0.3 and alert half the time. The monitor uses B = min(length_bins,
max(2, n // 25)) bins: 2 at 32 prompts, 10 from 250 on; the no-drift level stays ~0.03-0.05.

**Thresholds.** `length_psi_threshold` = 0.25 is the conventional PSI line for a significant
shift (< 0.1 stable, 0.1-0.25 moderate, > 0.25 significant). `token_js_threshold` = 0.04
(on the excess over the no-drift level) comes from a measurement with the character tokenizer
on the built-in synthetic suite (`ftjax.data.synthetic`; reproduced by
tests/test_serve_monitoring.py::test_threshold_measurement; docs/serving_monitoring.md has the
table). Reference: 2000 prompts of the pretraining mixture. Excess JS of a window of

- other draws of the same mixture: <= 0.005 at 256 prompts; at the first check (32
  prompts) 0.027 at the 99th percentile and 0.030 at most over 300 random windows;
- the held-out tasks (dmy2iso, double, swap, caesar, upper): 0.08-0.09 at 256 prompts,
  >= 0.053 at 32 (50 windows each) - alerts;
- the mixture with one of the five tasks replaced by `upper` (a 20 % change of traffic):
  0.040-0.056 at 256 prompts - alerts (most checks);
- each prompt written twice: same tokens, excess < 0.005, but PSI > 2 - a length alert only.

So 0.04 sits above every no-drift window and below the shifts. On a 32k-id Zipf vocabulary
(1024 cells) the no-drift excess stayed within +-0.01 while the raw JS was up to 0.09.

Feed `observe` the same text representation as the reference: for chat requests the
concatenated message contents (`messages_text`), tokenized without a chat template.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "DriftReport",
    "DriftMonitor",
    "format_alert",
    "js_divergence",
    "psi",
    "token_js",
    "length_bin_edges",
    "length_psi",
    "messages_text",
    "SMOOTHING",
    "DEFAULT_TOKEN_BUCKETS",
]

SMOOTHING = 0.5  # additive pseudo-count per cell, for tokens and for length bins
DEFAULT_TOKEN_BUCKETS = 1024
DEFAULT_LENGTH_BINS = 10
_MIN_PER_LENGTH_BIN = 25  # window prompts per length bin before the full bin count is used
_FLOOR_DRAWS = 8  # reference resamples that estimate the no-drift JS of a window
_FLOOR_SEED = 0


# ---------------------------------------------------------------------------- statistics


def _normalise(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array, got shape {a.shape}")
    if np.any(a < 0) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite and non-negative, got {a}")
    total = a.sum()
    if total <= 0:
        raise ValueError(f"{name} sums to 0; it is not a distribution")
    return a / total


def js_divergence(p: Any, q: Any) -> float:
    """Jensen–Shannon divergence in bits (in [0, 1]) of two histograms (normalised here)."""
    p, q = _normalise(p, "p"), _normalise(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q differ in length: {p.shape} vs {q.shape}")
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return float(min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q))))


def psi(p: Any, q: Any) -> float:
    """Population stability index sum (q - p) ln(q / p) of a reference p and an actual q.

    Both are histograms over the same bins (normalised here) and must have no empty bin:
    smooth the counts first (`length_psi` adds `SMOOTHING` to every bin).
    """
    p, q = _normalise(p, "p"), _normalise(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q differ in length: {p.shape} vs {q.shape}")
    if np.any(p == 0) or np.any(q == 0):
        raise ValueError("psi needs non-zero fractions in every bin; smooth the counts first")
    return float(np.sum((q - p) * np.log(q / p)))


def token_js(ref_counts: Any, win_counts: Any, smoothing: float = SMOOTHING) -> float:
    """JS (bits) of two token-count vectors over the union of their non-zero cells, smoothed."""
    r = np.asarray(ref_counts, dtype=np.float64)
    w = np.asarray(win_counts, dtype=np.float64)
    if r.shape != w.shape or r.ndim != 1:
        raise ValueError(f"count vectors must be 1-d and equally long: {r.shape} vs {w.shape}")
    if r.sum() <= 0 or w.sum() <= 0:
        raise ValueError("token_js needs at least one token on each side")
    support = (r > 0) | (w > 0)
    return js_divergence(r[support] + smoothing, w[support] + smoothing)


def length_bin_edges(ref_lengths: Any, bins: int = DEFAULT_LENGTH_BINS) -> np.ndarray:
    """Edges e_1 < ... < e_k: the reference quantiles at j/bins, j = 1..bins-1, de-duplicated.

    Bins are right-closed with open ends: (-inf, e_1], (e_1, e_2], ..., (e_k, inf); there are
    k + 1 <= bins of them (fewer when tied lengths make quantiles coincide).
    """
    lengths = np.asarray(ref_lengths, dtype=np.float64)
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError("length_bin_edges needs at least one reference length")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return np.unique(np.quantile(lengths, np.arange(1, bins) / bins))


def _bin_counts(lengths: Any, edges: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(edges, np.asarray(lengths, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def length_psi(ref_lengths: Any, win_lengths: Any, edges: np.ndarray | None = None, *,
               bins: int = DEFAULT_LENGTH_BINS, smoothing: float = SMOOTHING) -> float:
    """PSI of window lengths against reference lengths over reference-quantile bins."""
    if edges is None:
        edges = length_bin_edges(ref_lengths, bins)
    if len(win_lengths) == 0:
        raise ValueError("length_psi needs at least one window length")
    return psi(_bin_counts(ref_lengths, edges) + smoothing,
               _bin_counts(win_lengths, edges) + smoothing)


# ------------------------------------------------------------------------------ reports


@dataclasses.dataclass(frozen=True)
class DriftReport:
    """One comparison of the recent window (n prompts) with the reference.

    `reasons` has one entry per statistic over its threshold, e.g. "token_js 0.213 > 0.1";
    `token_js_alert` / `length_psi_alert` say which (`statistics()` gives all three together,
    in the shape `ServerMetrics.set_drift` takes).
    """

    n: int
    token_js: float
    length_psi: float
    alert: bool
    reasons: tuple[str, ...]
    token_js_alert: bool = False
    length_psi_alert: bool = False
    token_js_floor: float = 0.0

    def statistics(self) -> tuple[tuple[str, float, bool], ...]:
        """((name, value, alert), ...) for each statistic: feed to `ServerMetrics.set_drift`."""
        return (("token_js", self.token_js, self.token_js_alert),
                ("length_psi", self.length_psi, self.length_psi_alert))


def format_alert(report: DriftReport) -> str:
    """The one-line alert for a report with `alert=True`, starting with "DRIFT ALERT"."""
    if not report.alert:
        raise ValueError("format_alert got a report without an alert; check report.alert first")
    return (f"DRIFT ALERT: the last {report.n} prompts differ from the reference: "
            f"{'; '.join(report.reasons)} (token_js={report.token_js:.4f}, "
            f"length_psi={report.length_psi:.4f})")


# ------------------------------------------------------------------------------ monitor


def messages_text(messages: Sequence[Any]) -> str:
    """Chat messages rendered as their contents joined by "\\n" (no template, no roles).

    A content may be a string or an OpenAI list of parts, whose "text" parts are joined.
    """
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "content" not in msg:
            raise ValueError(f"message {i} is not an object with a 'content' field: {msg!r:.80}")
        content = msg["content"]
        if content is None:
            continue
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append("".join(part.get("text", "") for part in content
                               if isinstance(part, dict) and part.get("type", "text") == "text"))
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
    return "\n".join(out)


class DriftMonitor:
    """Compare a sliding window of served prompts with a reference set (module docstring).

    `observe(ids)` adds one prompt (thread-safe) and returns a `DriftReport` at the
    `min_samples`-th prompt and then every `check_every` prompts; `report()` compares the
    current window at any time (None before `min_samples` prompts). When a report has
    `alert=True`, log `format_alert(report)` and feed `report.statistics()` to the metrics.
    """

    def __init__(self, reference: Sequence[Sequence[int]], *, window: int = 256,
                 min_samples: int = 32, token_js_threshold: float = 0.04,
                 length_psi_threshold: float = 0.25, check_every: int = 32,
                 token_buckets: int = DEFAULT_TOKEN_BUCKETS,
                 length_bins: int = DEFAULT_LENGTH_BINS) -> None:
        if window < 1 or min_samples < 1 or check_every < 1:
            raise ValueError(f"window ({window}), min_samples ({min_samples}) and check_every "
                             f"({check_every}) must all be >= 1")
        if min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) exceeds the window ({window}): "
                             "no report could ever be made")
        if token_buckets < 2 or length_bins < 2:
            raise ValueError(f"token_buckets ({token_buckets}) and length_bins ({length_bins}) "
                             "must be >= 2")
        if not (0 < token_js_threshold <= 1) or length_psi_threshold <= 0:
            raise ValueError(f"thresholds must be positive (token_js in (0, 1]); got "
                             f"{token_js_threshold}, {length_psi_threshold}")
        self.window = window
        self.min_samples = min_samples
        self.check_every = check_every
        self.token_js_threshold = float(token_js_threshold)
        self.length_psi_threshold = float(length_psi_threshold)
        self.token_buckets = token_buckets
        self.length_bins = length_bins

        self._dtype = np.uint16 if token_buckets <= 1 << 16 else np.int64
        ref_lengths, ref_bucket_ids = [], []
        for i, ids in enumerate(reference):
            arr = (self._ids(ids, f"reference prompt {i}") % token_buckets).astype(self._dtype)
            ref_lengths.append(arr.size)
            ref_bucket_ids.append(arr)
        if not ref_lengths:
            raise ValueError("DriftMonitor needs a non-empty reference set of prompts")
        # The reference's bucket ids, flat with offsets, to resample no-drift windows from.
        self._ref_ids = np.concatenate(ref_bucket_ids)
        self._ref_offsets = np.concatenate([[0], np.cumsum(ref_lengths)]).astype(np.int64)
        self._ref_counts = np.bincount(self._ref_ids, minlength=token_buckets).astype(np.float64)
        if self._ref_counts.sum() == 0:
            raise ValueError("every reference prompt is empty; nothing to compare tokens with")
        self.reference_size = len(ref_lengths)
        self._ref_lengths = np.asarray(ref_lengths, dtype=np.float64)
        self._floors: dict[int, float] = {}  # no-drift JS level per window size
        # Length-bin edges for 2 .. length_bins bins (the window size picks the count).
        self._edges = {b: length_bin_edges(self._ref_lengths, b) for b in range(2, length_bins + 1)}

        self._lock = threading.Lock()
        self._win: collections.deque[np.ndarray] = collections.deque()  # bucket ids
        self._win_counts = np.zeros(token_buckets, dtype=np.float64)
        self._seen = 0

    @staticmethod
    def _ids(ids: Sequence[int], what: str) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"{what} must be a flat list of token ids, got shape {arr.shape}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{what} has a negative token id {int(arr.min())}")
        return arr

    @property
    def seen(self) -> int:
        """Prompts observed since construction."""
        return self._seen

    def observe(self, prompt_ids: Sequence[int]) -> DriftReport | None:
        """Add one served prompt; a report at the min_samples-th and every check_every-th after."""
        arr = self._ids(prompt_ids, "prompt_ids")
        buckets = (arr % self.token_buckets).astype(self._dtype)
        with self._lock:
            self._win.append(buckets)
            np.add.at(self._win_counts, buckets, 1.0)
            if len(self._win) > self.window:
                np.subtract.at(self._win_counts, self._win.popleft(), 1.0)
            self._seen += 1
            due = (self._seen >= self.min_samples
                   and (self._seen - self.min_samples) % self.check_every == 0)
            return self._report_locked() if due else None

    def report(self) -> DriftReport | None:
        """The current window against the reference; None before min_samples prompts."""
        with self._lock:
            return self._report_locked()

    def _report_locked(self) -> DriftReport | None:
        n = len(self._win)
        if n < self.min_samples or n == 0:
            return None
        if self._win_counts.sum() > 0:
            js = token_js(self._ref_counts, self._win_counts)
        else:
            js = 1.0  # only empty prompts: nothing like the reference
        floor = self._floor(n)
        bins = min(self.length_bins, max(2, n // _MIN_PER_LENGTH_BIN))
        lengths = [ids.size for ids in self._win]
        lp = length_psi(self._ref_lengths, lengths, self._edges[bins])
        js_alert = js - floor > self.token_js_threshold
        psi_alert = lp > self.length_psi_threshold
        reasons = []
        if js_alert:
            reasons.append(f"token_js {js:.3f} > {floor:.3f} (no-drift level) + "
                           f"{self.token_js_threshold:g}")
        if psi_alert:
            reasons.append(f"length_psi {lp:.3f} > {self.length_psi_threshold:g}")
        return DriftReport(n=n, token_js=js, length_psi=lp, alert=js_alert or psi_alert,
                           reasons=tuple(reasons), token_js_alert=js_alert,
                           length_psi_alert=psi_alert, token_js_floor=floor)

    def _floor(self, n: int) -> float:
        """Mean JS of `_FLOOR_DRAWS` n-prompt samples of the reference against the rest of it.

        That is what `token_js` reads for a window of n prompts when nothing has drifted
        (finite-sample bias); cached per n. With fewer than 2n reference prompts the samples
        are drawn with replacement and compared with the whole reference (a slight
        underestimate).
        """
        if n in self._floors:
            return self._floors[n]
        rng = np.random.default_rng(_FLOOR_SEED)
        N = self.reference_size
        vals = []
        for _ in range(_FLOOR_DRAWS):
            if N >= 2 * n:
                idx = rng.choice(N, size=n, replace=False)
            else:
                idx = rng.integers(0, N, size=n)
            ids = np.concatenate([self._ref_ids[self._ref_offsets[i]:self._ref_offsets[i + 1]]
                                  for i in idx])
            sample = np.bincount(ids, minlength=self.token_buckets).astype(np.float64)
            rest = self._ref_counts - sample if N >= 2 * n else self._ref_counts
            if sample.sum() == 0 or rest.sum() == 0:
                continue
            vals.append(token_js(rest, sample))
        self._floors[n] = float(np.mean(vals)) if vals else 0.0
        return self._floors[n]

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer: Any, field: str = "prompt", *,
                   text_fn: Callable[[dict], str] | None = None, **kw: Any) -> "DriftMonitor":
        """Reference prompts from a JSONL file (one object a line), tokenized by `tokenizer.encode`.

        A line's prompt is its `field` (a string), or else its chat "messages" rendered by
        `messages_text` - or `text_fn(obj)` when given (e.g. to apply the chat template the
        server applies before it calls `observe`). Blank lines are skipped; anything else that
        is not such an object is an error naming the line. Other keywords go to the
        constructor.
        """
        return cls([tokenizer.encode(t) for t in _jsonl_texts(path, field, text_fn)], **kw)


def _jsonl_texts(path: str | os.PathLike, field: str,
                 text_fn: Callable[[dict], str] | None = None) -> Iterable[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one "
                                 "JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if text_fn is not None:
                try:
                    texts.append(text_fn(obj))
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{where}: text_fn failed: {e!r}") from None
            elif isinstance(obj.get(field), str):
                texts.append(obj[field])
            elif isinstance(obj.get("messages"), list):
                try:
                    texts.append(messages_text(obj["messages"]))
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
            else:
                raise ValueError(f"{where}: no string field {field!r} and no 'messages' list; "
                                 f"keys are {sorted(obj)}; pass field= to name the prompt field")
    if not texts:
        raise ValueError(f"{os.fspath(path)}: no prompts in the file")
    return texts
