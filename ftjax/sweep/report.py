"""A sweep's report: results.md, results.json and PNG plots, read from its workdirs.

The sweep config's `analysis` section says what to show:

    c.analysis = dict(
        title="LoRA rank x alpha", description="...",
        group_by=("peft.method",),          # the best row within each group is bolded
        objective="em", direction="max",   # a config.metrics name
        fmt={"em": "pct"},                 # per-metric cell format
        plots=(dict(axis="peft.rank", metric="em", series_by=("peft.alpha",)),),
        curves=dict(split="finetune", key="loss",    # loss curves per run (metrics.jsonl),
                    label_by=("label.variant",)),   # legend by these params
        columns=("label.variant", "peft.rank"),     # params shown (default: every axis)
    )

For a `select` or `search` sweep the main table is the final stage (test split) and the
choice made on the validation split is shown beside it. Every report ends with what pins its
numbers: the runs' config hashes are in results.json, and the git commits, dirty trees,
devices, package versions and total wall/CPU time are summarised.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from ftjax.sweep import analysis, collect
from ftjax.sweep import spec as spec_lib

__all__ = ["ANALYSIS_DEFAULTS", "write"]

ANALYSIS_DEFAULTS = dict(title="", description="", group_by=(), objective="", direction="max",
                         fmt={}, plots=(), curves={}, columns=())


def _view(rows: list[dict], columns) -> list[dict]:
    """Rows whose params keep only `columns` (all when empty): for keys a label determines."""
    if not columns:
        return rows
    return [{**r, "params": {k: v for k, v in r["params"].items() if k in columns}}
            for r in rows]


def _section(sweep) -> dict:
    raw = dict(sweep.config.get("analysis", {}) or {})
    unknown = set(raw) - set(ANALYSIS_DEFAULTS)
    if unknown:
        raise ValueError(f"{sweep.path}: unknown analysis field(s) {sorted(unknown)}; known: "
                         f"{sorted(ANALYSIS_DEFAULTS)}")
    sec = {**ANALYSIS_DEFAULTS, **raw}
    sec["group_by"] = tuple(spec_lib._key(k) for k in sec["group_by"])  # pylint: disable=protected-access
    sec["fmt"] = dict(sec["fmt"])
    sec["columns"] = tuple(spec_lib._key(k) for k in sec["columns"])  # pylint: disable=protected-access
    return sec


def _present(metrics: list[str], groups: list[dict]) -> list[str]:
    """The metrics some group has a value of (a select table has no test columns)."""
    keep = [m for m in metrics
            if any(math.isfinite(g["stats"].get(m, {}).get("mean", math.nan)) for g in groups)]
    return keep or metrics


def _provenance(rows: list[dict], sweep) -> list[str]:
    recs = [r["record"] for r in rows if r.get("record")]
    commits = sorted({str(r.get("git_commit"))[:12] for r in recs})
    dirty = sum(1 for r in recs if r.get("git_dirty"))
    devices = sorted({str(r.get("devices")) for r in recs})
    jaxv = sorted({str(r.get("jax")) for r in recs})
    wall = sum(float(r.get("wall_s") or 0) for r in recs)
    cpu = sum(float(r.get("cpu_s") or 0) for r in recs)
    rel = os.path.relpath(sweep.path, spec_lib._root())  # pylint: disable=protected-access
    return [
        "## Provenance", "",
        f"- sweep file: `{rel}`; base config `{sweep.config.base}`"
        + (f" with `{' '.join(sweep.config.overrides)}`" if sweep.config.overrides else ""),
        f"- reproduce: `python -m ftjax.sweep run {rel}` (finished runs are skipped)",
        f"- {len(recs)} run records; code at commit(s) {', '.join(commits) or '-'}"
        f"{f' ({dirty} with a dirty tree)' if dirty else ' (clean trees)'}",
        f"- devices: {', '.join(devices) or '-'}; jax {', '.join(jaxv) or '-'}",
        f"- total wall time {wall / 60:.1f} min, CPU time {cpu / 60:.1f} min "
        "(per-run config hashes, times and commits in results.json)", ""]


def _trials_table(trials: list[dict], objective: str) -> list[str]:
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t["values"] if k not in keys]
    head = ["trial", *keys, "status", objective]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        vals = [spec_lib.fmt_value(t["values"].get(k, "")) for k in keys]
        v = t.get("value")
        lines.append("| " + " | ".join([t["name"], *vals, t["status"],
                                        "" if v is None else f"{v:.4g}"]) + " |")
    return lines


def write(sweep: spec_lib.Sweep, stage_runs: Callable[[Any, str], tuple], *,
          out: str | None = None) -> list[str]:
    """Writes results.md, results.json and the plots into `out` (default: the sweep's folder)."""
    out = out or str(sweep.config.out)
    os.makedirs(out, exist_ok=True)
    sec = _section(sweep)
    metrics = list(sweep.metrics)
    extra_md: list[str] = []
    stages: dict[str, list[dict]] = {}
    if "search" in sweep.config:
        from ftjax.sweep import search  # pylint: disable=import-outside-toplevel
        runs, _ = stage_runs(sweep, "search")
        stages["search"] = collect.collect(sweep, runs)
        ssec = search.search_section(sweep)
        trials = search.recorded_trials(sweep)
        extra_md += [f"## Search ({ssec['algorithm']}, {len(trials)} trials, objective "
                     f"{ssec['objective']} {ssec['direction']})", "",
                     *_trials_table(trials, ssec["objective"]), ""]
    elif "select" in sweep.config:
        stages["select"] = collect.collect(sweep, sweep.runs)
    else:
        stages[""] = collect.collect(sweep, sweep.runs)
    main_rows = stages.get("", [])
    if "select" in sweep.config or "search" in sweep.config:
        try:
            runs, _ = stage_runs(sweep, "final")
            stages["final"] = collect.collect(sweep, runs)
            main_rows = stages["final"]
        except ValueError as e:
            extra_md += [f"Final stage not available yet: {e}", ""]
            main_rows = stages.get("select", stages.get("search", []))
    if "select" in sweep.config:
        from ftjax.sweep import protocol  # pylint: disable=import-outside-toplevel
        psec = protocol.select_section(sweep)
        sel_groups = analysis.aggregate(stages["select"], metrics)
        try:
            sel_best = protocol.choose(stages["select"], psec["objective"], psec["direction"],
                                       psec["group_by"], psec["tiebreak"],
                                       psec["tiebreak_direction"])
        except ValueError:
            sel_best = None  # not every group has a finished run yet
        tie = (f", ties broken by the mean {psec['tiebreak']} ({psec['tiebreak_direction']})"
               if psec["tiebreak"] else "")
        extra_md += [analysis.results_markdown(
            sel_groups, _present(metrics, sel_groups), title="Selection on the validation split",
            description=(f"Stage `select`: every run scores the validation split only; the "
                         f"bold row of each {', '.join(psec['group_by']) or 'sweep'} group has "
                         f"the best mean {psec['objective']}{tie} and is re-run with seeds "
                         f"{tuple(psec['seeds'])} in the final stage above."),
            best=sel_best, fmt=sec["fmt"], rows=stages["select"]).replace(
                "# Selection", "## Selection", 1)]
    main_rows = _view(main_rows, sec["columns"])
    groups = analysis.aggregate(main_rows, metrics)
    best = (analysis.best_per_group(groups, list(sec["group_by"]), sec["objective"],
                                    sec["direction"]) if sec["objective"] else None)
    title = sec["title"] or f"Sweep {sweep.name}"
    md = analysis.results_markdown(groups, _present(metrics, groups), title=title,
                                   description=sec["description"], best=best,
                                   fmt=sec["fmt"], rows=main_rows)
    written = []
    plot_lines = []
    for i, p in enumerate(sec["plots"]):
        p = dict(p)
        name = p.pop("file", f"plot_{p['metric']}_vs_{p['axis'].split('.')[-1]}.png")
        try:
            analysis.plot_metric_vs_axis(groups, spec_lib._key(p.pop("axis")),  # pylint: disable=protected-access
                                         p.pop("metric"), os.path.join(out, name), **p)
            written.append(os.path.join(out, name))
            plot_lines.append(f"![{name}]({name})")
        except ValueError as e:
            plot_lines.append(f"- plot {i} not drawn: {e}")
    if sec["curves"]:
        c = dict(sec["curves"])
        c.setdefault("metrics_file", str(sweep.config.metrics_file))
        name = c.pop("file", "loss_curves.png")
        label_by = tuple(spec_lib._key(k) for k in c.pop("label_by", ()))  # pylint: disable=protected-access
        _, n = analysis.plot_loss_curves(_view(main_rows, label_by), os.path.join(out, name),
                                         **c)
        written.append(os.path.join(out, name))
        plot_lines.append(f"![{name}]({name}) ({n} runs)")
    doc = [md.rstrip(), ""]
    if plot_lines:
        doc += ["## Plots", "", *plot_lines, ""]
    doc += [*extra_md]
    doc += _provenance([r for rows in stages.values() for r in rows], sweep)
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(doc).rstrip() + "\n")
    base = str(sweep.config.dir)
    rows_json = []
    for stage, rows in stages.items():
        for r in rows:
            r = dict(r)
            r["workdir"] = os.path.relpath(r["workdir"], base) if "://" not in r["workdir"] \
                else r["workdir"]
            rows_json.append(r)
    json_path = os.path.join(out, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"sweep": sweep.name, "base": sweep.config.base,
                   "overrides": list(sweep.config.overrides),
                   "metrics": sweep.metrics, "runs": rows_json}, f, indent=1,
                  sort_keys=True, default=str)
    return [md_path, json_path] + written
