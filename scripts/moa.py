"""Run a Mixture of Agents (ftjax/infer/moa.py) described by a config; prints the answers.

    python scripts/moa.py --config experiments/moa/config.py --prompt "dmy2iso 18/05/1971" \\
        --prompt "dmy2iso 01/02/2003"
    python scripts/moa.py --config experiments/moa/config.py:models=A+B+C --prompt ... --json
    python scripts/moa.py --config experiments/moa/config.py:models=A+B+C --eval-task dmy2iso --eval-n 100

kind-"ftjax" agents are loaded here with `ftjax.evaluate.load_model` (on one device) and wrapped
in `LocalAgent`; kind-"openai" agents talk to their endpoint; kind "vote" is the majority vote.
--json prints, per prompt, the answer and every layer's responses. --eval-task scores exact
match on held-out prompts of a synthetic task (the test split of
`ftjax.data.synthetic.make_splits(task, 5 * n, seed=0)`, which training never sees): the MoA
answer and each distinct agent of layer 1 on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiments/moa/config.py[:args]")
    p.add_argument("--prompt", action="append", default=[], help="user prompt (repeatable)")
    p.add_argument("--eval-task", default=None, help="synthetic task to score exact match on")
    p.add_argument("--eval-n", type=int, default=100, help="held-out prompts for --eval-task")
    p.add_argument("--json", action="store_true", help="print JSON lines with every layer")
    args = p.parse_args(argv)
    if not args.prompt and not args.eval_task:
        p.error("give --prompt (repeatable) or --eval-task")
    return args


def ftjax_loader():
    """load_ftjax for `from_config`: the model on one device, as a LocalAgent."""
    import jax

    from ftjax import paths
    from ftjax.evaluate import load_model, mesh_sections
    from ftjax.infer.moa import LocalAgent

    def load(name, spec):
        path = spec.get("path") if hasattr(spec, "get") else spec.path
        if not os.path.exists(path):
            path = paths.resolve(path)  # relative paths: cwd first, then the ftjax root
        m = load_model(path, layout=mesh_sections(data=1), devices=jax.devices()[:1])
        template = (spec.get("template") if hasattr(spec, "get") else None) or m.template
        return LocalAgent(m.params, m.cfg, m.tokenizer, name, template, apply_fn=m.apply_fn)
    return load


def evaluate(moa, task: str, n: int) -> dict:
    """Exact match of the MoA answer and of each distinct layer-1 agent on n held-out prompts."""
    from ftjax.data.synthetic import exact_match, make_splits
    _, test = make_splits(task, 5 * n, seed=0)
    test = test[:n]
    prompts = [e["prompt"] for e in test]
    answers = [e["answer"] if "answer" in e else e["completion"] for e in test]
    t0 = time.time()
    result = moa.run(prompts)
    seen, per_agent = set(), {}
    for name, resp in zip(result.names[0], result.responses[0]):
        if name not in seen:
            seen.add(name)
            per_agent[name] = exact_match([r.strip() for r in resp], answers)
    return dict(task=task, n=len(prompts), moa=exact_match(
        [a.strip() for a in result.answers], answers), agents=per_agent,
        seconds=round(time.time() - t0, 1))


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    from ftjax.config_utils import load_config
    from ftjax.infer.moa import from_config

    moa = from_config(load_config(args.config), ftjax_loader())
    if args.eval_task:
        report = evaluate(moa, args.eval_task, args.eval_n)
        print(json.dumps(report))
        return report
    result = moa.run(args.prompt)
    for i, (prompt, answer) in enumerate(zip(result.prompts, result.answers)):
        if args.json:
            layers = [{n: r[i] for n, r in zip(names, resp)}
                      for names, resp in zip(result.names, result.responses)]
            print(json.dumps({"prompt": prompt, "answer": answer, "layers": layers},
                             ensure_ascii=False))
        else:
            print(answer)
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"moa.py: error: {e}")
