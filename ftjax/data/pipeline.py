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
  preference      chosen_<key> and rejected_<key> for each key above; pair i in row i of both;
                  margin float32 [B, 1] (the record's optional `margin`, else 0)
  unpaired        the sft keys + label int32 [B] (1 desirable) + label_weight float32 [B]
  classification  inputs segment_ids positions [B, T] + label int32 [B] + label_weight [B]
Evaluation (`eval_batches`): every example once, the last batch filled with empty rows
(zero segment_ids / loss_mask / label_weight).
"""
from __future__ import annotations
from __future__ import annotations

# The pipeline's jobs live in their own modules; this one is the stable import point.
from ftjax.data.loader import Loader, eval_batches, make_loader
from ftjax.data.options import KINDS, PACKING, SPLIT_NAMES, DataOptions, SourceSpec, \
    parse_field_map
from ftjax.data.prepare import CACHE_FILE, CACHE_META, prepare
from ftjax.data.views import ExampleView, ListView, Prepared, encode_fn

__all__ = ["KINDS", "PACKING", "SPLIT_NAMES", "DataOptions", "SourceSpec", "Prepared",
           "ExampleView", "ListView", "Loader", "prepare", "make_loader", "eval_batches",
           "encode_fn", "parse_field_map", "CACHE_FILE", "CACHE_META"]
