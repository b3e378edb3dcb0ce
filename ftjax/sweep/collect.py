"""Results read back from the runs' workdirs (never retyped): one row per run.

A row is `{"name", "stage", "params", "seed", "status", "metrics", "workdir", "record"}`;
`metrics` holds each metric path of the sweep config read from the run's files, `record`
the run record's pins (config hash, git commit and dirtiness, devices, wall and CPU time).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from ftjax import run_record
from ftjax import workdir as workdir_lib
from ftjax.sweep import runner
from ftjax.sweep import spec as spec_lib

__all__ = ["metric_value", "row_of", "collect", "RECORD_FIELDS"]

RECORD_FIELDS = ("config_hash", "status", "wall_s", "cpu_s")


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.lstrip("-").isdigit():
            try:
                obj = obj[int(part)]
            except IndexError:
                return None
        else:
            return None
    return obj


def curve(workdir: str, split: str, key: str,
          metrics_file: str = "metrics.jsonl") -> list[tuple[int, float]]:
    """(step, value) of one column of a run's metrics file."""
    try:
        text = workdir_lib.read_text(workdir, metrics_file)
    except (FileNotFoundError, OSError):
        return []
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") == split and key in row:
            out.append((int(row["step"]), float(row[key])))
    return out


def metric_value(path: str, summary: Optional[Mapping], record: Optional[Mapping],
                 workdir: str, metrics_file: str = "metrics.jsonl") -> Optional[float]:
    """A number from a run by metric path (spec.py's docstring lists the three kinds)."""
    if path.startswith("curve:"):
        body = path[len("curve:"):]
        col, _, agg = body.rpartition(":")
        if not col:
            col, agg = body, "last"
        split, _, key = col.rpartition("/")
        values = [v for _, v in curve(workdir, split, key, metrics_file)]
        if not values:
            return None
        fn = {"last": lambda v: v[-1], "min": min, "max": max,
              "mean": lambda v: sum(v) / len(v)}.get(agg)
        if fn is None:
            raise ValueError(f"metric path {path!r}: aggregate must be last|min|max|mean")
        return float(fn(values))
    if path.startswith("record."):
        value = _dig(record or {}, path[len("record."):])
    else:
        value = _dig(summary or {}, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def row_of(sweep: spec_lib.Sweep, run: spec_lib.Run) -> dict:
    wd = runner.workdir_of(sweep, run)
    record = run_record.read(wd)
    summary = None
    if record is not None and record.get("status") == "finished":
        try:
            summary = workdir_lib.read_json(wd, "summary.json")
        except (FileNotFoundError, OSError, ValueError):
            summary = None
    if workdir_lib.exists(wd, runner.PRUNED):
        status = "pruned"
    elif record is None:
        status = "pending"
    else:
        status = str(record.get("status"))
    metrics = {}
    for name, path in sweep.metrics.items():
        v = (metric_value(str(path), summary, record, wd, str(sweep.config.metrics_file))
             if record else None)
        if v is not None:
            metrics[name] = v
    pins = {}
    if record:
        pins = {k: record.get(k) for k in RECORD_FIELDS}
        code = record.get("code", {})
        pins.update(git_commit=code.get("git_commit"), git_dirty=code.get("git_dirty"),
                    devices=f"{record.get('devices', {}).get('count')}x"
                            f"{record.get('devices', {}).get('kind')}",
                    jax=record.get("packages", {}).get("jax"))
    return {"name": run.name, "stage": run.stage, "params": run.params, "seed": run.seed,
            "status": status, "metrics": metrics, "workdir": wd, "record": pins}


def collect(sweep: spec_lib.Sweep, runs: Sequence[spec_lib.Run]) -> list[dict]:
    return [row_of(sweep, r) for r in runs]
