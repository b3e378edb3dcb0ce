"""A sweep's collected runs -> `results.md` (mean ± t-interval over seeds) and PNG plots.

    groups = aggregate(rows, ["exact_match_after", "final_eval_loss"])
    best = best_per_group(groups, ["peft.method"], "exact_match_after", "max")
    md = results_markdown(groups, ["exact_match_after", "final_eval_loss"], title="LoRA variants",
                          best=best, rows=rows, fmt={"exact_match_after": "pct"})
    plot_metric_vs_axis(groups, "peft.rank", "exact_match_after", "out/rank.png")
    plot_loss_curves(rows, "out/loss.png", split="finetune")

A row is one run as the sweep's collector gives it: `{"name", "stage", "params", "seed",
"status", "metrics", "workdir", "record"}`. Only finished runs are counted; rows with the same
stage and params (different seeds) form one group. Plots use matplotlib's Agg backend,
imported only when a plot is drawn.
"""
from __future__ import annotations

import io
import math
import numbers
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from ftjax import plots as plots_lib
from ftjax import workdir as workdir_lib

Row = dict[str, Any]
Group = dict[str, Any]

__all__ = ["mean_ci", "aggregate", "best_per_group", "format_stat", "results_markdown",
           "plot_metric_vs_axis", "plot_loss_curves", "write_report"]

FINISHED = "finished"


# -- statistics -------------------------------------------------------------------------------

def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and Student-t confidence interval (n-1 dof, sample std with ddof=1) over `values`.

    Non-finite values (and None) are left out and counted in `n_nonfinite`. With one value
    `std`, `half`, `lo` and `hi` are nan: one run gives no interval, never a zero-width one.
    With none, `mean` is nan too. Returns `{mean, lo, hi, half, n, std, n_nonfinite,
    confidence}`.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    vals = [float(v) for v in values if v is not None]
    finite = np.asarray([v for v in vals if math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    nan = float("nan")
    out = {"mean": nan, "lo": nan, "hi": nan, "half": nan, "n": n, "std": nan,
           "n_nonfinite": len(vals) - n + sum(1 for v in values if v is None),
           "confidence": confidence}
    if n == 0:
        return out
    mean = float(finite.mean())
    out["mean"] = mean
    if n == 1:
        return out
    std = float(finite.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    out.update(std=std, half=half, lo=mean - half, hi=mean + half)
    return out


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a param value (lists and dicts included)."""
    if isinstance(value, Mapping):
        return ("__dict__",) + tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("__seq__",) + tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _group_key(stage: str, params: Mapping[str, Any]) -> tuple:
    return (stage or "", tuple(sorted((k, _freeze(v)) for k, v in params.items())))


def aggregate(rows: Sequence[Row], metrics: Sequence[str], *,
              confidence: float = 0.95) -> list[Group]:
    """Groups the finished rows by (stage, full params dict) and computes `mean_ci` per metric.

    Rows with identical stage and params and different seeds form one group. Rows whose
    status is not "finished" are ignored (list them with `results_markdown(..., rows=rows)`).
    A finished run lacking a metric is left out of that metric's statistics only.
    Returns groups in first-seen order: `{stage, params, n_runs, seeds, names, stats}`
    with `stats[metric]` the output of `mean_ci`.
    """
    groups: dict[tuple, Group] = {}
    values: dict[tuple, dict[str, list]] = {}
    for row in rows:
        if row.get("status") != FINISHED:
            continue
        stage, params = row.get("stage") or "", dict(row.get("params") or {})
        key = _group_key(stage, params)
        if key not in groups:
            groups[key] = {"stage": stage, "params": params, "n_runs": 0, "seeds": [],
                           "names": [], "stats": {}}
            values[key] = {m: [] for m in metrics}
        g = groups[key]
        g["n_runs"] += 1
        g["seeds"].append(row.get("seed"))
        g["names"].append(row.get("name"))
        row_metrics = row.get("metrics") or {}
        for m in metrics:
            if m in row_metrics:
                values[key][m].append(row_metrics[m])
    for key, g in groups.items():
        g["stats"] = {m: mean_ci(values[key][m], confidence) for m in metrics}
    return list(groups.values())


def best_per_group(groups: Sequence[Group], by: Sequence[str] | str | None, objective: str,
                   direction: str = "max") -> list[Group]:
    """For each partition of `groups` by the values of param keys `by`, the best group.

    Best: the highest (`direction="max"`) or lowest ("min") mean of `objective`; ties go
    to the first seen, and a non-finite mean never wins (a partition with no finite mean has
    no entry). `by` empty or None: one partition. Partitions come in first-seen order.
    Each entry is a copy of the winning group plus `partition` ({key: value}), `objective`
    and `direction`.
    """
    if direction not in ("max", "min"):
        raise ValueError(f"direction must be 'max' or 'min', got {direction!r}")
    by = [by] if isinstance(by, str) else list(by or [])
    best: dict[tuple, Group] = {}
    order: list[tuple] = []
    for g in groups:
        part = tuple(_freeze(g["params"].get(k)) for k in by)
        if part not in order:
            order.append(part)
        stat = g["stats"].get(objective)
        if stat is None:
            raise KeyError(f"objective {objective!r} was not aggregated "
                           f"(metrics: {sorted(g['stats'])})")
        mean = stat["mean"]
        if not math.isfinite(mean):
            continue
        cur = best.get(part)
        if cur is None:
            best[part] = g
            continue
        cur_mean = cur["stats"][objective]["mean"]
        if (mean > cur_mean) if direction == "max" else (mean < cur_mean):
            best[part] = g
    out = []
    for part in order:
        if part in best:
            g = best[part]
            out.append({**g, "partition": {k: g["params"].get(k) for k in by},
                        "objective": objective, "direction": direction})
    return out


# -- markdown ---------------------------------------------------------------------------------

Fmt = str | Callable[[float], str]


def _fmt_param(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):g}"
    return str(value)


def _md(text: str) -> str:
    """Escapes a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt_number(x: float, fmt: Fmt | None, half: bool = False) -> str:
    if callable(fmt):
        return fmt(x)
    if fmt == "pct":
        return f"{100.0 * x:.1f}" if half else f"{100.0 * x:.1f}%"
    return format(x, fmt or ".4g")


def format_stat(stat: Mapping[str, Any] | None, fmt: Fmt | None = None, n_runs: int | None = None) -> str:
    """One table cell: `mean ± half`, `mean (n=1)` or `—`; notes runs missing or non-finite.

    `fmt`: None (4 significant digits), "pct" (`93.0% ± 2.1`: percent, half-width in
    percentage points), another format spec (".3f") or a callable on floats.
    """
    if stat is None or stat["n"] == 0:
        text = "—"
    elif stat["n"] == 1:
        text = f"{_fmt_number(stat['mean'], fmt)} (n=1)"
    else:
        text = f"{_fmt_number(stat['mean'], fmt)} ± {_fmt_number(stat['half'], fmt, half=True)}"
    notes = []
    if stat is not None and n_runs is not None:
        missing = n_runs - stat["n"] - stat.get("n_nonfinite", 0)
        if stat["n"] > 1 and stat["n"] != n_runs:
            notes.append(f"n={stat['n']}")
        if missing > 0:
            notes.append(f"{missing} missing")
    if stat is not None and stat.get("n_nonfinite"):
        notes.append(f"{stat['n_nonfinite']} non-finite")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _param_keys(groups: Sequence[Group], axes_order: Sequence[str] | None) -> list[str]:
    keys: list[str] = list(axes_order or [])
    for g in groups:
        for k in g["params"]:
            if k not in keys:
                keys.append(k)
    return keys


def _table(header: Sequence[str], right: Sequence[bool], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in cells) + " |" for cells in body]
    return lines


def _bold(text: str) -> str:
    return f"**{text}**" if text else text


def results_markdown(groups: Sequence[Group], metrics: Sequence[str], *, title: str,
                     description: str = "", best: Sequence[Group] | None = None,
                     axes_order: Sequence[str] | None = None,
                     fmt: Mapping[str, Fmt] | None = None,
                     rows: Sequence[Row] | None = None) -> str:
    """A markdown document: title, description, one table of all groups, a "best per group"
    table (when `best`, the output of `best_per_group`, is given; its rows are also bold in the
    main table) and the runs not counted (when `rows` is given: every row not "finished").

    Param columns follow `axes_order` first, then first-seen order; a "stage" column appears
    when any group has a stage. `fmt`: `{metric: "pct" | format spec | callable}`.
    """
    fmt = dict(fmt or {})
    keys = _param_keys(groups, axes_order)
    with_stage = any(g.get("stage") for g in groups)
    best_keys = {_group_key(b.get("stage", ""), b["params"]) for b in (best or [])}
    conf = next((s.get("confidence", 0.95) for g in groups for s in g["stats"].values()), 0.95)
    ci = f"{100 * conf:g}%"

    out = [f"# {title}", ""]
    if description:
        out += [description.strip(), ""]
    if groups:
        header = (["stage"] if with_stage else []) + keys + list(metrics) + ["n"]
        right = [False] * (len(header) - len(metrics) - 1) + [True] * (len(metrics) + 1)
        body = []
        for g in groups:
            cells = ([g.get("stage", "")] if with_stage else []) + \
                [_fmt_param(g["params"][k]) if k in g["params"] else "" for k in keys] + \
                [format_stat(g["stats"].get(m), fmt.get(m), g["n_runs"]) for m in metrics] + \
                [str(g["n_runs"])]
            if _group_key(g.get("stage", ""), g["params"]) in best_keys:
                cells = [_bold(c) for c in cells]
            body.append(cells)
        out += _table(header, right, body)
        out.append("")
        foot = (f"Cells: mean ± half-width of the {ci} t-interval over seeds (n runs); "
                "`(n=1)`: a single run, no interval.")
        if best:
            b0 = best[0]
            within = ", ".join(b0["partition"])
            foot += (f" Bold: the best mean {b0['objective']} ({b0['direction']})"
                     + (f" within each {within}." if within else "."))
        out += [foot, ""]
    else:
        out += ["No finished runs.", ""]

    if best:
        objective, part_keys = best[0]["objective"], list(best[0]["partition"])
        rest = [k for k in keys if k not in part_keys]
        header = part_keys + rest + [objective, "n"]
        right = [False] * (len(part_keys) + len(rest)) + [True, True]
        body = [[_fmt_param(b["partition"][k]) for k in part_keys]
                + [_fmt_param(b["params"][k]) if k in b["params"] else "" for k in rest]
                + [format_stat(b["stats"][objective], fmt.get(objective), b["n_runs"]),
                   str(b["n_runs"])] for b in best]
        out += [f"## Best per group ({objective}, {best[0]['direction']})", ""]
        out += _table(header, right, body)
        out.append("")

    not_counted = [r for r in (rows or []) if r.get("status") != FINISHED]
    if not_counted:
        out += ["## Runs not counted", ""]
        for r in not_counted:
            seed = "" if r.get("seed") is None else f", seed {r['seed']}"
            stage = f"{r['stage']}: " if r.get("stage") else ""
            out.append(f"- {stage}`{r.get('name')}`: {r.get('status')}{seed}")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# -- plots ------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def _save(fig, path: str | os.PathLike[str]) -> str:
    """Writes `fig` as a PNG to `path` (local or a URL, as `ftjax.plots` does); closes it."""
    plt = _pyplot()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out = workdir_lib.path(path)
    workdir_lib.write_bytes(out.parent, out.name, png.getvalue(), all_processes=True)
    return os.fspath(path)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _label(params: Mapping[str, Any], stage: str = "") -> str:
    text = ", ".join(f"{k}={_fmt_param(v)}" for k, v in params.items())
    return f"{stage}: {text}" if stage and text else (stage or text)


def _colours(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_metric_vs_axis(groups: Sequence[Group], axis: str, metric: str,
                        path: str | os.PathLike[str], *,
                        series_by: Sequence[str] | str | None = None, log_x: bool | None = None,
                        title: str | None = None) -> str:
    """A PNG of `metric` (mean, error bars = CI half-width) against param `axis`.

    Numeric axis values: lines, log x when all are positive and span over 20x (unless
    `log_x`); otherwise categorical positions in first-seen order, markers only. One series
    per distinct value of the `series_by` keys, or (None) per combination of all other params
    (and stage, when groups have several). Single-run points have no error bar. Groups lacking
    `axis` or with no finite mean are left out. Returns `path`.
    """
    plt = _pyplot()
    series_by = [series_by] if isinstance(series_by, str) else series_by
    with_stage = len({g.get("stage", "") for g in groups}) > 1
    series: dict[tuple, dict] = {}
    for g in groups:
        if axis not in g["params"]:
            continue
        stat = g["stats"].get(metric)
        if stat is None:
            raise KeyError(f"metric {metric!r} was not aggregated (metrics: {sorted(g['stats'])})")
        if not math.isfinite(stat["mean"]):
            continue
        keys = list(series_by) if series_by is not None else \
            [k for k in g["params"] if k != axis]
        sp = {k: g["params"].get(k) for k in keys}
        stage = g.get("stage", "") if (with_stage and series_by is None) else ""
        skey = (stage, tuple((k, _freeze(v)) for k, v in sp.items()))
        s = series.setdefault(skey, {"label": _label(sp, stage), "pts": []})
        s["pts"].append((g["params"][axis], stat["mean"], stat["half"]))
    if not series:
        raise ValueError(f"plot_metric_vs_axis({os.fspath(path)!r}): no group has {axis!r} "
                         f"and a finite mean of {metric!r}")

    xs_all = [x for s in series.values() for x, _, _ in s["pts"]]
    numeric = all(_is_number(x) for x in xs_all)
    cats: list = []
    if not numeric:
        for x in xs_all:
            if _freeze(x) not in [_freeze(c) for c in cats]:
                cats.append(x)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = _colours(len(series))
    n_series = len(series)
    conf = next((st.get("confidence", 0.95) for g in groups for st in g["stats"].values()), 0.95)
    for i, s in enumerate(series.values()):
        if numeric:
            pts = sorted(s["pts"], key=lambda p: float(p[0]))
            xs = [float(p[0]) for p in pts]
        else:
            pts = s["pts"]
            index = [[_freeze(c) for c in cats].index(_freeze(p[0])) for p in pts]
            dodge = 0.0 if n_series == 1 else (i - (n_series - 1) / 2) * min(0.6 / n_series, 0.15)
            xs = [j + dodge for j in index]
        ys = [p[1] for p in pts]
        yerr = [p[2] if math.isfinite(p[2]) else np.nan for p in pts]
        ax.errorbar(xs, ys, yerr=yerr, label=s["label"] or None, color=colours[i],
                    marker="o", markersize=4, capsize=3,
                    linestyle="-" if numeric else "none")
    if numeric:
        positive = [float(x) for x in xs_all if float(x) > 0]
        use_log = log_x if log_x is not None else (
            len(positive) == len(xs_all) and max(positive) > 20 * min(positive))
        if use_log:
            ax.set_xscale("log")
            ticks = sorted({float(x) for x in xs_all})
            if len(ticks) <= 12:
                ax.set_xticks(ticks)
                ax.set_xticklabels([_fmt_param(t) for t in ticks])
                ax.minorticks_off()
    else:
        labels = [_fmt_param(c) for c in cats]
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(labels, rotation=30 if sum(len(t) for t in labels) > 40 else 0,
                           ha="right" if sum(len(t) for t in labels) > 40 else "center")
        ax.set_xlim(-0.5, len(cats) - 0.5)
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs {axis} (mean ± {100 * conf:g}% CI over seeds)",
                 fontsize=10, wrap=True)
    ax.grid(True, alpha=0.3)
    if any(s["label"] for s in series.values()):
        ax.legend(fontsize="small" if n_series > 6 else None)
    return _save(fig, path)


def plot_loss_curves(rows: Sequence[Row], path: str | os.PathLike[str], *, split: str = "train",
                     key: str = "loss", eval_split: str | None = None,
                     eval_key: str | None = None, max_runs: int = 60, title: str | None = None,
                     metrics_file: str = "metrics.jsonl") -> tuple[str, int]:
    """Training curves of many runs in one PNG, read from each row's `workdir/metrics_file`.

    One line per run (lines of `split` and `key`; the eval curve, `eval_split`/`eval_key`
    with `eval_key` defaulting to `"eval_" + key`, dashed in the same colour). Runs with the
    same stage and params (seeds) share a colour and one legend entry. Rows of any status are
    drawn (a diverged run's curve is the interesting one); only the first `max_runs` rows are
    read. Rows whose file is missing, unreadable or without points are skipped; the title says
    how many. Returns `(path, number of runs plotted)`; with none, the PNG says so.
    """
    plt = _pyplot()
    if eval_split is not None and eval_key is None:
        eval_key = f"eval_{key}"
    considered = list(rows)[:max(0, max_runs)]
    curves: list[tuple[tuple, str, plots_lib.Curve, plots_lib.Curve | None]] = []
    skipped = 0
    for row in considered:
        wd = row.get("workdir")
        try:
            file = workdir_lib.path(wd, metrics_file) if wd else None
            if file is None or not file.exists():
                skipped += 1
                continue
            train = plots_lib.read_curve(file, split, key)
            ev = plots_lib.read_curve(file, eval_split, eval_key) if eval_split else None
        except (OSError, ValueError):
            skipped += 1
            continue
        if not train[0] and not (ev and ev[0]):
            skipped += 1
            continue
        gkey = _group_key(row.get("stage") or "", row.get("params") or {})
        curves.append((gkey, _label(row.get("params") or {}, row.get("stage") or ""), train, ev))

    group_order: list[tuple] = []
    for gkey, *_ in curves:
        if gkey not in group_order:
            group_order.append(gkey)
    colours = dict(zip(group_order, _colours(len(group_order))))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn: list[float] = []
    labelled: set = set()
    for gkey, label, train, ev in curves:
        for curve, style in ((train, "-"), (ev, "--")):
            if not curve or not curve[0]:
                continue
            pts = [(s, v) for s, v in zip(*curve) if math.isfinite(v)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            drawn += ys
            first = gkey not in labelled
            labelled.add(gkey)
            ax.plot(xs, ys, linestyle=style, color=colours[gkey], alpha=0.8, linewidth=1.2,
                    marker="o" if len(pts) < 30 else None, markersize=2.5,
                    label=(label or "run") if first else None)
    n_plotted = len(curves)
    if n_plotted == 0:
        ax.text(0.5, 0.5, f"no {split}/{key} curves found", ha="center", va="center",
                transform=ax.transAxes)
    positive = [v for v in drawn if v > 0]
    if positive and len(positive) == len(drawn) and max(positive) > 20 * min(positive):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key + (f" (dashed: {eval_split}/{eval_key})" if eval_split else ""))
    head = title or f"{split}/{key}"
    notes = [f"{n_plotted} runs"]
    if len(rows) > len(considered):
        notes.append(f"first {len(considered)} of {len(rows)}")
    if skipped:
        notes.append(f"{skipped} without curves skipped")
    ax.set_title(f"{head} ({'; '.join(notes)})", fontsize=10, wrap=True)
    ax.grid(True, alpha=0.3)
    if labelled:
        ax.legend(fontsize="small" if len(labelled) > 6 else None,
                  ncol=2 if len(labelled) > 12 else 1)
    return _save(fig, path), n_plotted


# -- report -----------------------------------------------------------------------------------

def write_report(groups: Sequence[Group], rows: Sequence[Row], out_dir: str | os.PathLike[str], *,
                 metrics: Sequence[str], title: str, description: str = "",
                 by: Sequence[str] | str | None = None, objective: str | None = None,
                 direction: str = "max", plots: Sequence[Mapping[str, Any]] = (),
                 fmt: Mapping[str, Fmt] | None = None,
                 axes_order: Sequence[str] | None = None) -> list[str]:
    """Writes `out_dir/results.md` and the plots; returns their paths (results.md first).

    `plots`: dicts `{"kind": "metric_vs_axis", "axis", "metric", ...}` or
    `{"kind": "loss_curves", ...}`, other keys passed to `plot_metric_vs_axis` /
    `plot_loss_curves`; `"file"` names the PNG (default from kind, axis and metric). The
    PNGs are linked at the end of results.md. `objective` given: best per partition `by`.
    """
    best = best_per_group(groups, by, objective, direction) if objective else None
    written, links = [], []
    for spec in plots:
        spec = dict(spec)
        kind = spec.pop("kind")
        if kind == "metric_vs_axis":
            name = spec.pop("file", None) or f"{spec['metric']}_vs_{spec['axis']}.png"
            out = workdir_lib.path(out_dir, name)
            axis, metric = spec.pop("axis"), spec.pop("metric")
            plot_metric_vs_axis(groups, axis, metric, out, **spec)
            caption = f"{metric} vs {axis}"
        elif kind == "loss_curves":
            name = spec.pop("file", None) or \
                f"curves_{spec.get('split', 'train')}_{spec.get('key', 'loss')}.png"
            out = workdir_lib.path(out_dir, name)
            _, n = plot_loss_curves(rows, out, **spec)
            caption = f"{spec.get('split', 'train')}/{spec.get('key', 'loss')} curves ({n} runs)"
        else:
            raise ValueError(f"unknown plot kind {kind!r} (metric_vs_axis, loss_curves)")
        written.append(os.fspath(out))
        links.append(f"![{caption}]({name})")
    md = results_markdown(groups, metrics, title=title, description=description, best=best,
                          axes_order=axes_order, fmt=fmt, rows=rows)
    if links:
        md += "\n## Plots\n\n" + "\n\n".join(links) + "\n"
    md_path = workdir_lib.write_text(out_dir, "results.md", md, all_processes=True)
    return [os.fspath(md_path)] + written
