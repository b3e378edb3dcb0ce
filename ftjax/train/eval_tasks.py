"""A training config's evaluation tasks (`eval.tasks`) as the loop's `on_eval` callback.

`Run.train` adds it when the config names tasks: every evaluation (`train.eval_every`) runs
them on the params as training holds them (sharded, nothing gathered) through the evaluation
stage's engine (`ftjax.eval`), logs `<task>/<metric>` and writes each evaluation's files to
`<workdir>/eval/step_<N>/`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

__all__ = ["task_evaluator"]


def task_evaluator(run: Any) -> Optional[Callable[[int, Any], dict]]:
    """The training loop's `on_eval` for a config's `eval.tasks`: `(step, params) ->
    {"<task>/<metric>": value}`, on the params as the run places them; results of each
    evaluation also go to `<workdir>/eval/step_<N>/`. None when the config names no tasks."""
    sec = run.cfg.get("eval", None)
    specs = list(sec.get("tasks", ())) if sec is not None else []
    if not specs:
        return None
    from ftjax.eval.engine import Engine
    from ftjax.eval.evaluate import evaluate, flat_metrics, load_tasks, write_results
    from ftjax.train.export import trained_template
    tasks = load_tasks(specs)
    _, template = trained_template(run.cfg, run.tokenizer)
    kw = dict(batch_size=int(sec.get("batch_size", 16)))
    if int(sec.get("max_len", 0) or 0):
        kw["max_len"] = int(sec.max_len)
    state = {}

    def on_eval(step: int, params: Any) -> dict:
        if "engine" not in state:
            state["engine"] = Engine(params, run.model_cfg, run.tokenizer,
                                     placement=run.placement, apply_fn=run.method.apply_fn,
                                     **kw)
        engine = state["engine"]
        engine.params = params
        results, samples = evaluate(engine, tasks, template=template)
        write_results(os.path.join(str(run.workdir), "eval", f"step_{step}"), results, samples,
                      model={"kind": "training", "workdir": str(run.workdir), "step": step})
        return flat_metrics(results)
    return on_eval
