"""The record of a run's config: canonical JSON, its hash, and `config.json` in the workdir.

The hash identifies the *experiment*: the resolved config minus the runtime placement
(`distributed`: where processes meet and which one this is). Every process of one run, and
the same run resumed on another coordinator port or process layout, gets the same hash.
"""
from __future__ import annotations

import enum
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from ftjax import workdir as workdir_lib

log = logging.getLogger(__name__)

__all__ = ["to_jsonable", "config_hash", "write_resolved_config", "HASH_EXCLUDED"]

# Top-level sections recorded in config.json but left out of the hash: they say where the run
# executes (coordinator address, process id, local devices), not what it computes.
HASH_EXCLUDED = ("distributed",)


def to_jsonable(obj: Any, _path: str = "") -> Any:
    """Converts a ConfigDict (or nested value) to plain JSON types, deterministically.

    Tuples become lists, numpy/jax scalars Python numbers, dtypes their name, classes and
    functions `module.qualname`, enums `Class.NAME`, paths strings. Other objects raise
    TypeError naming the key, so a config never hashes something with a memory address in it.
    """
    if isinstance(obj, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        obj = obj.to_dict()
    if isinstance(obj, config_dict.FieldReference):
        obj = obj.get()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"config key {k!r} at {_path or '<root>'!r} is not a string")
            out[k] = to_jsonable(v, f"{_path}.{k}" if _path else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v, _path) for v in obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__name__}.{obj.name}"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # numpy / jax scalars and dtypes, without importing numpy here.
    if hasattr(obj, "dtype") and getattr(obj, "shape", None) == () and hasattr(obj, "item"):
        return obj.item()
    if type(obj).__name__.startswith("dtype") or type(obj).__module__ == "numpy.dtypes":
        return str(obj)
    if isinstance(obj, type) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        name = getattr(obj, "__qualname__", getattr(obj, "__name__", None))
        if name and "<" not in name:
            return f"{obj.__module__}.{name}"
    raise TypeError(
        f"config value at {_path or '<root>'!r} of type {type(obj).__name__} is not "
        f"JSON-serialisable; store a name or a number in the config instead"
    )


def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """First 12 hex chars of sha256 over the canonical JSON (sorted keys, tuples as lists).

    `_hash` and the sections in `HASH_EXCLUDED` (runtime placement) do not enter the hash.
    """
    data = to_jsonable(cfg)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "_hash" and k not in HASH_EXCLUDED}
    return hashlib.sha256(_canonical_json(data).encode()).hexdigest()[:12]


def write_resolved_config(
    cfg: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
) -> str:
    """Writes `config.json` (resolved config + "_hash") and `config_hash.txt` into `workdir`.

    `workdir` may be local or a URL (`gs://...`). Returns the hash. If `workdir/config.json`
    already holds a config with another hash (a run resumed with a changed config), the old
    file is kept as `config.<oldhash>.json` and a warning is logged. Only process 0 writes;
    every process gets the same hash.
    """
    data = to_jsonable(cfg)
    h = config_hash(data)
    if not workdir_lib.is_primary():
        return h
    wd = workdir_lib.mkdir(workdir)
    path = wd / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old_hash = old.get("_hash") or config_hash(old)
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            old_hash = "unreadable"
            log.warning("existing %s is not valid config JSON (%s)", path, e)
        if old_hash != h:
            backup = wd / f"config.{old_hash}.json"
            path.rename(backup)
            log.warning(
                "config changed in %s: previous config (hash %s) kept as %s; new hash %s",
                wd, old_hash, backup.name, h,
            )
    payload = dict(data)
    payload["_hash"] = h
    workdir_lib.write_text(wd, "config.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    workdir_lib.write_text(wd, "config_hash.txt", h + "\n")
    return h
