"""What the loader maps over: random-access views of canonical examples, the encoder, and
`Prepared` (the outcome of `prepare`). Picklable for worker processes."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ftjax.data import templates
from ftjax.data.errors import DataError
from ftjax.data.formats import to_canonical

from ftjax.data.options import KINDS, DataOptions


# --------------------------------------------------------------------------------------------
# Record views and encoding (what the loader maps over; picklable for worker processes)
# --------------------------------------------------------------------------------------------

class ExampleView:
    """Random access to the canonical, cleaned examples of one split.

    Built over (source, record) references into opened `RecordSource`s: item i reads its
    record, converts it with `formats.to_canonical` and applies the record-local cleaning
    (`Cleaner.clean`: unicode + PII) again, exactly as `prepare` did before deciding to keep it.
    """

    def __init__(self, sources: Sequence[Any], formats: Sequence[str],
                 field_maps: Sequence[Mapping], clean_config: Any, refs: np.ndarray) -> None:
        self.sources = list(sources)
        self.formats = list(formats)
        self.field_maps = [dict(m) for m in field_maps]
        self.clean_config = clean_config
        self.refs = np.asarray(refs, np.int64).reshape(-1, 2)
        self._cleaner = None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        s, r = (int(x) for x in self.refs[int(i)])
        record = self.sources[s][r]
        try:
            ex = to_canonical(record, self.formats[s], self.field_maps[s], "")
        except DataError:
            ex = to_canonical(record, self.formats[s], self.field_maps[s],
                              self.sources[s].origin_str(r))
        if self.clean_config is not None:
            if self._cleaner is None:
                from ftjax.data.clean import Cleaner
                self._cleaner = Cleaner(self.clean_config)
            ex = self._cleaner.clean(ex)[0]
        return ex

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _cleaner=None)


class ListView:
    """Random access over in-memory canonical examples (tests, or data built in python)."""

    def __init__(self, examples: Sequence[Mapping]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Mapping:
        return self.examples[int(i)]


@dataclasses.dataclass(frozen=True)
class _Encoder:
    """Canonical example -> tokenized element of `kind` (templates' tokenize_* functions)."""

    kind: str
    tok: Any
    template: Optional[str]
    max_len: int
    truncation: Any
    labels: tuple = ()

    def __call__(self, ex: Mapping, counters: Optional[dict] = None) -> dict:
        kw = dict(template=self.template, max_len=self.max_len, truncation=self.truncation,
                  counters=counters)
        if self.kind in ("sft", "text"):
            return templates.tokenize_sft(ex, self.tok, **kw)
        if self.kind == "preference":
            el = templates.tokenize_preference(ex, self.tok, **kw)
            return {**el, "margin": float(ex.get("margin", 0.0))}
        if self.kind == "unpaired":
            return templates.tokenize_unpaired(ex, self.tok, **kw)
        label_to_id = {lab: i for i, lab in enumerate(self.labels)} if self.labels else \
            {ex["label"]: 0}  # prepare measures lengths before the class list exists
        trunc = self.truncation if isinstance(self.truncation, str) else "right"
        return templates.tokenize_classification(ex, self.tok, label_to_id, self.max_len,
                                                 truncation=trunc, counters=counters)


def encode_fn(prepared: "Prepared", tok: Any, seq_len: int):
    """The loader's per-example function (canonical -> tokens) for `prepared`'s kind."""
    max_len = prepared.options.max_len or (seq_len if prepared.kind == "classification"
                                           else seq_len + 1)
    return _Encoder(prepared.kind, tok, prepared.options.template, max_len,
                    prepared.options.truncation, tuple(prepared.labels))


def _n_tokens(kind: str, el: Mapping) -> int:
    if kind == "preference":
        return max(len(el["chosen"]["tokens"]), len(el["rejected"]["tokens"]))
    return len(el["tokens"])


def _has_targets(kind: str, el: Mapping) -> bool:
    if kind == "classification":
        return True
    if kind == "preference":
        return bool(np.any(el["chosen"]["loss_mask"]) and np.any(el["rejected"]["loss_mask"]))
    return bool(np.any(el["loss_mask"]))


# --------------------------------------------------------------------------------------------
# Prepared data
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
    """The outcome of `prepare`: the kind of examples, per-split random-access views of the
    canonical (cleaned) examples, the class list (classification), the options and the report."""

    kind: str
    splits: dict[str, Any]
    options: DataOptions
    labels: tuple = ()
    split_labels: dict = dataclasses.field(default_factory=dict)  # split -> labels per example
    report: Any = None
    report_text: str = ""
    fingerprint: str = ""

    @classmethod
    def from_examples(cls, splits: Mapping[str, Sequence[Mapping]], kind: str, *,
                      labels: Sequence[str] = (), **options: Any) -> "Prepared":
        """From canonical examples in memory (`{"train": [...], "validation": [...]}`)."""
        if kind not in KINDS:
            raise DataError(f"kind={kind!r}; use one of {list(KINDS)}")
        opts = DataOptions(sources=(), **options)
        split_labels = {}
        if kind in ("classification", "unpaired"):
            split_labels = {k: [str(e["label"]) for e in v] for k, v in splits.items()}
            if kind == "classification" and not labels:
                labels = sorted({x for v in split_labels.values() for x in v})
        return cls(kind, {k: ListView(v) for k, v in splits.items()}, opts, tuple(labels),
                   split_labels)

    def split(self, name: str) -> Any:
        if name not in self.splits:
            raise DataError(f"no split {name!r}; the data has {sorted(self.splits)} (set "
                            "data.splits.ratios to (train, validation[, test]) fractions)")
        return self.splits[name]

