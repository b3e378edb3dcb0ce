"""Reference log-probs computed outside the training step, so the step never holds (or
captures as a compile-time constant) a second model.

  precompute  `compute_table` scores every training and validation pair once (a pass over
              "every example once" batches), keyed by the content of the pair's rows; the
              table is cached in the workdir and `Precomputed` attaches the values to each
              batch of any loader (in-memory or the Grain pipeline) by looking the rows up.
  copy        `WithReference` runs a frozen copy on each batch as the loader yields it.

Both run the reference as an explicit, sharded argument of a separate jitted forward, and add
`ref_chosen_logps` / `ref_rejected_logps` [B, 1] to the batch.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Optional

import jax
import numpy as np

from etils import epath

from ftjax import sharding, workdir
from ftjax.align.reference import make_ref_logps_fn
from ftjax.models.config import ModelConfig
from ftjax.data.resumable import PassthroughIterator

_ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def row_keys(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """A 16-byte digest per row of both halves: equal rows (the same pair, tokenized the same
    way) get equal keys, whichever loader, epoch or position they come from."""
    n = len(batch["chosen_inputs"])
    keys = np.empty(n, "S16")
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for half in ("chosen", "rejected"):
            for k in _ROW_KEYS:
                h.update(np.ascontiguousarray(batch[f"{half}_{k}"][i]).tobytes())
        keys[i] = h.digest()
    return keys


def is_real(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows that hold a pair (padding rows of an eval list have no completion tokens)."""
    return (np.asarray(batch["chosen_loss_mask"]).sum(1) > 0) | \
           (np.asarray(batch["rejected_loss_mask"]).sum(1) > 0)


def global_host(x: Any) -> np.ndarray:
    """A batch-sharded device array, or this process's host rows, as the whole global batch on
    every host (rows in process order, as the batch sharding lays them out)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compute_table(ref_params: Any, model_cfg: ModelConfig, batches: Iterable[dict],
                  placement, apply_fn=None) -> dict[str, np.ndarray]:
    """{"keys": S16 [n], "chosen": [n], "rejected": [n]} over the real rows of `batches`
    (this process's rows of each global batch; every process gets the whole table).
    apply_fn: the PEFT method's forward (prompt/prefix tuning), if any."""
    fn = make_ref_logps_fn(model_cfg, apply_fn)
    keys, chosen, rejected = [], [], []
    for b in batches:
        c, r = fn(ref_params, placement.put_batch(b))
        digests = np.frombuffer(row_keys(b).tobytes(), np.uint8).reshape(-1, 16)
        k = global_host(digests)
        real = global_host(is_real(b).astype(np.uint8)) > 0
        keys.append(np.ascontiguousarray(k[real]).view("S16").reshape(-1))
        chosen.append(global_host(c)[real, 0])
        rejected.append(global_host(r)[real, 0])
    return {"keys": np.concatenate(keys), "chosen": np.concatenate(chosen).astype(np.float32),
            "rejected": np.concatenate(rejected).astype(np.float32)}


def cache_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (config sections, data fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_stamp(init_from: str) -> list:
    """(name, size, mtime) of the starting weights' files, so a table is not reused after the
    checkpoint at the same path was replaced."""
    path = init_from[3:] if init_from.startswith("hf:") else init_from
    if not path or not os.path.exists(path):
        return []
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path))
              if f.endswith((".safetensors", ".json"))] if os.path.isdir(path) else [path])
    return [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]


def load_cache(path: str) -> Optional[dict[str, np.ndarray]]:
    """The cached table when `path` exists on every process (they must agree: computing it
    is a collective forward), else None."""
    path = epath.Path(path)
    exists = path.exists()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        exists = bool(np.all(multihost_utils.process_allgather(np.asarray(exists))))
    if not exists:
        return None
    with path.open("rb") as fh, np.load(io.BytesIO(fh.read()), allow_pickle=False) as f:
        table = {k: np.asarray(f[k]) for k in f.files}
    if set(table) != {"keys", "chosen", "rejected"} or not (
            len(table["keys"]) == len(table["chosen"]) == len(table["rejected"])):
        raise ValueError(f"{path} is not a reference log-prob table (keys/chosen/rejected of "
                         "equal length); delete it to recompute")
    return table


def save_cache(path: str, table: Mapping[str, np.ndarray]) -> None:
    """Writes the table atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    buf = io.BytesIO()
    np.savez(buf, **table)
    workdir.write_bytes(epath.Path(path).parent, epath.Path(path).name, buf.getvalue())


class Precomputed(PassthroughIterator):
    """Attaches the precomputed reference log-probs of each row (the "precompute" mode)."""

    def __init__(self, inner: Iterator[dict], table: Mapping[str, np.ndarray]):
        super().__init__(inner)
        self.index = {k: i for i, k in enumerate(table["keys"].tolist())}
        self.chosen, self.rejected = table["chosen"], table["rejected"]

    def attach(self, batch: dict) -> dict:
        keys, real = row_keys(batch), is_real(batch)
        idx = np.zeros(len(keys), np.int64)
        for i, (k, r) in enumerate(zip(keys.tolist(), real)):
            if r:
                if k not in self.index:
                    raise ValueError(
                        "a batch row has no precomputed reference log-probs: the loader yields "
                        "a pair the precompute pass did not see (the data or its tokenization "
                        "changed); delete the workdir's ref_logps_*.npz to recompute")
                idx[i] = self.index[k]
        out = dict(batch)
        out["ref_chosen_logps"] = np.where(real, self.chosen[idx], 0.0).astype(np.float32)[:, None]
        out["ref_rejected_logps"] = np.where(real, self.rejected[idx], 0.0).astype(np.float32)[:, None]
        return out


class WithReference(PassthroughIterator):
    """Scores each batch with a frozen reference copy as the loader yields it (the "copy"
    mode); costs one dense model of device memory and a host sync per batch."""

    def __init__(self, inner: Iterator[dict], ref_params: Any, model_cfg: ModelConfig, placement,
                 apply_fn=None):
        super().__init__(inner)
        self.ref_params = ref_params
        self.placement = placement
        self.fn = make_ref_logps_fn(model_cfg, apply_fn)

    def attach(self, batch: dict) -> dict:
        c, r = self.fn(self.ref_params, self.placement.put_batch(batch))
        rows = len(batch["chosen_inputs"])
        out = dict(batch)
        for name, v in (("ref_chosen_logps", c), ("ref_rejected_logps", r)):
            full = global_host(v)
            lo, hi = sharding.local_batch_rows(self.placement.batch, full.shape[0])
            if hi - lo != rows:
                raise ValueError(f"the loader yielded {rows} rows but this process holds rows "
                                 f"[{lo}, {hi}) of the global batch")
            out[name] = full[lo:hi]
        return out
