"""The data pipeline: `prepare` (sources -> canonical -> clean/dedup/filter -> splits -> report)
and `make_loader` (a Grain loader: shuffle, shard, tokenize, pack, batch; exact resume).

    prepared = prepare(cfg.data, tok, workdir, seq_len=cfg.train.seq_len)
    train = make_loader(prepared, "train", tok, batch_size, seq_len, seed,
                        process_index=jax.process_index(), process_count=jax.process_count())
    evals = eval_batches(prepared, "validation", tok, batch_size, seq_len, ...)

`prepare` reads every record once: `formats.to_canonical`, `clean.Cleaner` (unicode, PII,
exact and MinHash near-duplicates, character lengths), tokenization (token lengths,
truncations, token-length filter, examples left with nothing to train), then splits each
source (ratio, stratified by label, or K-fold), and on the train split mixes sources by weight
and over/undersamples labels. Every drop is counted in the `DataReport`, which is printed and
saved. The kept (source, record) references of every split are cached in the workdir under a
fingerprint of the sources and options, so a resumed run reuses exactly the same splits.

The loader is a Grain pipeline over those references:

    MapDataset.source(split view)[process_index::process_count]   per-host shard (disjoint)
      .shuffle(seed).repeat()          a fresh deterministic permutation every epoch
      .map(encode)                     record -> canonical -> cleaned -> tokens (+ loss mask)
      .to_iter_dataset(ReadOptions)    reader threads
      .mp_prefetch(num_workers)        optional worker processes (order-preserving)
      -> pack                          streaming packing over windows of `pack_window` docs
      .batch(batch_size / process_count)

Packing runs after the workers, in order, so the batches do not depend on `num_workers`.
`get_state()` is JSON (Grain's iterator state plus the packing window position) and
`set_state()` restores it exactly: the next batch is the one an uninterrupted run would see.

Batch layouts (numpy, per process `[B/P, ...]`):
  sft / text      inputs targets loss_mask segment_ids positions  [B, T] (see `packing`)
  preference      chosen_<key> and rejected_<key> for each key above; pair i in row i of both
  unpaired        the sft keys + label int32 [B] (1 desirable) + label_weight float32 [B]
  classification  inputs segment_ids positions [B, T] + label int32 [B] + label_weight [B]
Evaluation (`eval_batches`): every example once, the last batch filled with empty rows
(zero segment_ids / loss_mask / label_weight).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from ftjax.data import packing as packing_lib
from ftjax.data import templates
from ftjax.data.errors import DataError
from ftjax.data.formats import canonical_kind, detect_format, to_canonical

__all__ = ["KINDS", "PACKING", "DataOptions", "Prepared", "Loader", "prepare", "make_loader",
           "eval_batches", "encode_fn", "parse_field_map"]

KINDS = ("sft", "text", "preference", "unpaired", "classification")
PACKING = ("best_fit", "first_fit", "none")
SPLIT_NAMES = {1: ("train",), 2: ("train", "validation"), 3: ("train", "validation", "test")}
CACHE_FILE = "data_splits.npz"
CACHE_META = "data_splits.json"


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

def parse_field_map(value: Any, where: str = "data.field_map") -> dict[str, str]:
    """A field map from a dict or a "canonical=field,canonical=field" string ("" = none)."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        d = value.to_dict() if hasattr(value, "to_dict") else dict(value)
        return {str(k): str(v) for k, v in d.items()}
    if isinstance(value, str):
        out = {}
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, field = part.partition("=")
            if not sep or not key.strip() or not field.strip():
                raise DataError(f"{where}={value!r}: write it as 'canonical=field' pairs joined "
                                "by commas, e.g. 'instruction=question,output=answer'")
            out[key.strip()] = field.strip()
        return out
    raise DataError(f"{where} must be a dict or a 'canonical=field,...' string, got "
                    f"{type(value).__name__}")


def _truncation(value: Any) -> Any:
    """"right" / "left" / "error", or "prompt=left,completion=right" -> the per-field dict."""
    if isinstance(value, str) and "=" in value:
        return parse_field_map(value, "data.truncation")
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source of a data config: where, its format, field renames and mixture weight."""

    source: str
    format: str = "auto"
    field_map: tuple = ()           # sorted (canonical, field) pairs
    weight: Optional[float] = None  # None: no resampling (sources are concatenated)
    split: str = "train"            # the source's own split (TFDS name, slicing allowed)


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Everything `prepare` and the loaders read from a config's `data` section (see
    `configs/common.py:data_file` for the documented knobs)."""

    sources: tuple[SourceSpec, ...]
    data_dir: str = ""
    text_unit: str = "line"
    on_error: str = "raise"
    template: Optional[str] = None
    max_len: int = 0
    truncation: Any = "right"
    packing: str = "best_fit"
    pack_window: int = 1024
    pack_overflow: str = "truncate"
    clean: Any = None
    ratios: tuple = (0.8, 0.2)
    stratify: bool = True
    kfold: int = 0
    fold: int = 0
    split_seed: int = 0
    labels: tuple = ()
    oversample: Any = ""
    undersample: Any = ""
    mixture_examples: int = 0
    stratify_batches: bool = False
    num_workers: int = 0
    read_threads: int = 2
    min_train_examples: int = 1000
    seed: int = 0

    @classmethod
    def from_config(cls, d: Any) -> "DataOptions":
        get = (lambda k, default=None: d.get(k, default)) if hasattr(d, "get") else \
            (lambda k, default=None: getattr(d, k, default))
        entries = list(get("sources", ()) or ())
        single = get("source", "") or ""
        if single and entries:
            raise DataError("set data.source (one source) or data.sources (a list with "
                            "weights), not both")
        if single:
            entries = [{"source": single}]
        if not entries:
            raise DataError("no data source: set data.source='jsonl:PATH' (or csv:, parquet:, "
                            "json:, text:, tfds:NAME) or data.sources=[{'source': ..., "
                            "'weight': ...}, ...]")
        fmt = get("format", "auto") or "auto"
        fmap = parse_field_map(get("field_map", ""))
        specs = []
        for i, e in enumerate(entries):
            if isinstance(e, str):
                e = {"source": e}
            e = dict(e.to_dict() if hasattr(e, "to_dict") else e)
            unknown = set(e) - {"source", "format", "field_map", "weight", "split"}
            if unknown or "source" not in e:
                raise DataError(f"data.sources[{i}]={e!r}: each entry is a dict with 'source' "
                                "and optional 'format', 'field_map', 'weight', 'split'"
                                + (f" (unknown keys {sorted(unknown)})" if unknown else ""))
            fm = parse_field_map(e.get("field_map", None), f"data.sources[{i}].field_map") \
                if e.get("field_map") else fmap
            w = e.get("weight")
            if w is not None and (not isinstance(w, (int, float)) or w < 0):
                raise DataError(f"data.sources[{i}].weight={w!r} must be a number >= 0")
            specs.append(SourceSpec(str(e["source"]), str(e.get("format") or fmt),
                                    tuple(sorted(fm.items())),
                                    None if w is None else float(w),
                                    str(e.get("split") or get("source_split", "train"))))
        if any(s.weight is not None for s in specs) and any(s.weight is None for s in specs):
            raise DataError("data.sources: give every source a weight or none (weights are "
                            "the mixture proportions of the train split)")
        splits = get("splits", None)
        sget = (lambda k, default: splits.get(k, default)) if splits is not None else \
            (lambda k, default: default)
        imb = get("imbalance", None)
        iget = (lambda k, default: imb.get(k, default)) if imb is not None else \
            (lambda k, default: default)
        pack = get("packing", "best_fit")
        pack = "none" if pack in (False, None, "", "none") else ("best_fit" if pack is True
                                                                 else pack)
        if pack not in PACKING:
            raise DataError(f"data.packing={pack!r}; use one of {list(PACKING)}")
        labels = get("labels", ()) or ()
        if isinstance(labels, str):
            labels = tuple(s.strip() for s in labels.split(",") if s.strip())
        return cls(
            sources=tuple(specs), data_dir=str(get("data_dir", "") or ""),
            text_unit=get("text_unit", "line"), on_error=get("on_error", "raise"),
            template=(get("template", "") or None), max_len=int(get("max_len", 0) or 0),
            truncation=_truncation(get("truncation", "right")), packing=pack,
            pack_window=int(get("pack_window", 1024)),
            pack_overflow=get("pack_overflow", "truncate"), clean=get("clean", None),
            ratios=tuple(float(r) for r in sget("ratios", (0.8, 0.2))),
            stratify=bool(sget("stratify", True)), kfold=int(sget("kfold", 0)),
            fold=int(sget("fold", 0)), split_seed=int(sget("seed", 0)),
            labels=tuple(str(x) for x in labels),
            oversample=_plain(iget("oversample", "")), undersample=_plain(iget("undersample", "")),
            mixture_examples=int(iget("mixture_examples", 0)),
            stratify_batches=bool(iget("stratify_batches", False)),
            num_workers=int(get("num_workers", 0)), read_threads=int(get("read_threads", 2)),
            min_train_examples=int(get("min_train_examples", 1000)),
            seed=int(get("seed", 0)))


def _plain(x: Any) -> Any:
    return x.to_dict() if hasattr(x, "to_dict") else x


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
            return templates.tokenize_preference(ex, self.tok, **kw)
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
# Rows: one element -> one row (unpacked kinds), or streaming packing (sft / text)
# --------------------------------------------------------------------------------------------

def _one_row(doc: Mapping, seq_len: int, overflow: str, pad_id: int) -> dict:
    out = packing_lib.pad_rows([doc], seq_len, overflow=overflow, pad_id=pad_id)
    if not out.bins:
        raise DataError(f"an example of {len(doc['tokens'])} tokens cannot fill a row "
                        f"(seq_len={seq_len}, overflow={overflow!r}); prepare drops such "
                        "examples, so this input bypassed it")
    return {k: v[0] for k, v in out.rows.items()}


@dataclasses.dataclass(frozen=True)
class _RowFn:
    """Element -> one row of the batch layout of `kind` (unpacked)."""

    kind: str
    seq_len: int
    overflow: str
    pad_id: int

    def __call__(self, el: Mapping) -> dict:
        if self.kind == "preference":
            row = {}
            for half in ("chosen", "rejected"):
                for k, v in _one_row(el[half], self.seq_len, self.overflow, self.pad_id).items():
                    row[f"{half}_{k}"] = v
            return row
        if self.kind == "classification":
            return _classification_row(el, self.seq_len, self.overflow, self.pad_id)
        row = _one_row(el, self.seq_len, self.overflow, self.pad_id)
        if self.kind == "unpaired":
            row["label"] = np.int32(bool(el["label"]))
            row["label_weight"] = np.float32(1.0)
        return row


def _classification_row(el: Mapping, seq_len: int, overflow: str, pad_id: int) -> dict:
    tokens = np.asarray(el["tokens"], np.int32)
    if len(tokens) > seq_len:
        if overflow != "truncate":
            raise DataError(f"classification example of {len(tokens)} tokens exceeds "
                            f"seq_len={seq_len}; set data.max_len <= seq_len")
        tokens = tokens[:seq_len]
    n = len(tokens)
    inputs = np.full(seq_len, pad_id, np.int32)
    inputs[:n] = tokens
    seg = np.zeros(seq_len, np.int32)
    seg[:n] = 1
    pos = np.zeros(seq_len, np.int32)
    pos[:n] = np.arange(n, dtype=np.int32)
    return {"inputs": inputs, "segment_ids": seg, "positions": pos,
            "label": np.int32(el["label"]), "label_weight": np.float32(1.0)}


def _empty_like(row: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """n all-padding rows with the keys/shapes/dtypes of `row` (nothing counted anywhere)."""
    return {k: np.zeros((n,) + np.shape(v), np.asarray(v).dtype) for k, v in row.items()}


def _grain():
    import grain
    return grain


def _pack_dataset_class():
    """A Grain IterDataset that packs a stream of documents window by window (lazy: Grain is
    imported only when a loader is built)."""
    grain = _grain()

    class PackIterator(grain.DatasetIterator):
        def __init__(self, parent, seq_len, method, window, overflow, pad_id, stats):
            super().__init__(parent)
            self._cfg = (seq_len, method, window, overflow, pad_id)
            self._pack_stats = stats
            self._rows: Optional[dict] = None
            self._n = self._next = self._skip = 0
            self._start: Any = None

        def _load(self) -> None:
            seq_len, method, window, overflow, pad_id = self._cfg
            self._start = self._parent.get_state()
            docs = []
            for _ in range(window):
                try:
                    docs.append(next(self._parent))
                except StopIteration:
                    break
            if not docs:
                self._rows = None
                raise StopIteration
            out = packing_lib.pack(docs, seq_len, method, overflow=overflow, pad_id=pad_id)
            if self._skip == 0 and self._pack_stats is not None:
                self._pack_stats.add(out.stats)  # counted once, not again when a restore re-packs
            self._rows, self._n = out.rows, out.stats.rows
            self._next, self._skip = min(self._skip, self._n), 0

        def __next__(self) -> dict:
            while self._rows is None or self._next >= self._n:
                self._load()
            row = {k: v[self._next] for k, v in self._rows.items()}
            self._next += 1
            return row

        def get_state(self) -> dict:
            if self._rows is None or self._next >= self._n:  # at a window boundary
                return {"parent": self._parent.get_state(), "rows_done": self._skip}
            return {"parent": self._start, "rows_done": self._next}

        def set_state(self, state: dict) -> None:
            self._parent.set_state(state["parent"])
            self._rows, self._n, self._next = None, 0, 0
            self._skip = int(state["rows_done"])

    class PackIterDataset(grain.IterDataset):
        def __init__(self, parent, seq_len, method, window, overflow, pad_id, stats=None):
            super().__init__(parent)
            self._args = (seq_len, method, window, overflow, pad_id, stats)

        def __iter__(self):
            return PackIterator(self._parent.__iter__(), *self._args)

        def __str__(self) -> str:
            return f"PackIterDataset(seq_len={self._args[0]}, method={self._args[1]})"

    return PackIterDataset


class _StratifiedOrder:
    """Epoch-wise order of a split in which every global batch is stratified by label
    (`imbalance.stratified_batches`, reseeded per epoch); process p reads its rows of each."""

    def __init__(self, labels: Sequence[Any], batch_size: int, seed: int, process_index: int,
                 process_count: int) -> None:
        self.labels = list(labels)
        self.batch_size, self.seed = batch_size, seed
        self.p, self.local = process_index, batch_size // process_count
        self._epoch, self._order = -1, None
        self.per_epoch = (len(self.labels) // batch_size) * self.local

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            from ftjax.data.imbalance import stratified_batches
            b = stratified_batches(self.labels, self.batch_size, self.seed + epoch)
            self._order = np.asarray(b)[:, self.p * self.local:(self.p + 1) * self.local]
            self._order = self._order.reshape(-1)
            self._epoch = epoch
        return self._order

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _epoch=-1, _order=None)


class _StratifiedSource:
    """A Grain source reading example `order(epoch)[k]` of the split at global index i."""

    def __init__(self, view: Any, order: _StratifiedOrder, num_epochs: Optional[int]) -> None:
        self.view, self.order, self.num_epochs = view, order, num_epochs

    def __len__(self) -> int:
        per = self.order.per_epoch
        return per * self.num_epochs if self.num_epochs else per * (1 << 40)

    def __getitem__(self, i: int):
        epoch, k = divmod(int(i), self.order.per_epoch)
        return self.view[int(self.order.order(epoch)[k])]


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


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------

class Loader:
    """Iterator of this process's batches, with JSON `get_state()` / `set_state()`.

    The Grain iterator (and any worker processes) starts on first use; `close()` stops them.
    `pack_stats` totals what packing did so far (documents, rows, efficiency).
    """

    def __init__(self, dataset: Any, meta: dict, pack_stats: packing_lib.PackStats) -> None:
        self._dataset = dataset
        self.meta = meta
        self.pack_stats = pack_stats
        self._it = None

    def _iterator(self):
        if self._it is None:
            self._it = iter(self._dataset)
        return self._it

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._iterator())

    def get_state(self) -> dict:
        """JSON-serialisable position; the other fields guard against a changed setup."""
        state = self._iterator().get_state()
        encoded = json.loads(json.dumps(state))
        if encoded != state:
            raise DataError(f"Grain iterator state {state!r} does not survive JSON; report this "
                            "(the pipeline relies on JSON checkpoints of the data position)")
        return dict(self.meta, grain=encoded)

    def set_state(self, state: Mapping) -> None:
        """Resume so that the next batch is the one an uninterrupted run would yield."""
        if "grain" not in state:
            raise DataError(f"loader state has no 'grain' position (keys {sorted(state)}); it "
                            "was not written by pipeline.Loader (synthetic-suite checkpoint?). "
                            "Resume with the data config the run started with.")
        for key, value in self.meta.items():
            saved = state.get(key)
            if saved is not None and saved != value:
                raise DataError(
                    f"loader state was saved with {key}={saved!r} but this loader has "
                    f"{key}={value!r}; resume with the same data, batch size, seq_len, "
                    "process count and num_workers (or start a new workdir)")
        self._iterator().set_state(state["grain"])

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def _check_batch(n: int, split: str, batch_size: int, process_index: int, process_count: int,
                 need_full_batch: bool) -> None:
    if batch_size <= 0 or process_count <= 0:
        raise DataError(f"batch_size ({batch_size}) and process_count ({process_count}) must be "
                        "positive")
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} is not divisible by process_count "
                        f"{process_count}; use a multiple of {process_count}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if n == 0:
        raise DataError(f"the {split!r} split is empty: nothing to load. Check the data report "
                        "(everything dropped?) and data.splits.ratios")
    if need_full_batch and n < batch_size:
        raise DataError(f"the {split!r} split has {n} examples, fewer than one batch of "
                        f"{batch_size}; add data, lower train.batch_size, or give the split a "
                        "larger share (data.splits.ratios)")


def make_loader(prepared: Prepared, split: str, tok: Any, batch_size: int, seq_len: int,
                seed: int, process_index: int = 0, process_count: int = 1, *,
                packing: Optional[str] = None, num_workers: Optional[int] = None,
                shuffle: bool = True, num_epochs: Optional[int] = None,
                pack_window: Optional[int] = None, read_threads: Optional[int] = None) -> Loader:
    """A resumable Grain loader of `split` yielding this process's `batch_size /
    process_count` rows per step (layout by `prepared.kind`, see the module docstring).

    Process p of P reads the examples p, p+P, ... of the split (disjoint shards covering all);
    each epoch is a fresh permutation keyed by (seed, epoch). `num_epochs=None` repeats forever.
    """
    grain = _grain()
    opts = prepared.options
    view = prepared.split(split)
    n = len(view)
    _check_batch(n, split, batch_size, process_index, process_count, need_full_batch=True)
    packing = opts.packing if packing is None else packing
    if packing not in PACKING:
        raise DataError(f"packing={packing!r}; use one of {list(PACKING)}")
    if prepared.kind not in ("sft", "text"):
        packing = "none"  # pairs and classes keep one example per row
    workers = opts.num_workers if num_workers is None else int(num_workers)
    window = int(pack_window or opts.pack_window)
    if window <= 0:
        raise DataError(f"data.pack_window={window} must be positive")
    if not 0 <= int(seed) < 2 ** 32:
        raise DataError(f"seed {seed} must be in [0, 2**32)")
    local = batch_size // process_count
    pad_id = int(getattr(tok, "pad_id", 0) or 0)
    encode = encode_fn(prepared, tok, seq_len)

    if opts.stratify_batches and prepared.kind == "classification" and shuffle:
        order = _StratifiedOrder(prepared.split_labels[split], batch_size, int(seed),
                                 process_index, process_count)
        ds = grain.MapDataset.source(_StratifiedSource(view, order, num_epochs))
    else:
        ds = grain.MapDataset.source(view)[process_index::process_count]
        if shuffle:
            ds = ds.shuffle(seed=int(seed))
        ds = ds.repeat(num_epochs)
    ds = ds.map(encode)
    if packing == "none":
        ds = ds.map(_RowFn(prepared.kind, seq_len, opts.pack_overflow, pad_id))
    threads = opts.read_threads if read_threads is None else int(read_threads)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 0),
                                              prefetch_buffer_size=max(64, 4 * local)))
    if workers > 0:
        from absl import flags  # Grain's worker code reads absl flags (defaults are fine)
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    stats = packing_lib.PackStats()
    if packing != "none":
        it = _pack_dataset_class()(it, seq_len, packing, window, opts.pack_overflow, pad_id,
                                   stats)
    it = it.batch(local, drop_remainder=True)
    meta = {"split": split, "num_examples": n, "seed": int(seed), "batch_size": batch_size,
            "seq_len": seq_len, "packing": packing, "process_count": process_count,
            "process_index": process_index, "shuffle": bool(shuffle),
            "num_workers": workers}  # Grain's state layout differs with worker processes
    return Loader(it, meta, stats)


def eval_batches(prepared: Prepared, split: str, tok: Any, batch_size: int, seq_len: int,
                 process_index: int = 0, process_count: int = 1, *,
                 packing: Optional[str] = None, max_examples: int = 0) -> list[dict]:
    """Every example of `split` once (the first `max_examples` if > 0), as a fixed list of
    this process's batches; the last global batch is filled with empty rows. Every process
    builds the same global batches, so all of them run the same number of eval steps."""
    view = prepared.split(split)
    n = len(view) if max_examples <= 0 else min(len(view), max_examples)
    _check_batch(n, split, batch_size, process_index, process_count, need_full_batch=False)
    opts = prepared.options
    packing = opts.packing if packing is None else packing
    if prepared.kind not in ("sft", "text"):
        packing = "none"
    encode = encode_fn(prepared, tok, seq_len)
    pad_id = int(getattr(tok, "pad_id", 0) or 0)
    elements = [encode(view[i]) for i in range(n)]
    if packing != "none":
        rows = packing_lib.pack(elements, seq_len, packing, overflow=opts.pack_overflow,
                                pad_id=pad_id).rows
    else:
        row_fn = _RowFn(prepared.kind, seq_len, opts.pack_overflow, pad_id)
        per = [row_fn(e) for e in elements]
        rows = {k: np.stack([r[k] for r in per]) for k in per[0]}
    total = len(next(iter(rows.values())))
    n_batches = -(-total // batch_size)
    missing = n_batches * batch_size - total
    if missing:
        pad = _empty_like({k: v[0] for k, v in rows.items()}, missing)
        rows = {k: np.concatenate([v, pad[k]]) for k, v in rows.items()}
    local = batch_size // process_count
    out = []
    for b in range(n_batches):
        lo = b * batch_size + process_index * local
        out.append({k: v[lo:lo + local] for k, v in rows.items()})
    return out


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------

def _tokenizer_id(tok: Any) -> str:
    parts = [type(tok).__name__, str(getattr(tok, "vocab_size", ""))]
    for attr in ("bos_id", "eos_id", "pad_id"):
        parts.append(str(getattr(tok, attr, "")))
    if hasattr(tok, "backend") and hasattr(tok.backend, "to_str"):
        parts.append(hashlib.sha256(tok.backend.to_str().encode()).hexdigest()[:16])
    return "/".join(parts)


def _fingerprint(opts: DataOptions, sources: Sequence[Any], tok: Any, max_len: int) -> str:
    """Hash of everything that decides the kept examples and the splits."""
    d = dataclasses.asdict(opts)
    for k in ("num_workers", "read_threads", "pack_window", "packing", "pack_overflow",
              "stratify_batches", "data_dir", "min_train_examples"):
        d.pop(k, None)
    d["clean"] = _plain(d["clean"])
    ids = [getattr(s, "cache_dir", None) or getattr(s, "spec", "") for s in sources]
    blob = json.dumps({"options": d, "sources": ids, "tok": _tokenizer_id(tok),
                       "max_len": max_len, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _open(opts: DataOptions, data_dir: str) -> tuple[list, list[str]]:
    from ftjax.data.sources import open_source
    sources, formats = [], []
    for spec in opts.sources:
        src = open_source(spec.source, data_dir=data_dir, split=spec.split,
                          field_map=dict(spec.field_map) or None, text_unit=opts.text_unit,
                          on_error=opts.on_error)
        fmt = spec.format
        if fmt == "auto":
            if len(src) == 0:
                raise DataError(f"source {spec.source!r} has no records; cannot detect its "
                                "format (and there is nothing to train on)")
            fmt = detect_format(src[0], dict(spec.field_map))
        sources.append(src)
        formats.append(fmt)
    return sources, formats


def _split_source(n: int, labels: Optional[list], opts: DataOptions, salt: int) -> list:
    from ftjax.data import splits as split_lib
    seed = opts.split_seed + salt
    if opts.kfold:
        use = labels if (labels is not None and opts.stratify) else n
        return list(split_lib.kfold(use, opts.kfold, opts.fold, seed,
                                    stratified=labels is not None and opts.stratify))
    if len(opts.ratios) == 1:
        return [np.arange(n)]
    if labels is not None and opts.stratify:
        return split_lib.stratified_split(labels, opts.ratios, seed)
    return split_lib.ratio_split(n, opts.ratios, seed)


def prepare(dcfg: Any, tok: Any, workdir: str, *, seq_len: Optional[int] = None,
            verbose: bool = True) -> Prepared:
    """Sources -> canonical -> cleaned/deduplicated/filtered -> tokenized (lengths) -> splits
    -> mixture/resampling of train; prints and saves the report; caches the splits."""
    from ftjax.data.clean import CleanConfig, Cleaner
    from ftjax.data.report import DataReport

    opts = DataOptions.from_config(dcfg)
    if opts.max_len <= 0 and seq_len is None:
        raise DataError("data.max_len is 0 (= follow train.seq_len) but no seq_len was given "
                        "to prepare()")
    data_dir = opts.data_dir or os.path.join(workdir, "data")
    sources, formats = _open(opts, data_dir)
    kinds = {canonical_kind(f) for f in formats}
    if len(kinds) != 1:
        raise DataError(f"data sources have different kinds of examples {sorted(kinds)} "
                        f"(formats {formats}); a run trains on one kind")
    kind = kinds.pop()
    if kind not in KINDS:
        raise DataError(f"format kind {kind!r} is not supported by the pipeline")
    clean_cfg = CleanConfig.from_config(opts.clean)
    max_len = opts.max_len or (seq_len if kind == "classification" else seq_len + 1)
    fingerprint = _fingerprint(opts, sources, tok, max_len)
    names = [spec.source for spec in opts.sources]
    cached = _load_cache(workdir, fingerprint)
    if cached is not None:
        refs_by_split, labels, split_labels, text = cached
        prepared = Prepared(kind, {}, opts, tuple(labels), split_labels, None, text, fingerprint)
        prepared.splits = {k: ExampleView(sources, formats,
                                          [dict(s.field_map) for s in opts.sources],
                                          clean_cfg, v) for k, v in refs_by_split.items()}
        if verbose:
            print(f"data: reusing the prepared splits in {os.path.join(workdir, CACHE_META)}")
            print(text)
        return prepared

    report = DataReport(min_train_examples=opts.min_train_examples)
    cleaner = Cleaner(clean_cfg)
    lengths_filter = clean_cfg.length_filter()
    encode = _Encoder(kind, tok, opts.template, max_len, opts.truncation,
                      tuple(opts.labels))
    per_source = []  # (record ids, token lengths, labels) of the kept examples of each source
    no_targets = [0] * len(sources)
    for s, (src, fmt, spec) in enumerate(zip(sources, formats, opts.sources)):
        name, split = names[s], spec.split
        fm = dict(spec.field_map)
        if getattr(src, "skipped", None):
            report.seen(name, split, len(src.skipped))
            report.dropped(name, split, "malformed", len(src.skipped))
        keep, lens, labs = [], [], []
        counters: dict = {}
        for r in range(len(src)):
            report.seen(name, split)
            record = src[r]
            try:
                ex = to_canonical(record, fmt, fm, "")
            except DataError:
                if opts.on_error != "skip":  # raise again, naming the file and line
                    to_canonical(record, fmt, fm, src.origin_str(r))
                report.dropped(name, split, "bad_record")
                continue
            cleaned, reason = cleaner.process(ex)
            if reason:
                report.dropped(name, split, reason)
                continue
            try:
                el = encode(cleaned, counters)
            except DataError as e:
                raise DataError(f"{src.origin_str(r)}: {e}") from None
            except ValueError as e:  # e.g. a character the tokenizer cannot encode
                raise DataError(f"{src.origin_str(r)}: cannot tokenize this example: {e}") \
                    from None
            n_tok = _n_tokens(kind, el)
            reason = lengths_filter.check_tokens(n_tok)
            if reason is None and not _has_targets(kind, el):
                reason = "no_targets"
                no_targets[s] += 1
            if reason:
                report.dropped(name, split, reason)
                continue
            report.kept(name, split)
            keep.append(r)
            lens.append(n_tok)
            labs.append(str(cleaned["label"]) if kind in ("classification", "unpaired") else None)
        report.add_counters(name, split, counters)
        report.add_pii(name, split, dict(cleaner.pii_counts))
        cleaner.pii_counts.clear()
        per_source.append((np.asarray(keep, np.int64), np.asarray(lens, np.int64), labs))

    labeled = kind in ("classification", "unpaired")
    class_list = list(opts.labels)
    if kind == "classification":
        seen_labels = sorted({x for _, _, labs in per_source for x in labs})
        if class_list:
            unknown = sorted(set(seen_labels) - set(class_list))
            if unknown:
                raise DataError(f"labels {unknown} occur in the data but not in data.labels="
                                f"{class_list}; add them or fix the records")
        else:
            class_list = seen_labels

    # Split every source the same way, then mix / resample the train split.
    split_names = SPLIT_NAMES[2] if opts.kfold else SPLIT_NAMES.get(len(opts.ratios))
    if split_names is None:
        raise DataError(f"data.splits.ratios={opts.ratios}: give 1, 2 or 3 fractions "
                        "(train[, validation[, test]])")
    parts: dict[str, list[tuple[int, np.ndarray]]] = {k: [] for k in split_names}
    for s, (keep, _, labs) in enumerate(per_source):
        if len(keep) == 0:
            hint = ""
            if no_targets[s]:
                hint = (f" ({no_targets[s]} left with nothing to train: truncation to "
                        f"max_len={max_len} tokens cut their completions; raise "
                        "train.seq_len or data.max_len, use a shorter template, or cut the "
                        "prompt first with data.truncation='prompt=left,completion=right')")
            raise DataError(f"source {names[s]!r} kept no examples{hint}. The data report:"
                            f"\n{report.to_text()}")
        idx = _split_source(len(keep), labs if labeled else None, opts, salt=s)
        for name, part in zip(split_names, idx):
            parts[name].append((s, np.asarray(part, np.int64)))

    refs_by_split: dict[str, np.ndarray] = {}
    split_labels: dict[str, list] = {}
    for name, chunks in parts.items():
        refs = [np.stack([np.full(len(p), s, np.int64), per_source[s][0][p]], 1)
                for s, p in chunks]
        labs = [per_source[s][2][i] for s, p in chunks for i in p]
        lens = np.concatenate([per_source[s][1][p] for s, p in chunks])
        if name == "train":
            refs, labs, lens = _train_resample(refs, labs, lens, chunks, per_source, opts,
                                               labeled, report)
        else:
            refs = np.concatenate(refs) if refs else np.zeros((0, 2), np.int64)
        refs_by_split[name] = refs
        split_labels[name] = labs if labeled else []
        report.set_split_size(name, len(refs))
        report.add_lengths(name, lens.tolist())
        if labeled:
            report.add_labels(name, labs)
    report.note(f"kind {kind}; formats {dict(zip(names, formats))}; splits "
                + (f"{opts.kfold}-fold (fold {opts.fold})" if opts.kfold
                   else f"ratios {opts.ratios}")
                + (" stratified by label" if labeled and opts.stratify else "")
                + f", seed {opts.split_seed}")
    if kind in ("sft", "text") and opts.packing != "none" and seq_len:
        lens = [int(x) for s, p in parts["train"] for x in per_source[s][1][p]]
        report.note(_packing_note(lens, seq_len, opts))
    report.check()
    text = report.to_text()
    if verbose:
        report.print()
    _save_cache(workdir, fingerprint, refs_by_split, class_list, split_labels, report)
    views = {k: ExampleView(sources, formats, [dict(s.field_map) for s in opts.sources],
                            clean_cfg, v) for k, v in refs_by_split.items()}
    return Prepared(kind, views, opts, tuple(class_list), split_labels, report, text,
                    fingerprint)


def _train_resample(refs, labs, lens, chunks, per_source, opts: DataOptions, labeled: bool,
                    report) -> tuple[np.ndarray, list, np.ndarray]:
    """Mixture of sources by weight, then over/undersampling by label (train split only)."""
    from ftjax.data import imbalance
    if any(spec.weight is not None for spec in opts.sources) and len(chunks) > 1:
        sizes = [len(p) for _, p in chunks]
        weights = [opts.sources[s].weight for s, _ in chunks]
        total = opts.mixture_examples or sum(sizes)
        src_ids, ex_ids = imbalance.mixture_indices(sizes, weights, opts.seed, total)
        refs = np.stack([refs[k][i] for k, i in zip(src_ids, ex_ids)]) if total else \
            np.zeros((0, 2), np.int64)
        labs = [per_source[chunks[k][0]][2][chunks[k][1][i]] for k, i in zip(src_ids, ex_ids)]
        lens = np.asarray([per_source[chunks[k][0]][1][chunks[k][1][i]]
                           for k, i in zip(src_ids, ex_ids)], np.int64)
        report.note("train mixture: " + ", ".join(
            f"{opts.sources[s].source} weight {opts.sources[s].weight:g} -> "
            f"{int(np.sum(src_ids == k))} draws of {sizes[k]}"
            for k, (s, _) in enumerate(chunks)))
    else:
        refs = np.concatenate(refs) if refs else np.zeros((0, 2), np.int64)
    for mode in ("oversample", "undersample"):
        target = getattr(opts, mode)
        if not target:
            continue
        if not labeled:
            raise DataError(f"data.imbalance.{mode}={target!r} needs labels (classification or "
                            "unpaired data)")
        idx = getattr(imbalance, mode)(labs, target, opts.seed)
        report.note(f"train {mode} to {target}: {len(labs)} -> {len(idx)} examples")
        refs, lens = refs[idx], lens[idx]
        labs = [labs[i] for i in idx]
    return refs, labs, lens


def _packing_note(lens: Sequence[int], seq_len: int, opts: DataOptions) -> str:
    """Expected packing of the train split (lengths only, window by window as the loader)."""
    slots = [min(max(n - 1, 0), seq_len) for n in lens]
    slots = [s for s in slots if s > 0]
    rows = 0
    for a in range(0, len(slots), opts.pack_window):
        rows += len(packing_lib.assign_bins(slots[a:a + opts.pack_window], seq_len,
                                            opts.packing))
    eff = sum(slots) / (rows * seq_len) if rows else 0.0
    return (f"packing {opts.packing} (window {opts.pack_window}): {len(slots)} train examples "
            f"-> {rows} rows of {seq_len} per epoch, {eff:.1%} of row slots filled "
            f"(unpacked: {sum(slots) / (max(len(slots), 1) * seq_len):.1%})")


def _save_cache(workdir: str, fingerprint: str, refs: Mapping[str, np.ndarray], labels: list,
                split_labels: Mapping[str, list], report) -> None:
    if not _is_primary():
        return
    os.makedirs(workdir, exist_ok=True)
    report.save(workdir)
    tmp = os.path.join(workdir, CACHE_FILE + ".tmp.npz")
    np.savez(tmp, **{f"refs_{k}": v for k, v in refs.items()})
    os.replace(tmp, os.path.join(workdir, CACHE_FILE))
    meta = {"fingerprint": fingerprint, "splits": sorted(refs), "labels": labels,
            "split_labels": split_labels, "report_text": report.to_text()}
    tmp = os.path.join(workdir, CACHE_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(workdir, CACHE_META))


def _load_cache(workdir: str, fingerprint: str):
    meta_path = os.path.join(workdir, CACHE_META)
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
        print(f"data: the cached splits in {meta_path} were made from other data or options; "
              "preparing again")
        return None
    with np.load(os.path.join(workdir, CACHE_FILE), allow_pickle=False) as z:
        refs = {k: z[f"refs_{k}"] for k in meta["splits"]}
    return refs, meta["labels"], meta["split_labels"], meta["report_text"]


def _is_primary() -> bool:
    import sys
    if "jax" not in sys.modules:
        return True
    import jax
    return jax.process_index() == 0
