"""The data report: what came in, what was kept, what was dropped and why, per source and
split; truncations, token lengths, labels, PII masked, and warnings. Printed and saved to the
workdir as `data_report.json` and `data_report.txt`.

Counting protocol (the pipeline calls these as it decides):

    rep.seen(source, split)                        an input example
    rep.kept(source, split) / rep.dropped(source, split, reason)   its fate
    rep.dropped(source, split, reason, was_kept=True)   a kept one removed later (token filter)
    rep.add_counters(source, split, counters)      tokenization counters (`templates`:
                                                   "truncated_examples", "truncated_tokens", ...)
    rep.add_pii(source, split, counts)             masked items per kind
    rep.add_lengths(split, token_lengths)          token length of each final example
    rep.add_labels(split, labels)                  labels of each final example
    rep.set_split_size(split, n)                   examples in each final split

`check()` enforces the invariant seen == kept + sum(dropped) for every (source, split), so
nothing is dropped without being counted. `warnings()` lists what a user should look at.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ftjax import workdir as workdir_lib
from ftjax.data.errors import DataError

__all__ = ["DataReport", "histogram", "histogram_rows", "REPORT_JSON", "REPORT_TXT"]

REPORT_JSON = "data_report.json"
REPORT_TXT = "data_report.txt"


def _nice_width(span: int, num_bins: int) -> int:
    """The smallest bin width of the form 1, 2 or 5 x 10^k that covers `span` values in at most
    `num_bins` bins (round edges such as 20-29, 30-39 read at a glance)."""
    need = max(1, math.ceil(span / num_bins))
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= need:
                return m * scale
        scale *= 10


def histogram(lengths: Mapping[int, int], num_bins: int = 10) -> dict:
    """Summary and histogram of a {length: count} table: at most `num_bins` bins of equal
    width (1, 2 or 5 x 10^k) from the minimum. `bin_edges[i]`..`bin_edges[i+1] - 1` is bin i."""
    if not lengths:
        return {"n": 0}
    vals = np.array(sorted(lengths), np.int64)
    cnts = np.array([lengths[v] for v in vals], np.int64)
    n = int(cnts.sum())
    cum = np.cumsum(cnts)

    def pct(q: float) -> int:
        return int(vals[np.searchsorted(cum, q * n, side="left")])
    lo, hi = int(vals[0]), int(vals[-1])
    width = _nice_width(hi - lo + 1, num_bins)
    edges = list(range(lo, hi + width + 1, width))
    counts = np.zeros(len(edges) - 1, np.int64)
    np.add.at(counts, (vals - lo) // width, cnts)
    return {"n": n, "min": lo, "max": hi, "mean": float((vals * cnts).sum() / n),
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "bin_edges": edges, "counts": counts.tolist()}


def histogram_rows(h: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """(first, last, count) rows of a `histogram`, with each run of empty bins merged into
    one row (a long tail prints one "0" row, not one per bin)."""
    rows: list[tuple[int, int, int]] = []
    for lo, hi, c in zip(h["bin_edges"], h["bin_edges"][1:], h["counts"]):
        if c == 0 and rows and rows[-1][2] == 0:
            rows[-1] = (rows[-1][0], hi - 1, 0)
        else:
            rows.append((lo, hi - 1, int(c)))
    return rows


class DataReport:
    """Counts and summaries of a data preparation run (see the module docstring)."""

    def __init__(self, *, min_train_examples: int = 1000, imbalance_ratio: float = 5.0,
                 max_duplicate_rate: float = 0.2, max_truncation_rate: float = 0.05,
                 train_split: str = "train") -> None:
        """Warning thresholds: fewer than `min_train_examples` in the train split; a label
        `imbalance_ratio` times rarer than the most frequent one; more than
        `max_duplicate_rate` of a source's inputs dropped as duplicates; more than
        `max_truncation_rate` of a split's kept examples truncated."""
        self.thresholds = dict(min_train_examples=min_train_examples,
                               imbalance_ratio=imbalance_ratio,
                               max_duplicate_rate=max_duplicate_rate,
                               max_truncation_rate=max_truncation_rate, train_split=train_split)
        self._seen: Counter = Counter()                       # (source, split) -> n
        self._kept: Counter = Counter()
        self._dropped: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self._counters: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self._pii: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self._lengths: dict[str, Counter] = defaultdict(Counter)   # split -> {length: n}
        self._labels: dict[str, Counter] = defaultdict(Counter)    # split -> {label: n}
        self._split_sizes: dict[str, int] = {}
        self.notes: list[str] = []

    # -- counting -------------------------------------------------------------------------
    def seen(self, source: str, split: str, n: int = 1) -> None:
        self._seen[(source, split)] += n

    def kept(self, source: str, split: str, n: int = 1) -> None:
        self._kept[(source, split)] += n

    def dropped(self, source: str, split: str, reason: str, n: int = 1,
                was_kept: bool = False) -> None:
        """Counts drops; `was_kept=True` moves examples already counted as kept (e.g. removed
        by a token-length filter after tokenization)."""
        if not reason:
            raise DataError("a drop needs a reason (e.g. 'exact_duplicate', 'too_long_tokens')")
        self._dropped[(source, split)][reason] += n
        if was_kept:
            self._kept[(source, split)] -= n

    def add_counters(self, source: str, split: str, counters: Mapping[str, int]) -> None:
        """Adds tokenization counters (e.g. {"truncated_examples": 3, "truncated_tokens": 40});
        the truncation warning reads "truncated_examples" (or "truncated")."""
        self._counters[(source, split)].update({k: int(v) for k, v in counters.items()})

    def add_pii(self, source: str, split: str, counts: Mapping[str, int]) -> None:
        self._pii[(source, split)].update(counts)

    def add_lengths(self, split: str, lengths: Iterable[int]) -> None:
        self._lengths[split].update(int(x) for x in lengths)

    def add_labels(self, split: str, labels: Iterable[Any]) -> None:
        self._labels[split].update(str(x) for x in labels)

    def set_split_size(self, split: str, n: int) -> None:
        self._split_sizes[split] = int(n)

    def note(self, text: str) -> None:
        """A free-form line for the report (e.g. the split ratios or the mixture weights)."""
        self.notes.append(text)

    # -- checks ---------------------------------------------------------------------------
    def _keys(self) -> list[tuple[str, str]]:
        return sorted(set(self._seen) | set(self._kept) | set(self._dropped))

    def check(self) -> None:
        """Raises DataError unless seen == kept + sum(dropped) for every (source, split)."""
        bad = []
        for key in self._keys():
            dropped = sum(self._dropped[key].values()) if key in self._dropped else 0
            if self._seen[key] != self._kept[key] + dropped:
                bad.append(f"{key[0]}[{key[1]}]: seen {self._seen[key]} != kept "
                           f"{self._kept[key]} + dropped {dropped}")
        if bad:
            raise DataError("data report does not add up (an example was lost or counted "
                            "twice): " + "; ".join(bad))

    def warnings(self) -> list[str]:
        """Human-readable warnings (see the thresholds in `__init__`)."""
        t = self.thresholds
        out = []
        train = t["train_split"]
        n_train = self._split_sizes.get(train)
        if n_train is None and self._lengths.get(train):
            n_train = sum(self._lengths[train].values())
        if n_train is not None and n_train < t["min_train_examples"]:
            out.append(f"only {n_train} training examples (< {t['min_train_examples']}): "
                       "expect overfitting; add data or use a parameter-efficient method")
        for split, n in sorted(self._split_sizes.items()):
            if n == 0:
                out.append(f"split {split!r} is empty")
        for split, labels in sorted(self._labels.items()):
            if len(labels) < 2:
                continue
            total = sum(labels.values())
            top_label, top = max(labels.items(), key=lambda kv: (kv[1], kv[0]))
            for label, n in sorted(labels.items(), key=lambda kv: kv[1]):
                if n * t["imbalance_ratio"] <= top:
                    out.append(f"label {label!r} is {100 * n / total:.1f}% of the {split} data "
                               f"({n} vs {top} for {top_label!r}): heavily imbalanced; consider "
                               "class-weighted or focal loss, or over/undersampling")
        for key in self._keys():
            seen = self._seen[key]
            dup = self._dropped[key]["exact_duplicate"] + self._dropped[key]["near_duplicate"] \
                if key in self._dropped else 0
            if seen and dup / seen > t["max_duplicate_rate"]:
                out.append(f"{key[0]}[{key[1]}]: {100 * dup / seen:.1f}% of the examples are "
                           "duplicates")
            kept = self._kept[key]
            c = self._counters.get(key, {})
            trunc = c.get("truncated_examples", c.get("truncated", 0))
            if kept and trunc / kept > t["max_truncation_rate"]:
                out.append(f"{key[0]}[{key[1]}]: {100 * trunc / kept:.1f}% of the kept examples "
                           "were truncated; raise train.seq_len or shorten the data")
        return out

    # -- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        sources = []
        for src, split in self._keys():
            key = (src, split)
            dropped = dict(sorted(self._dropped[key].items())) if key in self._dropped else {}
            sources.append({"source": src, "split": split, "seen": self._seen[key],
                            "kept": self._kept[key], "dropped": dropped,
                            "dropped_total": sum(dropped.values()),
                            "counters": dict(sorted(self._counters.get(key, {}).items())),
                            "pii_masked": dict(sorted(self._pii.get(key, {}).items()))})
        total_dropped: Counter = Counter()
        for c in self._dropped.values():
            total_dropped.update(c)
        return {
            "totals": {"seen": sum(self._seen.values()), "kept": sum(self._kept.values()),
                       "dropped": dict(sorted(total_dropped.items()))},
            "sources": sources,
            "splits": dict(sorted(self._split_sizes.items())),
            "token_lengths": {s: histogram(c) for s, c in sorted(self._lengths.items())},
            "labels": {s: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
                       for s, c in sorted(self._labels.items())},
            "notes": list(self.notes),
            "warnings": self.warnings(),
            "thresholds": dict(self.thresholds),
        }

    def to_text(self) -> str:
        d = self.to_dict()
        lines = ["== data report ==",
                 f"examples: {d['totals']['seen']} seen, {d['totals']['kept']} kept, "
                 f"{sum(d['totals']['dropped'].values())} dropped"]
        # Source names in full: a cut path can hide which file is meant.
        w = max([len("source")] + [len(s["source"]) for s in d["sources"]])
        lines.append(f"{'source':<{w}} {'split':<10} {'seen':>8} {'kept':>8}  "
                     "dropped (reason: n)")
        for s in d["sources"]:
            why = ", ".join(f"{k}: {v}" for k, v in s["dropped"].items()) or "-"
            lines.append(f"{s['source']:<{w}} {s['split']:<10} {s['seen']:>8} "
                         f"{s['kept']:>8}  {why}")
            extra = {**s["counters"], **{f"pii_{k}": v for k, v in s["pii_masked"].items()}}
            if extra:
                lines.append(" " * 4 + ", ".join(f"{k}: {v}" for k, v in extra.items()))
        if d["splits"]:
            lines.append("splits: " + ", ".join(f"{k}={v}" for k, v in d["splits"].items()))
        for split, h in d["token_lengths"].items():
            if not h.get("n"):
                continue
            lines.append(f"token lengths [{split}]: n={h['n']} min={h['min']} mean={h['mean']:.1f}"
                         f" p50={h['p50']} p90={h['p90']} p99={h['p99']} max={h['max']}")
            top = max(h["counts"]) or 1
            for lo, hi, c in histogram_rows(h):
                bar = "#" * max(round(40 * c / top), 1 if c else 0)
                span = f"{lo}" if lo == hi else f"{lo}-{hi}"
                lines.append(f"  {span:>13} {c:>8} {bar}")
        for split, labels in d["labels"].items():
            total = sum(labels.values()) or 1
            lines.append(f"labels [{split}]: " + ", ".join(
                f"{k}={v} ({100 * v / total:.1f}%)" for k, v in labels.items()))
        lines += [f"note: {n}" for n in d["notes"]]
        lines += [f"WARNING: {w}" for w in d["warnings"]] or ["no warnings"]
        return "\n".join(lines)

    def print(self) -> None:
        print(self.to_text(), flush=True)

    def save(self, workdir: str) -> tuple[str, str]:
        """Writes data_report.json and data_report.txt into `workdir` (local or gs://)
        atomically, on every process that calls it; returns their paths."""
        self.check()
        paths = []
        for name, text in ((REPORT_JSON, json.dumps(self.to_dict(), indent=2)),
                           (REPORT_TXT, self.to_text() + "\n")):
            paths.append(os.fspath(workdir_lib.write_text(workdir, name, text,
                                                          all_processes=True)))
        return paths[0], paths[1]
