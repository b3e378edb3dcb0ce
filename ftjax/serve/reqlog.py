"""The request log: one JSON line per served request, without the text unless asked for.

    log = RequestLog("serve/requests.jsonl")              # or RequestLog(None): disabled
    log.write({"endpoint": "/v1/chat/completions", "model": "base", "status": "ok",
               "prompt_tokens": 12, "completion_tokens": 30, "latency_s": 0.41,
               "messages": [...], "completion": [...]})
    log.close()

Each `write` appends one line (a JSON object, UTF-8, keys in the order given) and flushes it,
under a lock, so concurrent request handlers never interleave lines and a crash loses at most
the line being written. The text of a request - the keys in `TEXT_KEYS` ("prompt",
"messages", "completion"), at any depth of nested objects - is dropped unless the log was
opened with `log_prompts=True`: by default the log holds sizes, timings and outcomes, never
what users wrote or what the model answered. A "time" key (unix seconds) is added when the
record has none. Values JSON cannot represent natively are written as numbers (numpy scalars)
or as their `str`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

__all__ = ["RequestLog", "TEXT_KEYS"]

TEXT_KEYS = frozenset({"prompt", "messages", "completion"})


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items() if k not in TEXT_KEYS}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)


class RequestLog:
    """Thread-safe JSONL request log; `path=None` makes every call a no-op (module docstring)."""

    def __init__(self, path: str | os.PathLike | None, *, log_prompts: bool = False) -> None:
        self.path = None if path is None else os.fspath(path)
        self.log_prompts = bool(log_prompts)
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    @property
    def enabled(self) -> bool:
        """True while the log is open and writing."""
        return self._file is not None

    def write(self, record: dict) -> None:
        """Append `record` as one flushed line (text keys dropped unless log_prompts)."""
        if self._file is None:
            return
        if not isinstance(record, dict):
            raise TypeError(f"RequestLog.write takes a dict, got {type(record).__name__}")
        out = dict(record) if self.log_prompts else _redact(record)
        if "time" not in out:
            out["time"] = time.time()
        line = json.dumps(out, ensure_ascii=False, default=_json_default,
                          separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:  # closed while we serialised
                return
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        """Close the file; later writes are no-ops. Safe to call twice."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "RequestLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
