"""In-memory classification batches (token lists + integer labels): one example per row,
right-padded, for tests and small data; the real-data path is `pipeline.make_loader`."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ftjax.data.imbalance import stratified_batches
from ftjax.data.splits import hash_order
from ftjax.data.resumable import Resumable


def class_counts(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Count of each class (in class-list order) among `labels`."""
    c = Counter(str(x) for x in labels)
    return np.array([c[k] for k in classes], np.int64)


def encode_rows(token_lists: Sequence[np.ndarray], labels: Sequence[int], seq_len: int,
                pad_id: int = 0) -> dict:
    """Classification rows from token lists (one example per row, right-padded)."""
    b = len(token_lists)
    out = {"inputs": np.full((b, seq_len), pad_id, np.int32),
           "segment_ids": np.zeros((b, seq_len), np.int32),
           "positions": np.zeros((b, seq_len), np.int32),
           "label": np.asarray(labels, np.int32).reshape(b),
           "label_weight": np.ones((b,), np.float32)}
    for i, t in enumerate(token_lists):
        n = len(t)
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens but seq_len={seq_len}; raise "
                             "train.seq_len or tokenize with max_len=seq_len")
        if n == 0:
            raise ValueError(f"example {i} has no tokens")
        out["inputs"][i, :n] = t
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
    return out


class ArrayLoader(Resumable):
    """In-memory classification batches: seeded per-epoch shuffles (or stratified batches),
    this process's rows of every global batch, and a JSON-able resume state.

    For tests and small in-memory data; the real-data path is `pipeline.make_loader`.
    """

    def __init__(self, tokens: Sequence[np.ndarray], labels: Sequence[int], batch_size: int,
                 seq_len: int, seed: int = 0, *, pad_id: int = 0, shuffle: bool = True,
                 stratified: bool = False, process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by the "
                             f"{process_count} processes")
        if len(tokens) < batch_size:
            raise ValueError(f"{len(tokens)} examples are fewer than one batch of {batch_size}")
        self.tokens, self.labels = list(tokens), np.asarray(labels, np.int64)
        self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
        self.shuffle, self.stratified = shuffle, stratified
        self.rows = slice(process_index * batch_size // process_count,
                          (process_index + 1) * batch_size // process_count)
        self.epoch, self.step_in_epoch = 0, 0
        self._order = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        n, b = len(self.labels), self.batch_size
        if self.stratified:
            return stratified_batches(self.labels, b, seed=self.seed * 1000003 + epoch)
        order = hash_order(n, self.seed, salt=epoch) if self.shuffle else np.arange(n)
        return order[:n // b * b].reshape(-1, b)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step_in_epoch >= len(self._order):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._order = self._epoch_batches(self.epoch)
        idx = self._order[self.step_in_epoch][self.rows]
        self.step_in_epoch += 1
        return encode_rows([self.tokens[i] for i in idx], self.labels[idx], self.seq_len,
                           self.pad_id)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def set_state(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self._order = self._epoch_batches(self.epoch)


def eval_rows(tokens: Sequence[np.ndarray], labels: Sequence[int], batch_size: int,
              seq_len: int, *, pad_id: int = 0, process_index: int = 0,
              process_count: int = 1) -> list[dict]:
    """Every example once, in fixed batches; the last is padded with label_weight-0 rows.
    Returns this process's rows of each batch."""
    n = len(tokens)
    out = []
    lo = process_index * batch_size // process_count
    hi = (process_index + 1) * batch_size // process_count
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        pad = batch_size - len(idx)
        toks = [tokens[i] for i in idx] + [np.array([pad_id], np.int32)] * pad
        labs = [int(labels[i]) for i in idx] + [0] * pad
        rows = encode_rows(toks, labs, seq_len, pad_id)
        rows["label_weight"][len(idx):] = 0.0
        out.append({k: v[lo:hi] for k, v in rows.items()})
    return out
