"""Packing tokenized documents into fixed-length rows of the batch layout (padding-free batches).

A document is `{"tokens": int[n], "loss_mask": float[n]}` where `loss_mask[i] = 1` when
`tokens[i]` is a trained target (the output of `templates.tokenize_sft`). It occupies `n - 1`
slots of a row: inputs `tokens[:-1]`, targets `tokens[1:]`, loss mask `loss_mask[1:]`, so no
target ever belongs to another document. In a row of `seq_len` slots:

    inputs       int32   document tokens[:-1] one after another, `pad_id` after the last one
    targets      int32   the matching tokens[1:] (`pad_id` on padding)
    loss_mask    float32 the matching loss_mask[1:] (0 on padding)
    segment_ids  int32   1, 2, ... per document in the row; 0 on padding
    positions    int32   0..n-2 within each document (restarting per document); 0 on padding

With `segment_ids` the model attends only within a document, and with `positions` restarting
each document sees the same RoPE phases as when it is alone, so the packed loss equals the sum
of the per-document losses. `pad_rows` is the unpacked layout (one document per row).

Bin assignment: first-fit (the first row with room) or best-fit (the row with the least room
that still fits), optionally over documents sorted longest first ("decreasing"), as in
best-fit-decreasing. A document longer than a row (`n - 1 > seq_len`) is truncated to its first
`seq_len + 1` tokens, dropped, or refused, per `overflow`; every case is counted in the stats.
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
from typing import Iterable, Mapping, Sequence

import numpy as np

from ftjax.data.errors import DataError

__all__ = ["METHODS", "OVERFLOW", "PackStats", "Packed", "assign_bins", "fit_document",
           "pack", "pad_rows", "rows_from_bins"]

METHODS = ("first_fit", "best_fit")
OVERFLOW = ("truncate", "drop", "error")


@dataclasses.dataclass
class PackStats:
    """What packing did: documents placed, rows made, filled slots, and documents altered."""

    documents: int = 0        # documents placed in rows
    rows: int = 0
    tokens: int = 0           # filled (input) slots over all rows
    capacity: int = 0         # rows * seq_len
    truncated: int = 0        # documents cut to fit a row (overflow="truncate")
    dropped_too_long: int = 0  # documents longer than a row, dropped (overflow="drop")
    dropped_too_short: int = 0  # documents of < 2 tokens: no (input, target) pair at all

    @property
    def efficiency(self) -> float:
        """Share of row slots holding real tokens (1.0 = no padding)."""
        return self.tokens / self.capacity if self.capacity else 0.0

    def add(self, other: "PackStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "efficiency": self.efficiency}


@dataclasses.dataclass
class Packed:
    """Rows `[R, seq_len]` of the batch layout, the document indices per row, and the stats."""

    rows: dict[str, np.ndarray]
    bins: list[list[int]]
    stats: PackStats


def _check(seq_len: int, method: str | None = None, overflow: str = "truncate") -> None:
    if int(seq_len) <= 0:
        raise DataError(f"packing: seq_len must be positive, got {seq_len}")
    if method is not None and method not in METHODS:
        raise DataError(f"packing: unknown method {method!r}; choose one of {METHODS}")
    if overflow not in OVERFLOW:
        raise DataError(f"packing: unknown overflow policy {overflow!r}; choose one of {OVERFLOW}")


def fit_document(doc: Mapping, seq_len: int, overflow: str, stats: PackStats,
                 where: str = "") -> dict | None:
    """The document as int32/float32 arrays, made to fit a row per `overflow`, or None if it
    is dropped (counted in `stats`)."""
    tokens = np.asarray(doc["tokens"], np.int32).reshape(-1)
    mask = np.asarray(doc["loss_mask"], np.float32).reshape(-1)
    if tokens.shape != mask.shape:
        raise DataError(f"packing: document{where} has {tokens.size} tokens but "
                        f"{mask.size} loss_mask values; they must have the same length")
    if tokens.size < 2:
        stats.dropped_too_short += 1
        return None
    if tokens.size - 1 > seq_len:
        if overflow == "error":
            raise DataError(
                f"packing: document{where} has {tokens.size} tokens ({tokens.size - 1} row "
                f"slots) but rows hold seq_len={seq_len}; raise seq_len, lower the template "
                "max_len, or set packing overflow to 'truncate' or 'drop'")
        if overflow == "drop":
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        tokens, mask = tokens[:seq_len + 1], mask[:seq_len + 1]
    return {"tokens": tokens, "loss_mask": mask}


class _FirstFit:
    """First row with room, in O(log rows) per document: a max-segment-tree over free space."""

    def __init__(self, capacity: int, max_bins: int) -> None:
        self.capacity = capacity
        size = 1
        while size < max(max_bins, 1):
            size *= 2
        self.size = size
        self.tree = [0] * (2 * size)  # leaves: free space of bin i (0 while not opened)
        self.n = 0

    def _set(self, i: int, free: int) -> None:
        j = i + self.size
        self.tree[j] = free
        j //= 2
        while j:
            self.tree[j] = max(self.tree[2 * j], self.tree[2 * j + 1])
            j //= 2

    def place(self, length: int) -> int:
        tree = self.tree
        if tree[1] >= length:
            j = 1
            while j < self.size:  # leftmost leaf with free >= length
                j = 2 * j if tree[2 * j] >= length else 2 * j + 1
            i = j - self.size
        else:
            i = self.n
            self.n += 1
            tree[i + self.size] = self.capacity
        self._set(i, tree[i + self.size] - length)
        return i


class _BestFit:
    """Row with the least room that still fits (lowest index among ties): sorted free sizes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sizes: list[int] = []             # sorted distinct free sizes that have open bins
        self.bins: dict[int, list[int]] = {}   # free size -> heap of bin indices
        self.n = 0

    def _push(self, free: int, i: int) -> None:
        if free <= 0:
            return
        heap = self.bins.get(free)
        if heap is None:
            heap = self.bins[free] = []
            bisect.insort(self.sizes, free)
        heapq.heappush(heap, i)

    def place(self, length: int) -> int:
        k = bisect.bisect_left(self.sizes, length)
        if k < len(self.sizes):
            free = self.sizes[k]
            heap = self.bins[free]
            i = heapq.heappop(heap)
            if not heap:
                del self.bins[free]
                self.sizes.pop(k)
        else:
            free, i = self.capacity, self.n
            self.n += 1
        self._push(free - length, i)
        return i


def assign_bins(lengths: Sequence[int], capacity: int, method: str = "best_fit",
                decreasing: bool = True) -> list[list[int]]:
    """Groups item indices into bins of total length <= capacity; bins in opening order, items
    in placement order. Deterministic: ties go to the lower bin and the earlier item."""
    _check(capacity, method)
    lengths = [int(x) for x in lengths]
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise DataError(f"packing: item {i} has length {n}, not in [1, {capacity}]")
    order = range(len(lengths))
    if decreasing:
        order = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep arrival order
    packer = _FirstFit(capacity, len(lengths)) if method == "first_fit" else _BestFit(capacity)
    bins: list[list[int]] = []
    for i in order:
        b = packer.place(lengths[i])
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
    return bins


def rows_from_bins(docs: Sequence[Mapping], bins: Sequence[Sequence[int]], seq_len: int,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
    """Lays fitted documents out in rows (see the module docstring); `[len(bins), seq_len]`."""
    r = len(bins)
    inputs = np.full((r, seq_len), pad_id, np.int32)
    targets = np.full((r, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((r, seq_len), np.float32)
    segment_ids = np.zeros((r, seq_len), np.int32)
    positions = np.zeros((r, seq_len), np.int32)
    for row, members in enumerate(bins):
        at = 0
        for seg, d in enumerate(members, start=1):
            tokens, mask = docs[d]["tokens"], docs[d]["loss_mask"]
            n = len(tokens) - 1
            if at + n > seq_len:
                raise DataError(f"packing: row {row} overflows seq_len={seq_len}")
            inputs[row, at:at + n] = tokens[:-1]
            targets[row, at:at + n] = tokens[1:]
            loss_mask[row, at:at + n] = mask[1:]
            segment_ids[row, at:at + n] = seg
            positions[row, at:at + n] = np.arange(n, dtype=np.int32)
            at += n
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions}


def _fit_all(examples: Iterable[Mapping], seq_len: int, overflow: str, stats: PackStats) \
        -> tuple[list[dict], list[int]]:
    """Fitted documents and their indices in `examples` (dropped ones left out)."""
    docs, index = [], []
    for i, ex in enumerate(examples):
        doc = fit_document(ex, seq_len, overflow, stats, where=f" {i}")
        if doc is not None:
            docs.append(doc)
            index.append(i)
    return docs, index


def pack(examples: Sequence[Mapping], seq_len: int, method: str = "best_fit", *,
         decreasing: bool = True, overflow: str = "truncate", pad_id: int = 0) -> Packed:
    """Packs documents into rows of `seq_len` slots; `bins` hold indices into `examples`."""
    _check(seq_len, method, overflow)
    stats = PackStats()
    docs, index = _fit_all(examples, seq_len, overflow, stats)
    bins = assign_bins([len(d["tokens"]) - 1 for d in docs], seq_len, method, decreasing)
    rows = rows_from_bins(docs, bins, seq_len, pad_id)
    stats.documents = len(docs)
    stats.rows = len(bins)
    stats.tokens = int(sum(len(d["tokens"]) - 1 for d in docs))
    stats.capacity = stats.rows * seq_len
    return Packed(rows, [[index[d] for d in b] for b in bins], stats)


def pad_rows(examples: Sequence[Mapping], seq_len: int, *, overflow: str = "truncate",
             pad_id: int = 0) -> Packed:
    """The unpacked layout: one document per row, padded (same keys as `pack`)."""
    _check(seq_len, None, overflow)
    stats = PackStats()
    docs, index = _fit_all(examples, seq_len, overflow, stats)
    bins = [[d] for d in range(len(docs))]
    rows = rows_from_bins(docs, bins, seq_len, pad_id)
    stats.documents = stats.rows = len(docs)
    stats.tokens = int(sum(len(d["tokens"]) - 1 for d in docs))
    stats.capacity = stats.rows * seq_len
    return Packed(rows, [[index[d]] for d in range(len(docs))], stats)
