"""The honest protocol: choose on the validation split, score the test split once, at the end.

A sweep with a `select` section runs in two stages:

  select  the sweep's runs (`get_sweep(h)`), which score only the validation split (the base
          config or `overrides` must say so, e.g. the quickstart's `data.val_frac` > 0 and
          `data.score_test=False`);
  final   for each group (`select.group_by`, e.g. the PEFT method) the axis values with the
          best mean `select.objective` over the select runs' seeds, run again with
          `select.seeds` and `select.overrides` (e.g. `data.score_test=True`): the only runs
          that ever look at the test split.

    c.select = dict(objective="val_em", direction="max", group_by=("peft.method",),
                    seeds=(0, 1, 2), overrides=("data.score_test=True",),
                    tiebreak="val_loss", tiebreak_direction="min")

`search` (ftjax/sweep/search.py) ends the same way: its best trial's values become the
final stage.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ftjax.sweep import analysis
from ftjax.sweep import spec as spec_lib

__all__ = ["SELECT_DEFAULTS", "select_section", "choose", "final_runs"]

SELECT_DEFAULTS = dict(objective="", direction="max", group_by=(), seeds=(0, 1, 2),
                       overrides=(), tiebreak="", tiebreak_direction="min")


def select_section(sweep: spec_lib.Sweep) -> dict:
    """The sweep's `select` section with defaults; refuses an objective that is not a metric."""
    raw = dict(sweep.config.get("select", {}) or {})
    unknown = set(raw) - set(SELECT_DEFAULTS)
    if unknown:
        raise ValueError(f"{sweep.path}: unknown select field(s) {sorted(unknown)}; known: "
                         f"{sorted(SELECT_DEFAULTS)}")
    sec = {**SELECT_DEFAULTS, **raw}
    if sec["objective"] not in sweep.metrics:
        raise ValueError(f"{sweep.path}: select.objective {sec['objective']!r} is not one of "
                         f"config.metrics {sorted(sweep.metrics)}")
    for k in ("direction", "tiebreak_direction"):
        if sec[k] not in ("max", "min"):
            raise ValueError(f"{sweep.path}: select.{k} must be 'max' or 'min'")
    if sec["tiebreak"] and sec["tiebreak"] not in sweep.metrics:
        raise ValueError(f"{sweep.path}: select.tiebreak {sec['tiebreak']!r} is not one of "
                         f"config.metrics {sorted(sweep.metrics)}")
    sec["group_by"] = tuple(spec_lib._key(k) for k in sec["group_by"])  # pylint: disable=protected-access
    return sec


def choose(rows: Sequence[dict], objective: str, direction: str, group_by: Sequence[str],
           tiebreak: str = "", tiebreak_direction: str = "min") -> list[dict]:
    """The best params per group among finished rows: the best mean `objective` over seeds,
    ties (e.g. several settings at 100% validation exact match) broken by the mean
    `tiebreak`, then by sweep order. Raises when a group has no finished run, naming it."""
    metrics = [objective] + ([tiebreak] if tiebreak else [])
    groups = analysis.aggregate([r for r in rows if r["status"] == "finished"], metrics)

    def signed(g: dict, metric: str, how: str) -> float:
        m = g["stats"].get(metric, {}).get("mean", math.nan)
        return -math.inf if not math.isfinite(m) else (m if how == "max" else -m)

    parts: dict[tuple, list[dict]] = {}
    for g in groups:
        parts.setdefault(tuple(repr(g["params"].get(k)) for k in group_by), []).append(g)
    best = []
    for gs in parts.values():
        win = max(gs, key=lambda g: (signed(g, objective, direction),
                                     signed(g, tiebreak, tiebreak_direction) if tiebreak else 0))
        if signed(win, objective, direction) == -math.inf:
            continue
        best.append({**win, "partition": {k: win["params"].get(k) for k in group_by},
                     "objective": objective, "direction": direction})
    wanted = {tuple((k, repr(r["params"].get(k))) for k in group_by) for r in rows}
    got = {tuple((k, repr(g["params"].get(k))) for k in group_by) for g in best}
    missing = wanted - got
    if missing:
        raise ValueError("cannot choose for group(s) "
                         + ", ".join(",".join(f"{k}={v}" for k, v in m) for m in sorted(missing))
                         + f": no finished run has {objective!r}; run the select stage first "
                           "(python -m ftjax.sweep run ...) and check its failed runs")
    return best


def final_runs(sweep: spec_lib.Sweep, chosen: Sequence[Mapping[str, Any]],
               seeds: Sequence[int]) -> list[spec_lib.Run]:
    """The final stage: each chosen params dict with each seed."""
    seed_key = str(sweep.config.seed_key)
    points = [{**dict(g["params"]), seed_key: int(s)} for g in chosen for s in seeds]
    return spec_lib.make_runs(points, stage="final", seed_key=seed_key)
