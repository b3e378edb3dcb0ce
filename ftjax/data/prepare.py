"""`prepare`: sources -> canonical -> cleaned/deduplicated/filtered -> splits -> report, with
the kept references of every split cached in the workdir (local or `gs://`)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ftjax.data import packing as packing_lib
from ftjax.data.errors import DataError
from ftjax.data.formats import canonical_kind, detect_format, to_canonical

from ftjax import workdir as workdir_lib
from ftjax.data.options import KINDS, SPLIT_NAMES, DataOptions, _plain
from ftjax.data.views import ExampleView, Prepared, _Encoder, _has_targets, _n_tokens

CACHE_FILE = "data_splits.npz"
CACHE_META = "data_splits.json"


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
            fmt = detect_format(src[0], dict(spec.field_map), origin=src.origin_str(0),
                                what="columns" if src.kind == "csv" else "fields")
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


def default_data_dir(workdir: str | os.PathLike[str]) -> str:
    """Where local data files are built into ArrayRecord: `<workdir>/data` for a local workdir.

    For a URL workdir (gs://) the build is a local cache instead (`$FTJAX_DATA_DIR`, default
    `~/.cache/ftjax/data`): it is derived from local input files and keyed by their digests,
    and the ArrayRecord reader reads local files. The splits and the data report still go to
    the workdir, so a resumed run reuses the same splits.
    """
    if workdir_lib.is_remote(workdir):
        return os.environ.get("FTJAX_DATA_DIR") or os.path.expanduser("~/.cache/ftjax/data")
    return os.fspath(workdir_lib.path(workdir, "data"))


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
    data_dir = opts.data_dir or default_data_dir(workdir)
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
            print(f"data: reusing the prepared splits in {workdir_lib.path(workdir, CACHE_META)}")
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
    """The kept references of every split (npz) and their metadata (json), process 0 only."""
    if not workdir_lib.is_primary():
        return
    report.save(workdir)
    buf = io.BytesIO()
    np.savez(buf, **{f"refs_{k}": v for k, v in refs.items()})
    workdir_lib.write_bytes(workdir, CACHE_FILE, buf.getvalue())
    meta = {"fingerprint": fingerprint, "splits": sorted(refs), "labels": labels,
            "split_labels": split_labels, "report_text": report.to_text()}
    workdir_lib.write_text(workdir, CACHE_META, json.dumps(meta))  # written last: the marker


def _load_cache(workdir: str, fingerprint: str):
    meta_path = workdir_lib.path(workdir, CACHE_META)
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        print(f"data: the cached splits in {meta_path} were made from other data or options; "
              "preparing again")
        return None
    data = workdir_lib.path(workdir, CACHE_FILE).read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        refs = {k: z[f"refs_{k}"] for k in meta["splits"]}
    return refs, meta["labels"], meta["split_labels"], meta["report_text"]
