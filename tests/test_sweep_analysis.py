"""Sweep analysis (ftjax/sweep/analysis.py): t-intervals over seeds, grouping, best per group,
results.md and the PNG plots, on hand-made rows (no JAX)."""
import json
import math
import pathlib

import numpy as np
import pytest
from scipy import stats

from ftjax.sweep import analysis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(name, params, seed, status="finished", stage="", workdir="", **metrics):
    return {"name": name, "stage": stage, "params": dict(params), "seed": seed,
            "status": status, "metrics": metrics, "workdir": workdir, "record": {}}


def assert_png(path, min_bytes=5000):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


# -- mean_ci ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [[0.91, 0.93, 0.95, 0.90], [1.0, 2.0], [3.5, 3.1, 2.9, 3.3, 4.0]])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_mean_ci_matches_scipy_t_interval(values, confidence):
    ci = analysis.mean_ci(values, confidence)
    lo, hi = stats.t.interval(confidence, len(values) - 1, loc=np.mean(values),
                              scale=stats.sem(values))
    assert ci["n"] == len(values) and ci["n_nonfinite"] == 0
    assert ci["mean"] == pytest.approx(np.mean(values))
    assert ci["std"] == pytest.approx(np.std(values, ddof=1))
    assert ci["lo"] == pytest.approx(lo) and ci["hi"] == pytest.approx(hi)
    assert ci["half"] == pytest.approx((hi - lo) / 2)


def test_mean_ci_by_hand_n3():
    # [1, 2, 3]: mean 2, sample std 1, t_{0.975, 2 dof} = 4.302652729911275.
    ci = analysis.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0)
    assert ci["half"] == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert ci["lo"] == pytest.approx(2.0 - 2.484137717) and ci["hi"] == pytest.approx(2.0 + 2.484137717)


def test_mean_ci_single_value_has_no_interval():
    ci = analysis.mean_ci([0.7])
    assert ci["mean"] == 0.7 and ci["n"] == 1
    assert math.isnan(ci["half"]) and math.isnan(ci["lo"]) and math.isnan(ci["std"])


def test_mean_ci_excludes_and_counts_nonfinite():
    ci = analysis.mean_ci([1.0, float("nan"), 3.0, float("inf"), None])
    assert ci["n"] == 2 and ci["n_nonfinite"] == 3 and ci["mean"] == 2.0
    empty = analysis.mean_ci([float("nan")])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and empty["n_nonfinite"] == 1


# -- aggregate / best_per_group ---------------------------------------------------------------

ROWS = [
    row("lora-r4-s0", {"peft.method": "lora", "peft.rank": 4}, 0, acc=0.80, loss=0.50),
    row("lora-r4-s1", {"peft.method": "lora", "peft.rank": 4}, 1, acc=0.84, loss=0.40),
    row("lora-r16-s0", {"peft.method": "lora", "peft.rank": 16}, 0, acc=0.90, loss=0.30),
    row("lora-r16-s1", {"peft.method": "lora", "peft.rank": 16}, 1, acc=0.94, loss=0.20),
    row("lora-r16-s2", {"peft.method": "lora", "peft.rank": 16}, 2, status="failed", acc=0.0),
    row("dora-r4-s0", {"peft.method": "dora", "peft.rank": 4}, 0, acc=0.88, loss=0.35),
    row("dora-r4-s1", {"peft.method": "dora", "peft.rank": 4}, 1, acc=0.86, loss=0.33),
    row("dora-r16-s0", {"peft.method": "dora", "peft.rank": 16}, 0, status="pruned", acc=0.99),
    row("ia3-s0", {"peft.method": "ia3", "peft.rank": 0}, 0, acc=float("nan"), loss=9.0),
]


def test_aggregate_groups_seeds_and_ignores_unfinished():
    groups = analysis.aggregate(ROWS, ["acc", "loss"])
    assert [g["params"] for g in groups] == [
        {"peft.method": "lora", "peft.rank": 4}, {"peft.method": "lora", "peft.rank": 16},
        {"peft.method": "dora", "peft.rank": 4}, {"peft.method": "ia3", "peft.rank": 0}]
    assert [g["n_runs"] for g in groups] == [2, 2, 2, 1]
    assert groups[1]["seeds"] == [0, 1]  # the failed seed 2 is not counted
    assert groups[1]["stats"]["acc"]["mean"] == pytest.approx(0.92)
    assert groups[1]["stats"]["acc"]["half"] == pytest.approx(
        stats.t.ppf(0.975, 1) * np.std([0.90, 0.94], ddof=1) / math.sqrt(2))
    assert groups[3]["stats"]["acc"]["n_nonfinite"] == 1 and groups[3]["stats"]["acc"]["n"] == 0


def test_aggregate_separates_stages_and_tolerates_missing_metrics():
    rows = [row("a", {"x": 1}, 0, stage="select", m=1.0),
            row("b", {"x": 1}, 0, stage="final", m=2.0),
            row("c", {"x": 1}, 1, stage="final"),  # finished, metric missing
            row("d", {"x": [1, 2]}, 0, m=3.0)]      # unhashable param values
    groups = analysis.aggregate(rows, ["m"])
    assert [(g["stage"], g["n_runs"], g["stats"]["m"]["n"]) for g in groups] == [
        ("select", 1, 1), ("final", 2, 1), ("", 1, 1)]


def test_best_per_group_max_min_and_nan():
    groups = analysis.aggregate(ROWS, ["acc", "loss"])
    best = analysis.best_per_group(groups, ["peft.method"], "acc", "max")
    # ia3's only mean is NaN: no winner in that partition.
    assert [(b["partition"], b["params"]["peft.rank"]) for b in best] == [
        ({"peft.method": "lora"}, 16), ({"peft.method": "dora"}, 4)]
    assert best[0]["objective"] == "acc" and best[0]["direction"] == "max"
    worst = analysis.best_per_group(groups, ["peft.method"], "acc", "min")
    assert [b["params"]["peft.rank"] for b in worst] == [4, 4]
    overall = analysis.best_per_group(groups, None, "loss", "min")
    assert len(overall) == 1 and overall[0]["params"] == {"peft.method": "lora", "peft.rank": 16}
    # A tie goes to the first seen group.
    tied = analysis.aggregate([row("p", {"k": 1}, 0, m=1.0), row("q", {"k": 2}, 0, m=1.0)], ["m"])
    assert analysis.best_per_group(tied, [], "m", "max")[0]["params"] == {"k": 1}
    with pytest.raises(ValueError):
        analysis.best_per_group(groups, [], "acc", "up")


# -- markdown ---------------------------------------------------------------------------------

def test_results_markdown_cells_bold_best_and_not_counted():
    groups = analysis.aggregate(ROWS, ["acc", "loss"])
    best = analysis.best_per_group(groups, ["peft.method"], "acc", "max")
    md = analysis.results_markdown(groups, ["acc", "loss"], title="PEFT methods",
                                   description="Which adapter wins.", best=best,
                                   fmt={"acc": "pct"}, rows=ROWS)
    half16 = 100 * stats.t.ppf(0.975, 1) * np.std([0.90, 0.94], ddof=1) / math.sqrt(2)
    half4 = 100 * stats.t.ppf(0.975, 1) * np.std([0.80, 0.84], ddof=1) / math.sqrt(2)
    assert md.startswith("# PEFT methods\n\nWhich adapter wins.\n")
    assert f"92.0% ± {half16:.1f}" in md
    assert f"82.0% ± {half4:.1f}" in md
    loss_half = stats.t.ppf(0.975, 1) * np.std([0.5, 0.4], ddof=1) / math.sqrt(2)
    assert f"0.45 ± {loss_half:.4g}" in md
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("| lora") or ln.startswith("| **lora")]
    assert table[1].startswith("| **lora** | **16** | **92.0% ± ")  # best lora row in bold
    assert not table[0].startswith("| **")
    ia3 = next(ln for ln in lines if ln.startswith("| ia3"))
    assert "— (1 non-finite)" in ia3 and "9 (n=1)" in ia3
    assert "mean ± half-width of the 95% t-interval over seeds (n runs)" in md
    assert "## Best per group" in md
    assert "## Runs not counted" in md
    assert "- `lora-r16-s2`: failed, seed 2" in md and "- `dora-r16-s0`: pruned, seed 0" in md


def test_results_markdown_without_best_has_no_bold():
    groups = analysis.aggregate(ROWS[:4], ["acc"])
    md = analysis.results_markdown(groups, ["acc"], title="t", axes_order=["peft.rank"])
    assert "**" not in md and "Best per group" not in md and "not counted" not in md
    assert "| peft.rank | peft.method | acc | n |" in md
    assert "0.82 ± " in md  # default: 4 significant digits


# -- plots ------------------------------------------------------------------------------------

def test_plot_metric_vs_numeric_axis(tmp_path):
    rows = [row(f"r{r}-s{s}", {"method": m, "lr": r}, s, acc=0.5 + 0.1 * s + 1e-3 * r)
            for m in ("lora", "dora") for r in (1e-5, 1e-4, 1e-3) for s in (0, 1, 2)]
    rows.append(row("single", {"method": "ia3", "lr": 1e-4}, 0, acc=0.7))  # n=1: no error bar
    groups = analysis.aggregate(rows, ["acc"])
    out = analysis.plot_metric_vs_axis(groups, "lr", "acc", tmp_path / "lr.png")
    assert out == str(tmp_path / "lr.png")
    assert_png(out)
    out2 = analysis.plot_metric_vs_axis(groups, "lr", "acc", tmp_path / "lr2.png",
                                        series_by="method", log_x=False, title="custom")
    assert_png(out2)


def test_plot_metric_vs_categorical_axis(tmp_path):
    rows = [row(f"{m}-{s}", {"method": m, "rank": r}, s, acc=0.6 + 0.05 * s)
            for m in ("lora", "dora", "ia3") for r in (4, 8) for s in (0, 1)]
    groups = analysis.aggregate(rows, ["acc"])
    assert_png(analysis.plot_metric_vs_axis(groups, "method", "acc", tmp_path / "m.png"))
    with pytest.raises(ValueError):
        analysis.plot_metric_vs_axis(groups, "no_such_axis", "acc", tmp_path / "x.png")


def _write_metrics(workdir, losses, evals=()):
    workdir.mkdir(parents=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "split": "finetune", "loss": loss, "time": 0.0}) + "\n")
        for step, ev in evals:
            f.write(json.dumps({"step": step, "split": "finetune_eval", "eval_loss": ev,
                                "time": 0.0}) + "\n")
        f.write(json.dumps({"step": 1, "split": "finetune_warning", "kind": "spike",
                            "message": "m", "time": 0.0}) + "\n")


def test_plot_loss_curves_reads_metrics_and_counts(tmp_path):
    rows = []
    for rank in (4, 16):
        for seed in (0, 1):
            wd = tmp_path / f"r{rank}-s{seed}"
            losses = [3.0 * math.exp(-i / (10 + rank + seed)) + 0.5 for i in range(40)]
            _write_metrics(wd, losses, evals=[(10, losses[9] + 0.1), (20, losses[19] + 0.1)])
            rows.append(row(wd.name, {"rank": rank}, seed, workdir=str(wd)))
    rows.append(row("missing", {"rank": 64}, 0, status="failed", workdir=str(tmp_path / "nope")))
    rows.append(row("no-workdir", {"rank": 64}, 1, status="pending"))
    path, n = analysis.plot_loss_curves(rows, tmp_path / "curves.png", split="finetune",
                                        eval_split="finetune_eval")
    assert n == 4
    assert_png(path)
    # Other split/key: no points anywhere -> a placeholder PNG, count 0.
    path, n = analysis.plot_loss_curves(rows, tmp_path / "none.png", split="train")
    assert n == 0 and pathlib.Path(path).read_bytes()[:8] == PNG_MAGIC
    _, n = analysis.plot_loss_curves(rows, tmp_path / "two.png", split="finetune", max_runs=2)
    assert n == 2


def test_write_report(tmp_path):
    rows = [row(f"r{r}-s{s}", {"rank": r}, s, acc=0.8 + 0.01 * r + 0.01 * s)
            for r in (4, 8) for s in (0, 1)]
    groups = analysis.aggregate(rows, ["acc"])
    paths = analysis.write_report(
        groups, rows, tmp_path / "report", metrics=["acc"], title="Rank", description="d",
        objective="acc", plots=[{"kind": "metric_vs_axis", "axis": "rank", "metric": "acc"}])
    assert paths[0].endswith("results.md") and paths[1].endswith("acc_vs_rank.png")
    md = pathlib.Path(paths[0]).read_text()
    assert "| **8** | **" in md and "![acc vs rank](acc_vs_rank.png)" in md
    assert_png(paths[1])
