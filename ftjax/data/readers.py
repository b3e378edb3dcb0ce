"""Readers of local data files: each yields (line, record dict) and reports a bad line
through `Bad`, which raises (file, line, snippet) or counts it, by `data.on_error`.
`read_records(kind, path, bad, text_unit)` dispatches by the source kind (see `sources.py`)."""
from __future__ import annotations

import csv
import json
import re
from typing import Any, Iterator, Optional, Union

import numpy as np

from ftjax.data.errors import DataError

_SNIPPET = 80
Skipped = list[tuple[tuple[str, int], str]]  # ((file, line), reason) of skipped lines


def _snippet(text: Union[str, bytes]) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.rstrip("\r\n")
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "...")


class Bad:
    """Collects or raises bad-line errors, by `on_error`."""

    def __init__(self, on_error: str, skipped: Skipped) -> None:
        self.on_error = on_error
        self.skipped = skipped

    def __call__(self, path: str, line: int, reason: str, text: Union[str, bytes]) -> None:
        if self.on_error == "raise":
            raise DataError(f"{path}:{line}: {reason}: {_snippet(text)}. Fix the input, or pass "
                            "on_error='skip' to leave such lines out (they are counted in the "
                            "data report)")
        self.skipped.append(((path, line), reason))


def json_problem(e: json.JSONDecodeError, line: str, one_line: bool = True) -> str:
    """`e` as "malformed JSON (...)" with a column inside `line`, the text of the line it is
    reported on (`one_line`: `e` comes from parsing that line alone). An error at or past the
    line's end (a line cut short: the parser reports the newline, or the next line's column
    1) is reported at the line's last column."""
    content = line.rstrip("\r\n").rstrip()
    starting = e.msg.endswith(" starting at")
    msg = e.msg.removesuffix(" starting at").removesuffix(" at")
    msg = msg[:1].lower() + msg[1:]
    if (one_line and e.lineno > 1) or e.colno > len(content):
        return (f"malformed JSON: the line ends at column {len(content)} before the JSON is "
                f"complete ({msg}; cut short?)")
    return f"malformed JSON ({msg} {'starting at' if starting else 'at'} column {e.colno})"


def _read_jsonl(path: str, bad: Bad) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(path, n, f"not valid UTF-8 (byte {e.start})", raw)
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                bad(path, n, json_problem(e, text), text)
                continue
            if not isinstance(value, dict):
                bad(path, n, f"expected a JSON object per line, got {type(value).__name__}",
                    text)
                continue
            yield n, value


def read_jsonl_objects(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file; the first bad line
    (not UTF-8, malformed JSON, not an object) raises a DataError naming file and line."""
    return _read_jsonl(path, Bad("raise", []))


def _json_elements(text: str, path: str) -> list[tuple[int, Any]]:
    """(offset, value) of each element of the top-level list (or of {"data": [...]})."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def skip(pos: int) -> int:
        return ws.match(text, pos).end()

    def walk_list(pos: int) -> list[tuple[int, Any]]:
        out = []
        pos = skip(pos + 1)
        if text.startswith("]", pos):
            return out
        while True:
            value, end = decoder.raw_decode(text, pos)
            out.append((pos, value))
            pos = skip(end)
            if text.startswith("]", pos):
                return out
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = skip(pos + 1)

    pos = skip(0)
    if text.startswith("[", pos):
        return walk_list(pos)
    whole = json.loads(text)  # raises with a position if malformed
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        # Locate the "data" list: walk the top-level object's keys.
        pos = skip(pos + 1)
        while True:
            key, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past ':'
            if key == "data" and text.startswith("[", pos):
                found = walk_list(pos)
                if len(found) == len(whole["data"]):
                    return found
            _, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past ','
    keys = sorted(whole) if isinstance(whole, dict) else None
    raise DataError(f"{path}: a JSON source must hold a list of records or {{\"data\": [...]}}; "
                    f"found {type(whole).__name__}"
                    + (f" with keys {keys}" if keys is not None else "")
                    + ". Convert it, or use jsonl: for one object per line")


def _read_utf8(path: str) -> str:
    """The whole file as text (a BOM dropped); undecodable bytes raise naming the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-encode the file "
                        "as UTF-8") from None


def _read_json(path: str, bad: Bad) -> Iterator[tuple[int, dict]]:
    text = _read_utf8(path)
    if not text.strip():
        return
    try:
        elements = _json_elements(text, path)
    except json.JSONDecodeError as e:
        lines = text.splitlines()
        line_text = lines[e.lineno - 1] if e.lineno <= len(lines) else ""
        problem = json_problem(e, line_text, one_line=False)
        raise DataError(f"{path}:{e.lineno}: {problem}: {_snippet(line_text)}. A JSON file is "
                        "parsed as a whole, so it must be valid; fix it (or convert to JSONL to "
                        "skip bad lines)") from None
    line, at = 1, 0
    for offset, value in elements:
        line += text.count("\n", at, offset)  # incremental: elements come in file order
        at = offset
        if not isinstance(value, dict):
            bad(path, line, f"expected a JSON object per element, got {type(value).__name__}",
                json.dumps(value, ensure_ascii=False))
            continue
        yield line, value


def _read_csv(path: str, bad: Bad) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: Optional[list[str]] = None
        start = 1
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    empty = [i + 1 for i, h in enumerate(header) if not h]
                    dupes = sorted({h for h in header if header.count(h) > 1})
                    if empty or dupes:
                        raise DataError(f"{path}:{line}: CSV header "
                                        + (f"has empty column names at positions {empty}"
                                           if empty else f"repeats column names {dupes}")
                                        + f": {_snippet(','.join(row))}; every column needs a "
                                        "unique name")
                    continue
                if len(row) != len(header):
                    bad(path, line, f"CSV row has {len(row)} fields but the header has "
                        f"{len(header)} ({header})", ",".join(row))
                    continue
                yield line, dict(zip(header, row))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 near line {start} ({e.reason}); "
                            "re-encode the file as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _plain_value(value: Any) -> Any:
    """Parquet values -> JSON-able python values."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("a binary Parquet value is not UTF-8 text") from None
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None  # NaN/inf (pandas' missing value) -> null, as JSON has no NaN
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _read_parquet(path: str, bad: Bad) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            try:
                yield row, _plain_value(record)
            except DataError as e:
                bad(path, row, str(e), json.dumps(record, default=repr)[:200])


def _read_text(path: str, bad: Bad, unit: str) -> Iterator[tuple[int, dict]]:
    text = _read_utf8(path)
    if unit == "file":
        if text.strip():
            yield 1, {"text": text}
        return
    lines = text.splitlines()
    if unit == "line":
        for n, line in enumerate(lines, start=1):
            if line.strip():
                yield n, {"text": line}
        return
    para: list[str] = []
    first = 0
    for n, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not para:
                first = n
            para.append(line)
        elif para:
            yield first, {"text": "\n".join(para)}
            para = []


def read_records(kind: str, path: str, bad: Bad, text_unit: str) \
        -> Iterator[tuple[int, dict]]:
    if kind == "jsonl":
        return _read_jsonl(path, bad)
    if kind == "json":
        return _read_json(path, bad)
    if kind == "csv":
        return _read_csv(path, bad)
    if kind == "parquet":
        return _read_parquet(path, bad)
    return _read_text(path, bad, text_unit)
