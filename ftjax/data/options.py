"""Data options: the `data` config section parsed once into typed `DataOptions`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from ftjax.data.errors import DataError

KINDS = ("sft", "text", "preference", "unpaired", "classification")
PACKING = ("best_fit", "first_fit", "none")
SPLIT_NAMES = {1: ("train",), 2: ("train", "validation"), 3: ("train", "validation", "test")}
# The `data` section's rules, refused before a run builds anything (`trainers/_validate.py`;
# a key is checked where a config has it): the file pipeline's knobs (configs/common.py:
# data_file) and the synthetic suite's. Across keys it also checks splits.ratios (positive,
# summing to 1) and splits.kfold / splits.fold.
CHECKS = {
    "max_len": ">= 0", "pack_window": ">= 1", "num_workers": ">= 0", "read_threads": ">= 1",
    "min_train_examples": ">= 0", "splits.kfold": ">= 0", "splits.fold": ">= 0",
    "imbalance.mixture_examples": ">= 0", "pack_overflow": ("truncate", "drop", "error"),
    "text_unit": ("line", "paragraph", "file"), "on_error": ("raise", "skip"),
    "test_frac": "in (0, 1)", "n_per_task": ">= 1", "n_examples": ">= 1",
    "eval_examples": ">= 0", "max_new_tokens": ">= 1",
}


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

