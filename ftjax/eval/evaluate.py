"""The evaluation stage: a model and a list of tasks in, `eval_results.json` and a markdown
table out (plus per-example samples, and TensorBoard scalars for a workdir).

    python -m ftjax.evaluate --model WORKDIR_OR_HF_DIR [--adapter PEFT_DIR] [--step N] \\
        --tasks a.jsonl,b.jsonl:num_fewshot=5 --out DIR

`evaluate` is also what a training run calls every `train.eval_every` steps when its config
has `eval.tasks` (`ftjax.train.eval_tasks`), on the params as training holds them.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax

from ftjax.eval.tasks import TaskSpec, load_task, parse_task_spec, run_task, task_from_dict

__all__ = ["DEFAULTS", "evaluate", "chat_generator", "safety_results", "load_tasks", "write_results", "markdown_table",
           "flat_metrics", "SHIPPED_TASKS"]

# The `eval` section of a training config (opt-in): tasks run with every evaluation
# (`train.eval_every`), their metrics logged as "<task>/<metric>".
DEFAULTS = dict(
    tasks=(),        # task specs ("PATH[:k=v,...]", "examples") or {"path": ..., <options>}
    batch_size=16,   # rows per compiled evaluation batch
    max_len=0,       # longest scored row (0 = the model's positions)
)

SHIPPED_DIR = "experiments/data_samples/eval"
SAFETY_DIR = "experiments/data_samples/safety"
# `--tasks examples`: the shipped example files (made by scripts/make_eval_examples.py).
SHIPPED_TASKS = ("dmy2iso_mc.jsonl", "dmy2iso_gen.jsonl", "add_sampled.jsonl",
                 "synthetic_text.jsonl", "dmy2iso_prompted.jsonl")


def load_tasks(specs: Sequence[Any]) -> list[tuple[TaskSpec, list[dict]]]:
    """Tasks from spec strings (`PATH[:k=v,...]`, or `examples` for the shipped ones) or
    config dicts (`{"path": ..., <options>}`); duplicate names are refused."""
    out = []
    for s in specs:
        if isinstance(s, str) and s.strip() == "examples":
            out += [load_task(f"{SHIPPED_DIR}/{f}") for f in SHIPPED_TASKS]
        elif isinstance(s, str):
            path, opts = parse_task_spec(s.strip())
            out.append(load_task(path, opts))
        else:
            out.append(task_from_dict(s.to_dict() if hasattr(s, "to_dict") else dict(s)))
    names = [t.name for t, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"tasks named more than once: {dup}; give each a distinct name=")
    return out


def evaluate(engine: Any, tasks: Sequence[tuple[TaskSpec, list[dict]]], *,
             template: Optional[str] = None, log: Callable[[str], None] = print
             ) -> tuple[dict, dict]:
    """(results by task name, samples by task name)."""
    results, samples = {}, {}
    for spec, records in tasks:
        res, smp = run_task(engine, spec, records, template=template)
        results[spec.name] = res
        samples[spec.name] = smp
        shown = ", ".join(f"{k} {v:.4g}" for k, v in res["metrics"].items()
                          if isinstance(v, float))
        log(f"[eval] {spec.name} ({spec.kind}, n={res['n']}, {res['wall_s']:.1f}s): {shown}")
    return results, samples


def chat_generator(engine: Any, template: Optional[str], *, max_new_tokens: int = 64,
                   system: str = "") -> Callable[[list[str]], list[str]]:
    """`prompts -> responses` of the engine's model: each prompt a user turn of `template` (the
    chat template the model was trained with), greedy, at most `max_new_tokens`. A prompt too
    long for the model's positions keeps its last tokens (counted in `.truncated`)."""
    from ftjax.data.batching import bos_prefix
    from ftjax.data.chat import apply_chat_template
    tok = engine.tokenizer
    budget = engine.cfg.max_position_embeddings - max_new_tokens
    if budget < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's {engine.cfg.max_position_embeddings} positions")

    def generate(prompts: list[str]) -> list[str]:
        ids = []
        for p in prompts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}]
            if template is None and not getattr(tok, "chat_template", None):
                x = bos_prefix(tok) + list(tok.encode(p))   # a base model: the raw prompt
            else:
                x = list(apply_chat_template(tok, msgs, add_generation_prompt=True,
                                             template=template))
            if len(x) > budget:
                generate.truncated += 1
                x = x[-budget:]
            ids.append(x)
        return [tok.decode(list(g.ids)) for g in engine.generate(ids,
                                                                  max_new_tokens=max_new_tokens)]
    generate.truncated = 0
    return generate


def safety_results(engine: Any, template: Optional[str], *, guard: Optional[str] = None,
                   redteam: str = "", refusal_pairs: str = "", max_new_tokens: int = 64,
                   limit: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    """Refusal rates on harmful / benign look-alike prompts (always) and, with a guard model
    directory, the guard's unsafe rates per category on the red-team prompts
    (`ftjax.eval.safety`). Defaults: the shipped files in experiments/data_samples/safety."""
    from ftjax import paths
    from ftjax.eval import safety
    redteam = paths.resolve(redteam or f"{SAFETY_DIR}/redteam_prompts.jsonl")
    refusal_pairs = paths.resolve(refusal_pairs or f"{SAFETY_DIR}/refusal_pairs.jsonl")
    gen = chat_generator(engine, template, max_new_tokens=max_new_tokens)
    out = {"refusal": safety.refusal_report(gen, refusal_pairs, limit=limit)}
    r = out["refusal"]
    log(f"[safety] refusal rate on harmful prompts {r['harmful']['refusal_rate']:.3f}, "
        f"over-refusal on benign look-alikes {r['benign']['over_refusal_rate']:.3f} "
        f"({r['n_pairs']} pairs)")
    if guard:
        judge = safety.GuardJudge.from_pretrained(guard)
        out["guard"] = {"path": os.path.abspath(guard),
                        **safety.safety_report(gen, judge, redteam, limit=limit)}
        g = out["guard"]
        rate = g["unsafe_rate"]
        log(f"[safety] guard {guard}: unsafe rate "
            f"{'n/a' if rate is None else f'{rate:.3f}'} over {g['judged']} judged responses "
            f"({g['unparseable']} unparseable)")
    out["truncated_prompts"] = gen.truncated
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """`{"<task>/<metric>": value}` for logging."""
    return {f"{t}/{m}": float(v) for t, r in results.items() for m, v in r["metrics"].items()}


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def _safety_lines(safety: dict) -> list[str]:
    r = safety["refusal"]
    lines = ["", "| safety | value | n |", "|---|---|---|",
             f"| refusal rate, harmful prompts | {_num(r['harmful']['refusal_rate'] or 0.0)} | "
             f"{r['harmful']['n']} |",
             f"| over-refusal rate, benign look-alikes | "
             f"{_num(r['benign']['over_refusal_rate'] or 0.0)} | {r['benign']['n']} |"]
    g = safety.get("guard")
    if g:
        lines.append(f"| unsafe rate (guard) | {_num(g['unsafe_rate'] or 0.0)} | {g['judged']} |")
        for code, c in g["per_category"].items():
            if c["flagged"]:
                lines.append(f"| unsafe {code} {c['name']} | {_num(c['rate'] or 0.0)} | "
                             f"{g['judged']} |")
        lines.append(f"| unparseable verdicts | {g['unparseable']} | {g['n']} |")
    return lines


def markdown_table(results: dict, model: Optional[dict] = None,
                   safety: Optional[dict] = None) -> str:
    lines = []
    if model:
        desc = ", ".join(f"{k}={v}" for k, v in model.items())
        lines += [f"Model: {desc}", ""]
    lines += ["| task | kind | metric | value | ± stderr | n |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for m, v in r["metrics"].items():
            se = r["stderr"].get(m)
            lines.append(f"| {name} | {r['kind']} | {m} | {_num(v)} | "
                         f"{'' if se is None else _num(se)} | {r['n']} |")
    if safety:
        lines += _safety_lines(safety)
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, results: dict, samples: dict, *, model: dict,
                  extra: Optional[dict] = None, tb_workdir: Optional[str] = None,
                  step: int = 0) -> dict:
    """Writes eval_results.json, eval_results.md and samples_<task>.jsonl to `out_dir`
    (process 0), and TensorBoard scalars (`eval/<task>/<metric>`) under `tb_workdir`."""
    payload = {"model": model, "tasks": results, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "jax": {"backend": jax.default_backend(), "devices": jax.device_count(),
                       "processes": jax.process_count()}, **(extra or {})}
    if jax.process_index() != 0:
        return payload
    from ftjax import workdir as wd
    wd.write_json(out_dir, "eval_results.json", payload)
    root = wd.path(out_dir)
    (root / "eval_results.md").write_text(markdown_table(results, model,
                                                         (extra or {}).get("safety")))
    for name, smp in samples.items():
        (root / f"samples_{name}.jsonl").write_text(
            "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in smp))
    if tb_workdir:
        from ftjax import monitor
        with monitor.MetricWriter(tb_workdir) as w:
            w.write(step, flat_metrics(results), prefix="eval_tasks")
    return payload
