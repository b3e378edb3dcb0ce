"""Reference log-probs computed outside the training step: once per pair before training
(`precompute_pairs`, cached in the workdir) or per batch as the loader yields it
(`WithReference`, the "copy" mode). The reference params are an explicit, sharded argument of a
separate jitted forward, never a constant captured by the training step."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from ftjax import sharding
from ftjax.align.data import PreferenceLoader
from ftjax.align.reference import make_ref_logps_fn
from ftjax.models.config import ModelConfig


def _global_host(x: jax.Array) -> np.ndarray:
    """The whole (batch-sharded) array on every host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def precompute_pairs(ref_params: Any, model_cfg: ModelConfig, pairs: Sequence[Mapping], tok,
                     batch_size: int, seq_len: int, placement) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [n], rejected [n]) reference log-probs of every pair, in pair order."""
    loader = PreferenceLoader(pairs, tok, batch_size, seq_len, seed=0, shuffle=False,
                              drop_remainder=False, num_epochs=1,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    fn = make_ref_logps_fn(model_cfg)
    out = (np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32))
    for step in range(loader.batches_per_epoch):
        c, r = fn(ref_params, placement.put_batch(loader.batch_at(step)))
        idx = np.asarray(loader.halves["chosen"].global_indices(step), np.int64)
        for dst, v in zip(out, (c, r)):
            dst[idx] = _global_host(v)[:len(idx), 0]
    return out


def cache_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (config sections, data fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pairs_fingerprint(pairs: Sequence[Mapping]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p["prompt"], p["chosen"], p["rejected"]]).encode())
    return h.hexdigest()[:16]


def load_cache(path: str, n: dict[str, int]) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays when `path` exists on every process and matches the split sizes."""
    exists = os.path.exists(path)
    if jax.process_count() > 1:  # all processes must agree, or the forward would deadlock
        from jax.experimental import multihost_utils
        exists = bool(np.all(multihost_utils.process_allgather(np.asarray(exists))))
    if not exists:
        return None
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: np.asarray(f[k]) for k in f.files}
    for split, size in n.items():
        for h in ("chosen", "rejected"):
            a = arrays.get(f"{split}_{h}")
            if a is None or a.shape != (size,):
                raise ValueError(f"reference log-prob cache {path} does not match the data "
                                 f"({split}: {size} pairs); delete it to recompute")
    return arrays


def save_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic


class WithReference:
    """Wraps a preference loader: each batch gets `ref_chosen_logps` / `ref_rejected_logps`
    [B, 1] from a frozen reference copy (the "copy" mode). State calls pass through."""

    def __init__(self, inner: Iterator[dict], ref_params: Any, model_cfg: ModelConfig, placement):
        self.inner = inner
        self.ref_params = ref_params
        self.placement = placement
        self.fn = make_ref_logps_fn(model_cfg)

    def attach(self, batch: dict) -> dict:
        c, r = self.fn(self.ref_params, self.placement.put_batch(batch))
        rows = len(next(iter(batch.values())))
        out = dict(batch)
        for name, v in (("ref_chosen_logps", c), ("ref_rejected_logps", r)):
            full = _global_host(v)
            lo, hi = sharding.local_batch_rows(self.placement.batch, full.shape[0])
            if hi - lo != rows:
                raise ValueError(f"loader yielded {rows} rows but this process holds rows "
                                 f"[{lo}, {hi}) of the global batch")
            out[name] = full[lo:hi]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.attach(next(self.inner))

    def get_state(self) -> dict:
        return self.inner.get_state() if hasattr(self.inner, "get_state") else {}

    def set_state(self, state: Mapping) -> None:
        if hasattr(self.inner, "set_state"):
            self.inner.set_state(state)
