"""Sweeps (ftjax/sweep): axes, run names and hashes, skip/resume/stale, run records, the
select -> final protocol, SLURM and TPU launch lists, random and TPE search with pruning,
and the report, on tiny real runs of `configs/sft_synthetic.py`."""
import json
import os
import pathlib
import re
import textwrap

import pytest

from ftjax import run_record
from ftjax.sweep import __main__ as sweep_cli
from ftjax.sweep import runner, search
from ftjax.sweep import spec as spec_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ("model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
        "data.n_per_task=100", "data.eval_examples=8", "data.max_new_tokens=4",
        "train.batch_size=8", "train.log_every=1", "train.eval_every=1",
        "train.progress=False", "train.tensorboard=False", "optimizer.warmup_steps=1")


def write_sweep(folder: pathlib.Path, body: str, extra_config: str = "") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.py"
    path.write_text(textwrap.dedent(f"""
        import ml_collections

        def get_config():
            c = ml_collections.ConfigDict()
            c.base = "configs/sft_synthetic.py:tasks=reverse,steps=3"
            c.overrides = {TINY!r}
            c.metrics = {{"em": "exact_match", "eval_loss": "curve:train_eval/eval_loss:last",
                         "wall": "record.wall_s"}}
            {extra_config}
            return c
        """) + textwrap.dedent(body))
    return path


# ---------------------------------------------------------------------------------------------
# Axes and names (no runs)

def test_axes_grid_zip_chain_random_and_names():
    h = spec_lib.Hyper()
    grid = h.product([h.sweep("config.peft.rank", [4, 16]),
                      h.zipit([h.sweep("peft.rslora", [False, True]),
                               h.sweep("peft.alpha", [8.0, 32.0])]),
                      h.seeds([0, 1])])
    assert len(grid) == 2 * 2 * 2
    assert grid[0] == {"peft.rank": 4, "peft.rslora": False, "peft.alpha": 8.0, "seed": 0}
    assert {(p["peft.rslora"], p["peft.alpha"]) for p in grid} == {(False, 8.0), (True, 32.0)}
    runs = spec_lib.make_runs(grid)
    assert runs[0].name == "rank=4-rslora=False-alpha=8-seed=0"
    assert runs[0].params == {"peft.rank": 4, "peft.rslora": False, "peft.alpha": 8.0}
    assert runs[0].seed == 0
    assert "--config.peft.alpha=8.0" in runs[0].overrides()
    assert h.chain([h.sweep("a", [1]), h.sweep("b", [2])]) == [{"a": 1}, {"b": 2}]
    space = {"optimizer.learning_rate": h.loguniform(1e-4, 1e-2), "peft.rank": h.choice([4, 8])}
    one, two = h.random(space, n=5, seed=3), h.random(space, n=5, seed=3)
    assert one == two and one != h.random(space, n=5, seed=4)  # the seed fixes the draws
    assert all(1e-4 <= p["optimizer.learning_rate"] <= 1e-2 for p in one)
    # A key that does not vary stays out of the names; the seed always shows.
    assert spec_lib.make_runs([{"a": 1, "seed": 0}, {"a": 1, "seed": 1}])[1].name == "seed=1"


def test_axes_refuse_mistakes():
    h = spec_lib.Hyper()
    with pytest.raises(ValueError, match="one length"):
        h.zipit([h.sweep("a", [1, 2]), h.sweep("b", [1])])
    with pytest.raises(ValueError, match="set by two axes"):
        h.product([h.sweep("a", [1]), h.sweep("a", [2])])
    with pytest.raises(ValueError, match="the axes repeat a point"):
        spec_lib.make_runs([{"a": 1}, {"a": 1}])
    with pytest.raises(ValueError, match="not a config path"):
        h.sweep("optimizer..lr", [1])
    with pytest.raises(ValueError, match="repeated seeds"):
        h.seeds([0, 0])


def test_sweep_file_errors(tmp_path):
    bad = write_sweep(tmp_path / "bad", "def get_sweep(h):\n    return [{}]\n",
                      extra_config="c.colour = 'red'")
    with pytest.raises(ValueError, match="unknown sweep config field"):
        spec_lib.load(str(bad))
    with pytest.raises(FileNotFoundError, match="no sweep file"):
        spec_lib.load(str(tmp_path / "missing.py"))
    typo = write_sweep(tmp_path / "typo", "def get_sweep(h):\n"
                                          "    return h.sweep('optimizer.learnin_rate', [1e-3])\n")
    sweep = spec_lib.load(str(typo))
    sweep.config.dir = str(tmp_path / "typo_runs")
    with pytest.raises(ValueError, match="learnin_rate"):
        runner.run_hash(sweep, sweep.runs[0])
    assert sweep_cli.main(["list", str(typo), "--dir", str(tmp_path / "x")]) == 2


def test_median_rule():
    history = [{10: 1.0, 20: 2.0}, {10: 3.0, 20: 4.0}, {10: 5.0, 20: 6.0}]
    rule = search.MedianRule(history, "max", warmup_steps=10, startup_trials=3)
    assert not rule(5, -100.0)            # before warm-up: never
    assert rule(10, 2.9)                  # below the median (3.0) of its peers at step 10
    rule = search.MedianRule(history, "max", warmup_steps=0, startup_trials=3)
    assert not rule(10, 3.5)              # 3.5 >= median 3.0 at step 10
    assert rule(20, 3.9)                  # best so far 3.9 < median 4.0 at step 20
    rule = search.MedianRule(history, "min", warmup_steps=0, startup_trials=3)
    assert rule(10, 3.5) and not search.MedianRule(history, "min", 0, 3)(10, 2.0)
    assert not search.MedianRule(history[:2], "max", 0, 3)(10, -1.0)  # too few trials yet


def test_choose_breaks_ties_and_names_missing_groups():
    from ftjax.sweep import protocol

    def row(method, lr, seed, em, loss, status="finished"):
        return {"name": f"{method}{lr}{seed}", "stage": "select", "seed": seed, "status": status,
                "params": {"m": method, "lr": lr}, "metrics": {"em": em, "loss": loss}}
    rows = [row("a", 1, 0, 1.0, 0.5), row("a", 1, 1, 1.0, 0.7),   # mean em 1.0, loss 0.6
            row("a", 2, 0, 1.0, 0.1), row("a", 2, 1, 1.0, 0.3),   # mean em 1.0, loss 0.2
            row("a", 3, 0, 0.5, 0.0), row("a", 3, 1, float("nan"), 0.0),
            row("b", 1, 0, 0.2, 1.0), row("b", 2, 0, 0.4, 2.0),
            row("b", 3, 0, 0.9, 0.0, status="failed")]
    best = {b["params"]["m"]: b["params"]["lr"]
            for b in protocol.choose(rows, "em", "max", ["m"], "loss", "min")}
    assert best == {"a": 2, "b": 2}     # a: tie on em, lower loss wins; b: failed run ignored
    best = {b["params"]["m"]: b["params"]["lr"] for b in protocol.choose(rows, "em", "max", ["m"])}
    assert best == {"a": 1, "b": 2}     # no tie-break: sweep order
    with pytest.raises(ValueError, match="m='c'"):
        protocol.choose(rows + [row("c", 1, 0, 0.1, 0.1, status="failed")], "em", "max", ["m"])


# ---------------------------------------------------------------------------------------------
# A select -> final sweep, run for real (4 select runs, 2 final runs)

SELECT_BODY = """
def get_sweep(h):
    return h.product([h.sweep("optimizer.learning_rate", [1e-3, 2e-2]), h.seeds([0, 1])])
"""
SELECT_CONFIG = """c.select = dict(objective="eval_loss", direction="min", seeds=(0, 1),
                        overrides=("train.steps=4",))
            c.analysis = dict(title="tiny", objective="eval_loss", direction="min",
                              plots=(dict(axis="optimizer.learning_rate", metric="eval_loss"),),
                              curves=dict(split="train", key="loss"))"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp / "exp", SELECT_BODY, SELECT_CONFIG)
    runs_dir = tmp / "runs"
    rc = sweep_cli.main(["run", str(path), "--dir", str(runs_dir), "--procs", "2"])
    return {"path": path, "dir": runs_dir, "rc": rc, "tmp": tmp}


def _load(ran):
    sweep = spec_lib.load(str(ran["path"]))
    sweep.config.dir = str(ran["dir"])
    return sweep


def test_sweep_runs_select_then_final_and_records(ran):
    assert ran["rc"] == 0
    sweep = _load(ran)
    assert [r.name for r in sweep.runs] == ["learning_rate=0.001-seed=0",
                                            "learning_rate=0.001-seed=1",
                                            "learning_rate=0.02-seed=0",
                                            "learning_rate=0.02-seed=1"]
    final, extra = sweep_cli._stage_runs(sweep, "final")
    assert extra == ("train.steps=4",) and [r.seed for r in final] == [0, 1]
    for r in list(sweep.runs) + list(final):
        wd = runner.workdir_of(sweep, r)
        rec = run_record.read(wd)
        cfg = json.load(open(os.path.join(wd, "config.json")))
        # The hash the runner predicts is the one ftjax.main recorded.
        h = runner.run_hash(sweep, r, extra if r.stage == "final" else ())
        assert rec["status"] == "finished" and rec["config_hash"] == cfg["_hash"] == h
        assert cfg["optimizer"]["learning_rate"] == r.values["optimizer.learning_rate"]
        assert cfg["seed"] == r.seed
        assert cfg["train"]["steps"] == (4 if r.stage == "final" else 3)
        assert rec["seeds"]["seed"] == r.seed and "data.seed" in rec["seeds"]
        assert rec["code"]["git_commit"] and isinstance(rec["code"]["git_dirty"], bool)
        assert rec["packages"]["jax"] and rec["devices"]["kind"] and rec["devices"]["count"] >= 1
        assert rec["attempts"][-1]["wall_s"] > 0 and rec["attempts"][-1]["cpu_s"] > 0
    # The final stage re-runs the learning rate with the lower mean select eval loss.
    from ftjax.sweep import collect
    rows = collect.collect(sweep, sweep.runs)
    mean = {lr: sum(r["metrics"]["eval_loss"] for r in rows
                    if r["params"]["optimizer.learning_rate"] == lr) / 2 for lr in (1e-3, 2e-2)}
    assert final[0].values["optimizer.learning_rate"] == min(mean, key=mean.get)


def test_rerun_skips_finished_and_report(ran, capsys):
    sweep = _load(ran)
    before = {r.name: run_record.read(runner.workdir_of(sweep, r)) for r in sweep.runs}
    out_dir = ran["tmp"] / "report"
    assert sweep_cli.main(["run", str(ran["path"]), "--dir", str(ran["dir"]),
                           "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": skipped") == 6
    for r in sweep.runs:  # no new attempt was made
        assert run_record.read(runner.workdir_of(sweep, r))["attempts"] == \
            before[r.name]["attempts"]
    md = (out_dir / "results.md").read_text()
    assert "±" in md and "Selection on the validation split" in md and "Provenance" in md
    # The main table is the final stage (test scored), the selection table the select stage.
    main_table = md.split("## Selection")[0]
    assert re.search(r"^\| (\*\*)?final(\*\*)? \|", main_table, re.M)
    assert not re.search(r"^\| (\*\*)?select(\*\*)? \|", main_table, re.M)
    data = json.loads((out_dir / "results.json").read_text())
    assert len(data["runs"]) == 6 and {r["stage"] for r in data["runs"]} == {"select", "final"}
    assert all(r["record"]["config_hash"] for r in data["runs"])
    for png in out_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(out_dir.glob("*.png"))) == 2


def test_slurm_and_tpu_list_the_same_runs(ran, tmp_path):
    sweep = _load(ran)
    assert sweep_cli.main(["slurm", str(ran["path"]), "--dir", str(ran["dir"]),
                           "--sbatch=--time=01:00:00"]) == 0
    sbatch = (ran["dir"] / "slurm" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in sbatch and "#SBATCH --time=01:00:00" in sbatch
    assert "run-one" in sbatch and "$SLURM_ARRAY_TASK_ID" in sbatch
    table = (ran["dir"] / "slurm" / "runs.txt").read_text().splitlines()[1:]
    for line, r in zip(table, sweep.runs):
        i, name, h, wd = line.split(" ")
        assert name == r.name and h == runner.run_hash(sweep, r)
        assert wd == runner.workdir_of(sweep, r)
    # All select runs are finished, so the TPU list holds none of them; a new folder all 4.
    assert sweep_cli.main(["tpu", str(ran["path"]), "--dir", str(ran["dir"]),
                           "--tpu", "pod", "--zone", "z"]) == 0
    assert "launch_tpu.sh" not in (ran["dir"] / "tpu" / "launch.sh").read_text()
    assert sweep_cli.main(["tpu", str(ran["path"]), "--dir", str(tmp_path / "fresh"),
                           "--tpu", "pod", "--zone", "z"]) == 0
    lines = [x for x in (tmp_path / "fresh" / "tpu" / "launch.sh").read_text().splitlines()
             if x.startswith("scripts/launch_tpu.sh")]
    assert len(lines) == 4 and all("--config.optimizer.learning_rate=" in x for x in lines)
    # run-one (what each array task runs) skips a finished run.
    assert sweep_cli.main(["run-one", str(ran["path"]), "--dir", str(ran["dir"]),
                           "--index", "2"]) == 0


def test_stale_interrupted_and_pruned_runs(ran):
    sweep = _load(ran)
    r = sweep.runs[0]
    wd = runner.workdir_of(sweep, r)
    h = runner.run_hash(sweep, r)
    assert runner.run_state(wd, h) == "finished"
    assert runner.run_state(wd, "0" * 12) == "stale"  # the sweep file changed this run
    rec_path = os.path.join(wd, "run.json")
    rec = json.load(open(rec_path))
    rec["status"] = "running"  # killed mid-run
    json.dump(rec, open(rec_path, "w"))
    assert runner.run_state(wd, h) == "interrupted"
    out = runner.run_one(sweep, r, quiet=True)  # runs again, resuming its checkpoint
    assert out.status == "finished"
    rec = run_record.read(wd)
    assert rec["status"] == "finished" and len(rec["attempts"]) == 2
    # A pruner stops a run from its metrics.jsonl rows; the run is not run again.
    changed = spec_lib.Run(name="pruned", values={"optimizer.learning_rate": 5e-3, "seed": 0},
                           stage="extra")
    seen = []

    def pruner(step, value):
        seen.append((step, value))
        return step >= 1
    out = runner.run_one(sweep, changed, pruner=pruner, prune_metric="train_eval/eval_loss",
                         poll_s=0.05, quiet=True, extra=("train.steps=400",))
    assert out.status == "pruned" and seen and seen[0][0] == 1
    wd = runner.workdir_of(sweep, changed)
    assert json.load(open(os.path.join(wd, runner.PRUNED)))["step"] >= 1
    assert run_record.read(wd)["status"] == "interrupted"
    again = runner.run_one(sweep, changed, quiet=True, extra=("train.steps=400",))
    assert again.status == "pruned" and "earlier" in again.message


# ---------------------------------------------------------------------------------------------
# Search

SEARCH_BODY = """
def get_sweep(h):
    return h.seeds([0])

def get_space(h):
    return {"optimizer.learning_rate": h.loguniform(1e-4, 3e-2)}
"""


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_search_runs_trials_and_resumes(tmp_path, algorithm):
    cfg = (f'c.search = dict(algorithm="{algorithm}", n_trials=2, seed=0, objective="eval_loss",'
           ' direction="min", prune_metric="train_eval/eval_loss", prune_startup_trials=1)')
    path = write_sweep(tmp_path / "s", SEARCH_BODY, cfg)
    runs = tmp_path / "runs"
    assert sweep_cli.main(["run", str(path), "--dir", str(runs), "--no-analyze"]) == 0
    sweep = spec_lib.load(str(path))
    sweep.config.dir = str(runs)
    trials = search.recorded_trials(sweep)
    assert len(trials) == 2 and all(t["status"] in ("finished", "pruned") for t in trials)
    assert trials[0]["status"] == "finished" and trials[0]["value"] is not None
    for t in trials:
        lr = t["values"]["optimizer.learning_rate"]
        assert 1e-4 <= lr <= 3e-2 and t["values"]["seed"] == 0
        cfg_json = json.load(open(runs / "runs" / "search" / t["name"] / "config.json"))
        assert cfg_json["optimizer"]["learning_rate"] == pytest.approx(lr)
    state = "search.json" if algorithm == "random" else "optuna.db"
    assert (runs / state).exists()
    # Running again adds no trial.
    assert sweep_cli.main(["run", str(path), "--dir", str(runs), "--no-analyze"]) == 0
    assert [t["name"] for t in search.recorded_trials(sweep)] == [t["name"] for t in trials]

