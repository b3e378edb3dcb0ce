"""The loader: a Grain pipeline over a prepared split (shard, shuffle, encode, pack, batch;
exact resume), and `eval_batches` (every example once). See `ftjax.data.pipeline`."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from ftjax.data import packing as packing_lib
from ftjax.data.errors import DataError

from ftjax.data.options import PACKING
from ftjax.data.views import Prepared, encode_fn
from ftjax.data.resumable import Resumable


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
            row["margin"] = np.asarray([el.get("margin", 0.0)], np.float32)  # [1]: rank-2 batch
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
# The loader
# --------------------------------------------------------------------------------------------

class Loader(Resumable):
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

