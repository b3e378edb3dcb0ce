"""Data sources: local JSONL/JSON/CSV/Parquet/text files and the TFDS catalog, as random access.

`open_source(spec, data_dir=...)` returns a `RecordSource`: `len(src)`, `src[i] -> dict` of
plain python values, `src.origin(i) -> (file, line)`; Grain reads it directly
(`grain.MapDataset.source(src)`) and it pickles for Grain worker processes.

Specs (the kind may be left out when the file extension says it: .jsonl .json .csv .parquet
.txt):

    jsonl:PATH     one JSON object per line (blank lines ignored); origin = the line
    json:PATH      a top-level list of objects, or {"data": [...]}; origin = the line where the
                   object starts
    csv:PATH       header row, then one record per row (quoted fields may hold newlines; values
                   stay strings); origin = the line where the row starts
    parquet:PATH   one record per row (pyarrow; NaN -> null); origin = the row number (1-based)
    text:PATH      {"text": ...} per non-blank line (`text_unit="line"`), per blank-line-
                   separated paragraph ("paragraph"; origin = its first line) or per file ("file")
    tfds:NAME[/CONFIG][:VERSION][:SPLIT]   a TFDS catalog dataset via `tfds.data_source` (prepared
                   as ArrayRecord under `data_dir`); origin = ("tfds:NAME:SPLIT", index + 1);
                   bytes decode to str, ClassLabel ints to their names.

PATH may be a glob, or several paths joined by ","; a list of specs of one kind is one source.
Files are read in sorted order of the expanded names.

Local files become a TFDS dataset (a `GeneratorBasedBuilder` writing `array_record`, unshuffled)
under `data_dir/ftjax_sources/<kind>-<key>/`, where `key` hashes the file contents (in order)
and the options (`text_unit`, `on_error`), so a second `open_source` on unchanged files reuses
the prepared files (`src.built` says whether this call built them) and any change rebuilds.
Each record is stored as its JSON text with its file index and line; file names are taken from
the current paths at open time, so errors name the files as the user sees them now.
Not safe against two processes building the same new source at once: build on one process
first (e.g. process 0, then a barrier) in multi-host runs.

Bad input (malformed JSON line, a record that is not an object, a CSV row with the wrong number
of fields, undecodable UTF-8, an empty file) raises `DataError` naming the file, the line and a
snippet at build time (`on_error="raise"`, the default: a broken line usually means a broken
export, and silently training on part of the data is worse than stopping). With
`on_error="skip"` such lines are left out and listed in `src.skipped` as
`((file, line), reason)` so the data report can count them; the list is stored with the
prepared dataset, so a reused source reports the same skips. An empty file always raises.

`field_map={"canonical": "field in the data"}` renames top-level fields of every record as it
is read (e.g. `{"text": "sentence"}` for a TFDS dataset); `formats.to_canonical` accepts the
renamed or the original names, so the same map may be given to both.

`split` for local files selects the one stored split, "train", and accepts TFDS slicing
("train[:90%]"); splitting into train/val/test is done later (`ftjax/data/splits.py`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ftjax.data.errors import DataError
from ftjax.data.readers import Bad, read_records

__all__ = ["open_source", "RecordSource", "SOURCE_KINDS", "TEXT_UNITS", "ON_ERROR",
           "parse_spec", "format_origin"]

SOURCE_KINDS = ("jsonl", "json", "csv", "parquet", "text", "tfds")
LOCAL_KINDS = SOURCE_KINDS[:-1]
TEXT_UNITS = ("line", "paragraph", "file")
ON_ERROR = ("raise", "skip")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}
# Bump when the stored layout or parsing changes: old prepared datasets are then not reused.
_FORMAT_VERSION = "1"

Origin = tuple[str, int]
Skipped = list[tuple[Origin, str]]


def format_origin(origin: Origin) -> str:
    """`(file, line)` -> "file:line", the form `formats.to_canonical` takes for messages."""
    return f"{origin[0]}:{origin[1]}"


# --------------------------------------------------------------------------------------------
# Specs


def parse_spec(spec: Union[str, Sequence[str]]) -> tuple[str, list[str]]:
    """`"kind:PATH"` (or a list of them, one kind) -> (kind, [path patterns]). For "tfds" the
    single pattern is "NAME[/CONFIG][:SPLIT]"."""
    if not isinstance(spec, str):
        specs = list(spec)
        if not specs:
            raise DataError("open_source got an empty list of specs; give at least one")
        parsed = [parse_spec(s) for s in specs]
        kinds = sorted({k for k, _ in parsed})
        if len(kinds) > 1 or kinds[0] == "tfds":
            raise DataError(f"a list of specs must name local files of one kind, got kinds "
                            f"{kinds} in {specs}; open each kind as its own source and mix them "
                            "with weights instead")
        return kinds[0], [p for _, ps in parsed for p in ps]
    if not spec.strip():
        raise DataError("empty data source spec; use e.g. 'jsonl:data/train.jsonl' or "
                        "'tfds:imdb_reviews:train'")
    kind, sep, rest = spec.partition(":")
    if sep and kind in SOURCE_KINDS:
        if not rest:
            raise DataError(f"data source spec {spec!r} has no path after '{kind}:'")
        if kind == "tfds":
            return kind, [rest]
        return kind, _split_paths(rest)
    if sep and re.fullmatch(r"[a-z_]+", kind) and len(kind) > 1:
        raise DataError(f"unknown data source kind {kind!r} in {spec!r}; use one of "
                        f"{list(SOURCE_KINDS)} as 'kind:PATH'")
    paths = _split_paths(spec)
    kinds = {_EXTENSIONS.get(os.path.splitext(p)[1].lower()) for p in paths}
    if len(kinds) != 1 or None in kinds:
        raise DataError(f"cannot tell the format of {spec!r} from its extension; prefix the "
                        f"kind, e.g. 'jsonl:{spec}' (kinds: {list(LOCAL_KINDS)})")
    return kinds.pop(), paths


def _split_paths(rest: str) -> list[str]:
    if os.path.exists(rest):
        return [rest]
    return [p.strip() for p in rest.split(",") if p.strip()]


def _expand(patterns: Sequence[str], kind: str) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            hits = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not hits:
                raise DataError(f"{kind} source pattern {pattern!r} matches no files")
            files.extend(hits)
        elif os.path.isdir(pattern):
            raise DataError(f"{kind} source path {pattern!r} is a directory; give a file or a "
                            f"glob such as '{os.path.join(pattern, '*')}'")
        elif not os.path.isfile(pattern):
            raise DataError(f"{kind} source file {pattern!r} does not exist")
        else:
            files.append(pattern)
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The TFDS builder for local files


def _builder_class():
    """Defined lazily so importing this module does not import TFDS."""
    global _LocalFiles
    if _LocalFiles is not None:
        return _LocalFiles
    import tensorflow_datasets as tfds

    class LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Local JSONL/JSON/CSV/Parquet/text files -> one unshuffled "train" split; each example
        is the record as JSON text with its file index and line."""

        VERSION = tfds.core.Version("1.0.0")
        # No checksums or code files: this builder downloads nothing. (TFDS' lookup of them
        # needs the optional `importlib_resources` package for classes inside packages.)
        code_path = None

        def __init__(self, *, kind: str, files: Sequence[str], text_unit: str, on_error: str,
                     **kwargs: Any) -> None:
            self._kind, self._files = kind, list(files)
            self._text_unit, self._on_error = text_unit, on_error
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"ftjax local {self._kind} files",
                features=tfds.features.FeaturesDict({
                    "record": tfds.features.Text(), "file": np.int32, "line": np.int64}),
                disable_shuffling=True,  # keep file order: index i is the i-th record read
                metadata=tfds.core.MetadataDict())

        # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded
        # and prepared" around a build; nothing is downloaded here, so `open_source` says what
        # happens instead.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            skipped: Skipped = []
            bad = Bad(self._on_error, skipped)
            total = 0
            for fi, path in enumerate(self._files):
                if os.path.getsize(path) == 0:
                    raise DataError(f"{path} is empty; remove it from the source or fill it")
                n_before, skipped_before = total, len(skipped)
                for line, record in read_records(self._kind, path, bad, self._text_unit):
                    try:
                        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
                    except (TypeError, ValueError) as e:
                        bad(path, line, f"record cannot be stored as JSON ({e})", str(record))
                        continue
                    yield total, {"record": text, "file": fi, "line": line}
                    total += 1
                if total == n_before and len(skipped) == skipped_before:
                    raise DataError(f"{path} has no records (only blank lines or an empty "
                                    "list/header); remove it from the source or fill it")
            if total == 0:
                reasons = "; ".join(f"{format_origin(o)}: {r}" for o, r in skipped[:3])
                more = "; ..." if len(skipped) > 3 else ""
                raise DataError(f"no valid records in {self._files}: all {len(skipped)} were "
                                f"skipped as malformed ({reasons}{more})")
            self.info.metadata["skipped"] = [[self._files.index(o[0]), o[1], r]
                                             for o, r in skipped]
            self.info.metadata["num_records"] = total

    _LocalFiles = LocalFiles
    return LocalFiles


_LocalFiles = None


def _quiet_tfds():
    """TFDS progress bars off for the build (they flood test and training logs)."""
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)


# --------------------------------------------------------------------------------------------
# The source


def _to_python(value: Any, feature: Any = None) -> Any:
    """Numpy/bytes values from a TFDS data source -> plain python (ClassLabel -> its name)."""
    names = getattr(feature, "names", None) if feature is not None else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            value = value.item()
        else:
            return [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    return value


class RecordSource:
    """Random-access records with origins (Grain's RandomAccessDataSource protocol).

    `src[i]` is a fresh dict of plain python values (with `field_map` renames applied);
    `src.origin(i)` is `(file, line)`; `src.skipped` lists `((file, line), reason)` of lines
    left out with `on_error="skip"`; `src.built` is True when this open prepared the files.
    """

    def __init__(self, data: Any, *, spec: str, kind: str, files: Sequence[str],
                 field_map: Optional[Mapping[str, str]], skipped: Skipped, built: bool,
                 cache_dir: Optional[str], features: Any = None) -> None:
        self._data = data
        self.spec = spec
        self.kind = kind
        self.files = list(files)
        self.field_map = dict(field_map or {})
        self.skipped = skipped
        self.built = built
        self.cache_dir = cache_dir
        self._features = features

    def __len__(self) -> int:
        return len(self._data)

    def _check(self, i: int) -> int:
        n = len(self._data)
        if not -n <= i < n:
            raise IndexError(f"record index {i} out of range for {self.spec} ({n} records)")
        return i % n

    def _decode(self, raw: Mapping) -> dict:
        if self.kind == "tfds":
            feats = self._features
            record = {k: _to_python(v, feats[k] if feats is not None and k in feats else None)
                      for k, v in raw.items()}
        else:
            text = raw["record"]
            record = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        for canonical, field in self.field_map.items():
            if isinstance(field, str) and field in record and canonical != field:
                record[canonical] = record.pop(field)
        return record

    def __getitem__(self, i: int) -> dict:
        return self._decode(self._data[self._check(int(i))])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Batched read (Grain uses it; about twice as fast as one record at a time)."""
        idx = [self._check(int(i)) for i in indices]
        getitems = getattr(self._data, "__getitems__", None)
        raws = getitems(idx) if getitems is not None else [self._data[i] for i in idx]
        return [self._decode(r) for r in raws]

    def origin(self, i: int) -> Origin:
        """(file, line) of record i (TFDS catalog: ("tfds:NAME:SPLIT", index + 1))."""
        i = self._check(int(i))
        if self.kind == "tfds":
            return (self.spec, i + 1)
        raw = self._data[i]
        return (self.files[int(raw["file"])], int(raw["line"]))

    def origin_str(self, i: int) -> str:
        """"file:line" of record i, for error messages."""
        return format_origin(self.origin(i))

    def __repr__(self) -> str:
        return (f"RecordSource({self.spec!r}, {len(self)} records, {len(self.skipped)} skipped"
                f"{', built' if self.built else ''})")


def open_source(spec: Union[str, Sequence[str]], *, data_dir: str, split: str = "train",
                field_map: Optional[Mapping[str, str]] = None, text_unit: str = "line",
                on_error: str = "raise", download: bool = True,
                verbose: bool = True) -> RecordSource:
    """Opens a data source spec (see the module docstring) as a `RecordSource`.

    Local files are prepared once as ArrayRecord under `data_dir` and reused while their
    contents and the options are unchanged (`verbose` prints which of the two happens).
    `download` applies to TFDS catalog datasets only.
    """
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit={text_unit!r}; use one of {list(TEXT_UNITS)}")
    if on_error not in ON_ERROR:
        raise DataError(f"on_error={on_error!r}; use one of {list(ON_ERROR)}")
    if field_map is not None and not isinstance(field_map, Mapping):
        raise DataError(f"field_map must be a dict {{canonical field: field in the data}}, got "
                        f"{type(field_map).__name__}")
    kind, patterns = parse_spec(spec)
    spec_text = spec if isinstance(spec, str) else ",".join(spec)
    if kind == "tfds":
        return _open_tfds(patterns[0], data_dir=data_dir, split=split, field_map=field_map,
                          download=download)
    files = _expand(patterns, kind)
    key_parts = [_FORMAT_VERSION, kind, on_error, text_unit if kind == "text" else ""]
    key_parts += [_file_digest(f) for f in files]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:20]

    import tensorflow_datasets as tfds

    if "://" in data_dir:
        raise DataError(f"data.data_dir={data_dir!r} is a URL; local files ({spec_text!r}) are "
                        "built into a local ArrayRecord cache: set data.data_dir to a local "
                        "directory (or leave it empty)")
    root = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), "ftjax_sources",
                        f"{kind}-{key}")
    builder = _builder_class()(kind=kind, files=files, text_unit=text_unit, on_error=on_error,
                               data_dir=root, file_format="array_record")
    prepared_dir = str(builder.data_dir)
    built = not os.path.isfile(os.path.join(prepared_dir, "dataset_info.json"))
    if verbose:
        print(f"data: {'building' if built else 'reusing'} the ArrayRecord cache of "
              f"{spec_text} in {prepared_dir}"
              + (" (once: runs on the same file contents and options reuse it)" if built
                 else ""), flush=True)
    if built:
        _quiet_tfds()
        try:
            builder.download_and_prepare()
        except DataError:
            raise
        except Exception as e:
            # TFDS may wrap exceptions raised inside the generator.
            cause = e
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            if not os.path.isfile(os.path.join(prepared_dir, "dataset_info.json")):
                raise
            built = False  # another process finished the same build first: use its files
    reader = tfds.builder_from_directory(prepared_dir)
    try:
        data = reader.as_data_source(split=split)
    except Exception as e:
        raise DataError(f"local source {spec_text!r} has one split, 'train' (TFDS slicing such "
                        f"as 'train[:90%]' works); got split={split!r} ({e})") from None
    meta = dict(reader.info.metadata or {})
    skipped = [((files[int(fi)], int(line)), str(reason))
               for fi, line, reason in meta.get("skipped", [])]
    return RecordSource(data, spec=spec_text, kind=kind, files=files, field_map=field_map,
                        skipped=skipped, built=built, cache_dir=prepared_dir)


def _open_tfds(name_split: str, *, data_dir: str, split: str,
               field_map: Optional[Mapping[str, str]], download: bool) -> RecordSource:
    import tensorflow_datasets as tfds

    # NAME may carry a TFDS version ("imdb_reviews:1.0.0"); the split is a last part that is
    # not a version.
    head, sep, tail = name_split.rpartition(":")
    if sep and not re.fullmatch(r"[\d.*]+", tail):
        name, split = head, tail
    else:
        name = name_split
    if not name or not split:
        raise DataError(f"tfds spec 'tfds:{name_split}' needs a name (and a split after ':' or "
                        "through split=...), e.g. 'tfds:imdb_reviews:train'")
    _quiet_tfds()
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                builder_kwargs={"file_format": "array_record"})
        features = tfds.builder(name, data_dir=data_dir).info.features
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot open TFDS dataset {name!r} split {split!r} under {data_dir}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check "
                        "the name (tfds.list_builders()), the split, and that it was prepared "
                        "as array_record (or can be downloaded)") from None
    return RecordSource(data, spec=f"tfds:{name}:{split}", kind="tfds", files=[],
                        field_map=field_map, skipped=[], built=False, cache_dir=None,
                        features=features)
