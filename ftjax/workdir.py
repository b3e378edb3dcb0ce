"""Workdir paths on any filesystem `etils.epath` serves (local directories, `gs://`, `s3://`).

A workdir is never passed through `os.path` or `pathlib`: on a pod every worker must write to
the same bucket, not to its own local copy of `gs:/bucket/...`. Every file a run writes into
its workdir goes through these helpers (or through `epath.Path` directly):

    wd = workdir.path(workdir_str)                       # epath.Path, local or remote
    workdir.write_json(workdir_str, "summary.json", s)   # process 0 only, atomic where possible

Run files (config, summaries, metrics, reports) are written by process 0 only; checkpoints are
written collectively by orbax from every process.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any

from etils import epath

__all__ = ["path", "is_remote", "is_primary", "mkdir", "write_text", "write_bytes",
           "write_json", "read_text", "read_json", "exists"]


def path(workdir: str | os.PathLike[str], *parts: str) -> epath.Path:
    """`workdir` (a local path or a URL such as `gs://bucket/run`) joined with `parts`.

    Local paths are made absolute (user `~` expanded) so that the run does not depend on the
    current directory later; URLs are kept as they are.
    """
    if isinstance(workdir, epath.Path):
        p = workdir
    else:
        text = os.fspath(workdir)
        if not text:
            raise ValueError("workdir is empty: give a directory or a URL such as gs://bucket/run")
        p = epath.Path(text)
        if not is_remote(p):
            p = epath.Path(os.path.abspath(os.path.expanduser(text)))  # local only
    for part in parts:
        p = p / part
    return p


def is_remote(p: str | os.PathLike[str]) -> bool:
    """True for URLs (`gs://...`, `s3://...`): no append, no atomic rename, no local `open`."""
    return "://" in os.fspath(p)


def is_primary() -> bool:
    """True on JAX process 0 (and whenever JAX is not initialised across processes).

    Does not import JAX: a program that has not imported it (data tools) is one process.
    """
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def mkdir(workdir: str | os.PathLike[str], *parts: str) -> epath.Path:
    """Creates (parents included, existing is fine) and returns `path(workdir, *parts)`."""
    p = path(workdir, *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _write(p: epath.Path, data: str | bytes) -> None:
    """Writes `data` to `p` so a reader never sees half a file.

    Locally: a temporary sibling, then an atomic rename. On object stores an upload is already
    all-or-nothing (and rename is a copy), so the object is written directly.
    """
    p.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(p):
        with p.open(mode) as f:
            f.write(data)
        return
    tmp = p.parent / f".{p.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    with tmp.open(mode) as f:
        f.write(data)
    os.replace(os.fspath(tmp), os.fspath(p))  # local path: os.replace is atomic


def write_bytes(workdir: str | os.PathLike[str], name: str, data: str | bytes, *,
                all_processes: bool = False) -> epath.Path:
    """Writes `data` (bytes, or text) to `workdir/name` (process 0 only unless
    `all_processes`); returns the path."""
    p = path(workdir, name)
    if all_processes or is_primary():
        _write(p, data)
    return p


def write_text(workdir: str | os.PathLike[str], name: str, text: str, *,
               all_processes: bool = False) -> epath.Path:
    """Writes `text` to `workdir/name` (process 0 only unless `all_processes`); returns the path."""
    return write_bytes(workdir, name, text, all_processes=all_processes)


def write_json(workdir: str | os.PathLike[str], name: str, obj: Any, *,
               all_processes: bool = False, indent: int = 2) -> epath.Path:
    """Writes `obj` as JSON to `workdir/name` (process 0 only unless `all_processes`)."""
    return write_text(workdir, name, json.dumps(obj, indent=indent) + "\n",
                      all_processes=all_processes)


def read_text(workdir: str | os.PathLike[str], name: str = "") -> str:
    return (path(workdir, name) if name else path(workdir)).read_text()


def read_json(workdir: str | os.PathLike[str], name: str = "") -> Any:
    return json.loads(read_text(workdir, name))


def exists(workdir: str | os.PathLike[str], name: str = "") -> bool:
    return (path(workdir, name) if name else path(workdir)).exists()
