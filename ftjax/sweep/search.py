"""Hyperparameter search: random (built in) or Bayesian (Optuna's TPE), with early pruning.

The sweep file gives the space (`get_space(h)`: `h.loguniform`, `h.uniform`, `h.randint`,
`h.choice`) and a `search` section:

    c.search = dict(algorithm="tpe",            # random | tpe
                    n_trials=12, seed=0,
                    objective="val_em", direction="max",     # a config.metrics name
                    prune_metric="finetune_eval/eval_loss",  # metrics.jsonl "<split>/<key>"
                    prune_direction="min", prune_warmup_steps=50, prune_startup_trials=3,
                    final_seeds=(0, 1, 2), final_overrides=("data.score_test=True",))

Each trial is a run `search/trial-NNN` (the values of `get_sweep(h)`'s single point, e.g. a
seed, plus the sampled ones). While it trains, the runner reads its `prune_metric` rows and
asks the pruner at each: the median rule (Optuna's `MedianPruner` for TPE; the same rule
built in for random search) stops a trial whose best value so far is worse than the median
of earlier trials' values at that step. Intermediate values are reported in the objective's
direction (negated when `prune_direction` differs), so the pruner compares like with like.

State lives in the sweep folder: `search.json` (random) or the Optuna study in `optuna.db`
(SQLite), so an interrupted search continues where it stopped: finished and pruned trials
count, a trial that was running is marked failed and replaced. With `final_seeds` the best
trial's values are then run with those seeds (the final stage, the only one to score test).
"""
from __future__ import annotations

import json
import math
import os
import random as random_lib
import statistics
import threading
from typing import Any, Optional

from ftjax import workdir as workdir_lib
from ftjax.sweep import collect, runner
from ftjax.sweep import spec as spec_lib

__all__ = ["SEARCH_DEFAULTS", "search_section", "run_search", "MedianRule", "recorded_trials",
           "best_trial", "trial_runs"]

SEARCH_DEFAULTS = dict(algorithm="random", n_trials=8, seed=0, objective="", direction="max",
                       prune_metric="", prune_direction="", prune_warmup_steps=0,
                       prune_startup_trials=3, n_startup_trials=4, final_seeds=(),
                       final_overrides=())


def search_section(sweep: spec_lib.Sweep) -> dict:
    raw = dict(sweep.config.get("search", {}) or {})
    if not raw:
        raise ValueError(f"{sweep.path} has no `search` section; see ftjax/sweep/search.py")
    unknown = set(raw) - set(SEARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"{sweep.path}: unknown search field(s) {sorted(unknown)}; known: "
                         f"{sorted(SEARCH_DEFAULTS)}")
    sec = {**SEARCH_DEFAULTS, **raw}
    if sec["algorithm"] not in ("random", "tpe"):
        raise ValueError(f"search.algorithm must be 'random' or 'tpe', got {sec['algorithm']!r}")
    if sec["objective"] not in sweep.metrics:
        raise ValueError(f"search.objective {sec['objective']!r} is not one of config.metrics "
                         f"{sorted(sweep.metrics)}")
    for k in ("direction",) + (("prune_direction",) if sec["prune_direction"] else ()):
        if sec[k] not in ("max", "min"):
            raise ValueError(f"search.{k} must be 'max' or 'min', got {sec[k]!r}")
    if sec["prune_metric"] and "/" not in sec["prune_metric"]:
        raise ValueError(f"search.prune_metric {sec['prune_metric']!r} must be "
                         "'<split>/<key>' of metrics.jsonl, e.g. 'finetune_eval/eval_loss'")
    if int(sec["n_trials"]) < 1:
        raise ValueError("search.n_trials must be >= 1")
    return sec


def _base_point(sweep: spec_lib.Sweep) -> dict:
    points = [r.values for r in sweep.runs]
    if len(points) != 1:
        raise ValueError(f"{sweep.path}: a search sweep's get_sweep(h) gives the values every "
                         f"trial shares as one point (e.g. [{{}}] or h.seeds([0])), got "
                         f"{len(points)} points")
    return dict(points[0])


def _sign(sec: dict) -> float:
    """Factor that turns the prune metric into the objective's direction."""
    pd = sec["prune_direction"] or sec["direction"]
    return 1.0 if pd == sec["direction"] else -1.0


class MedianRule:
    """Optuna's median rule without Optuna: prune when the trial's best intermediate value
    so far is worse than the median of earlier finished trials' values at the same step."""

    def __init__(self, history: list[dict[int, float]], direction: str, warmup_steps: int,
                 startup_trials: int):
        self.history, self.direction = history, direction
        self.warmup, self.startup = int(warmup_steps), int(startup_trials)
        self.best: Optional[float] = None

    def __call__(self, step: int, value: float) -> bool:
        better = max if self.direction == "max" else min
        if math.isfinite(value):
            self.best = value if self.best is None else better(self.best, value)
        if step < self.warmup or len(self.history) < self.startup:
            return False
        peers = [h[step] for h in self.history if step in h]
        if len(peers) < self.startup:
            return False
        med = statistics.median(peers)
        if self.best is None:
            return True
        return self.best < med if self.direction == "max" else self.best > med


def _trial_run(sweep: spec_lib.Sweep, number: int, values: dict) -> spec_lib.Run:
    return spec_lib.Run(name=f"trial-{number:03d}", values=values, stage="search",
                        seed_key=str(sweep.config.seed_key))


def _objective(sweep: spec_lib.Sweep, run: spec_lib.Run, sec: dict) -> Optional[float]:
    row = collect.row_of(sweep, run)
    v = row["metrics"].get(sec["objective"])
    return v if v is not None and math.isfinite(v) else None


def _curve_of(sweep, run, sec) -> dict[int, float]:
    if not sec["prune_metric"]:
        return {}
    split, _, key = sec["prune_metric"].rpartition("/")
    wd = runner.workdir_of(sweep, run)
    return {s: _sign(sec) * v for s, v in collect.curve(wd, split, key,
                                                        str(sweep.config.metrics_file))}


def _random(sweep: spec_lib.Sweep, sec: dict, procs: int, quiet: bool) -> None:
    space = sweep.space()
    base = _base_point(sweep)
    state_path = workdir_lib.path(str(sweep.config.dir), "search.json")
    state = json.loads(state_path.read_text()) if state_path.exists() else {"trials": {}}
    lock = threading.Lock()

    def values_of(i: int) -> dict:
        rng = random_lib.Random(f"{sec['seed']}:{i}")  # trial i's draw does not depend on others
        return {**base, **{k: d.sample(rng) for k, d in space.items()}}

    def save() -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1, sort_keys=True))

    def one(i: int) -> None:
        run = _trial_run(sweep, i, values_of(i))
        with lock:
            history = [t["curve"] for t in state["trials"].values() if t["status"] == "finished"]
        history = [{int(k): v for k, v in h.items()} for h in history]
        rule = MedianRule(history, sec["direction"], sec["prune_warmup_steps"],
                          sec["prune_startup_trials"])
        sign = _sign(sec)
        out = runner.run_one(sweep, run, quiet=quiet,
                             pruner=(lambda s, v: rule(s, sign * v)) if sec["prune_metric"] else None,
                             prune_metric=sec["prune_metric"])
        status = "finished" if out.status in ("finished", "skipped") else out.status
        value = _objective(sweep, run, sec) if status == "finished" else None
        with lock:
            state["trials"][str(i)] = {"name": run.name, "values": run.values, "status": status,
                                       "value": value, "curve": _curve_of(sweep, run, sec)}
            save()
        if not quiet:
            print(f"[search {sweep.name}] {run.name} {status}"
                  + (f" {sec['objective']}={value:.4g}" if value is not None else "")
                  + (f" ({out.message.splitlines()[0]})" if out.message else ""), flush=True)

    todo = [i for i in range(int(sec["n_trials"]))
            if state["trials"].get(str(i), {}).get("status") not in ("finished", "pruned")]
    if procs > 1:
        import concurrent.futures  # pylint: disable=import-outside-toplevel
        with concurrent.futures.ThreadPoolExecutor(procs) as pool:
            list(pool.map(one, todo))
    else:
        for i in todo:
            one(i)


def _suggest(trial, key: str, d: spec_lib.Dist) -> Any:
    if d.kind == "loguniform":
        return trial.suggest_float(key, d.low, d.high, log=True)
    if d.kind == "uniform":
        return trial.suggest_float(key, d.low, d.high)
    if d.kind == "int":
        return trial.suggest_int(key, int(d.low), int(d.high))
    return trial.suggest_categorical(key, list(d.values))


def _tpe(sweep: spec_lib.Sweep, sec: dict, procs: int, quiet: bool) -> None:
    try:
        import optuna  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError("search.algorithm='tpe' needs Optuna: pip install optuna") from None
    if workdir_lib.is_remote(str(sweep.config.dir)):
        raise ValueError("the Optuna study is a SQLite file in the sweep folder: run the "
                         "search with a local --dir (or use algorithm='random')")
    os.makedirs(str(sweep.config.dir), exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{os.path.abspath(os.path.join(str(sweep.config.dir), 'optuna.db'))}"
    study = optuna.create_study(
        study_name=sweep.name, storage=storage, load_if_exists=True,
        direction="maximize" if sec["direction"] == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=int(sec["seed"]),
                                           n_startup_trials=int(sec["n_startup_trials"])),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=int(sec["prune_startup_trials"]),
                                           n_warmup_steps=int(sec["prune_warmup_steps"])))
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING, states.WAITING)):
        study.tell(t.number, state=states.FAIL)  # interrupted earlier: replaced below
    space, base, sign = sweep.space(), _base_point(sweep), _sign(sec)
    lock = threading.Lock()

    def counted() -> int:
        return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED,
                                                            states.RUNNING)))

    def worker() -> None:
        while True:
            with lock:
                if counted() >= int(sec["n_trials"]):
                    return
                trial = study.ask()
                values = {**base, **{k: _suggest(trial, k, d) for k, d in space.items()}}
            run = _trial_run(sweep, trial.number, values)

            def pruner(step: int, value: float, trial=trial) -> bool:
                trial.report(sign * value, step)
                return trial.should_prune()

            out = runner.run_one(sweep, run, quiet=quiet, prune_metric=sec["prune_metric"],
                                 pruner=pruner if sec["prune_metric"] else None)
            value = _objective(sweep, run, sec) if out.status in ("finished", "skipped") else None
            trial.set_user_attr("run", run.name)
            trial.set_user_attr("config_hash", out.config_hash)
            if out.status == "pruned":
                study.tell(trial, state=states.PRUNED)
            elif value is None:
                study.tell(trial, state=states.FAIL)
            else:
                study.tell(trial, value)
            if not quiet:
                print(f"[search {sweep.name}] {run.name} {out.status}"
                      + (f" {sec['objective']}={value:.4g}" if value is not None else "")
                      + (f" ({out.message.splitlines()[0]})" if out.message else ""), flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, procs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_search(sweep: spec_lib.Sweep, *, procs: int = 1, quiet: bool = False) -> list[dict]:
    """Runs (or continues) the sweep's search; returns its trials
    (`number, name, values, status, value`)."""
    sec = search_section(sweep)
    fn = _tpe if sec["algorithm"] == "tpe" else _random
    fn(sweep, sec, procs, quiet)
    return recorded_trials(sweep)


def recorded_trials(sweep: spec_lib.Sweep) -> list[dict]:
    """The search's trials as recorded (without running anything)."""
    sec = search_section(sweep)
    if sec["algorithm"] == "random":
        path = workdir_lib.path(str(sweep.config.dir), "search.json")
        if not path.exists():
            return []
        state = json.loads(path.read_text())
        return [dict(number=int(k), **v) for k, v in sorted(state["trials"].items(),
                                                            key=lambda kv: int(kv[0]))]
    import optuna  # pylint: disable=import-outside-toplevel
    db = os.path.join(str(sweep.config.dir), "optuna.db")
    if not os.path.exists(db):
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{os.path.abspath(db)}")
    states = optuna.trial.TrialState
    base = _base_point(sweep)
    return [{"number": t.number, "name": t.user_attrs.get("run", f"trial-{t.number:03d}"),
             "values": {**base, **t.params},
             "status": {states.COMPLETE: "finished", states.PRUNED: "pruned"}.get(t.state,
                                                                                 "failed"),
             "value": t.value} for t in study.get_trials(deepcopy=False)
            if "run" in t.user_attrs]


def best_trial(trials: list[dict], direction: str) -> dict:
    done = [t for t in trials if t["status"] == "finished" and t["value"] is not None
            and math.isfinite(t["value"])]
    if not done:
        raise ValueError("no finished trial with a finite objective: nothing to choose")
    return (max if direction == "max" else min)(done, key=lambda t: t["value"])


def trial_runs(sweep: spec_lib.Sweep, trials: list[dict]) -> list[spec_lib.Run]:
    return [_trial_run(sweep, t["number"], t["values"]) for t in trials]
