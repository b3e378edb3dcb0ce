"""`python -m ftjax.eval`: evaluate any model on a list of tasks, without training.

    python -m ftjax.eval --model /tmp/qs --tasks examples --out /tmp/qs/eval
    python -m ftjax.eval --model HF_DIR --adapter PEFT_DIR --tasks mmlu.jsonl:num_fewshot=5
    python -m ftjax.eval --model WORKDIR --step 100 --tasks gsm8k.jsonl:extract=last_number

--model: an ftjax workdir (its latest checkpoint, or --step), a Hugging Face directory (with
--adapter, a PEFT adapter on top) or an ftjax params file. --tasks: comma-separated task
files with options (`PATH:key=value,...`; see docs/evaluation.md), or `examples` for the
shipped example tasks. --safety adds refusal rates on harmful / benign look-alike prompts,
--guard GUARD_DIR the unsafe rates a guard model (Llama Guard 3) gives the model's answers to
red-team prompts (docs/evaluation.md, "Safety"). Writes eval_results.json, eval_results.md and samples_<task>.jsonl
to --out (default: <workdir>/eval, or ./eval_results), and TensorBoard scalars when the
model is a workdir. --mesh data=4,tensor=2 places the params as training would on that mesh
(default: a workdir's own mesh; else every device data-parallel with FSDP rules).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _split_specs(text: str) -> list[str]:
    """Comma-separated specs; a comma inside a spec's options (after `:`) belongs to it
    unless what follows looks like a new file (`*.jsonl`) or `examples`."""
    import re
    parts = re.split(r",(?=\s*(?:examples\b|[^,:=]*\.jsonl?\b))", text)
    return [p.strip() for p in parts if p.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ftjax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="workdir, HF directory or params file")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (HF --model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (params files)")
    p.add_argument("--tasks", default=[], action="append",
                   help="task specs, comma-separated (repeatable), or 'examples'")
    p.add_argument("--safety", action="store_true",
                   help="refusal rates on harmful / benign look-alike prompts")
    p.add_argument("--guard", default=None,
                   help="guard model directory (Llama Guard 3): unsafe rates of the model's "
                        "answers to red-team prompts (implies --safety)")
    p.add_argument("--redteam", default="", help="red-team prompts JSONL (default: shipped)")
    p.add_argument("--refusal-pairs", default="", help="harmful/benign pairs JSONL "
                                                       "(default: shipped)")
    p.add_argument("--safety-max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="rows per compiled batch")
    p.add_argument("--max-len", type=int, default=0, help="longest scored row (0 = model's)")
    p.add_argument("--limit", type=int, default=0, help="first N records of each task")
    p.add_argument("--mesh", default=None, help="e.g. data=4,tensor=2 (axis sizes)")
    p.add_argument("--rules", default="fsdp", help="sharding rules preset with --mesh")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="HF directories: parameter dtype to load (default float32)")
    args = p.parse_args(argv)
    if not args.tasks and not (args.safety or args.guard):
        p.error("give --tasks, --safety or --guard")
    return args


def _layout(args):
    if not args.mesh:
        return None
    from ftjax.eval.model import mesh_sections
    sizes = {}
    for part in args.mesh.split(","):
        k, eq, v = part.partition("=")
        if not eq or k.strip() not in ("data", "fsdp", "tensor"):
            raise ValueError(f"--mesh {args.mesh!r}: use axis=size pairs over data, fsdp, "
                             "tensor, e.g. data=4,tensor=2")
        sizes[k.strip()] = int(v)
    return mesh_sections(rules=args.rules, **sizes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from ftjax.eval.evaluate import evaluate, load_tasks, write_results
    from ftjax.eval.model import engine_for, load_model

    specs = [s for group in args.tasks for s in _split_specs(group)]
    tasks = load_tasks(specs)   # bad task files fail before the model is loaded
    if args.limit:
        tasks = [(t, recs[:args.limit]) for t, recs in tasks]
    model = load_model(args.model, adapter=args.adapter, step=args.step,
                       tokenizer=args.tokenizer, layout=_layout(args), dtype=args.dtype)
    kw = {"batch_size": args.batch_size}
    if args.max_len:
        kw["max_len"] = args.max_len
    engine = engine_for(model, **kw)
    results, samples = evaluate(engine, tasks, template=model.template)
    extra = {"mesh": dict(model.placement.mesh.shape)}
    if args.safety or args.guard:
        from ftjax.eval.evaluate import safety_results
        extra["safety"] = safety_results(
            engine, model.template, guard=args.guard, redteam=args.redteam,
            refusal_pairs=args.refusal_pairs, limit=args.limit or None,
            max_new_tokens=min(args.safety_max_new_tokens,
                               model.cfg.max_position_embeddings // 2))
    is_workdir = model.source.get("kind") == "workdir"
    out = args.out or (os.path.join(args.model, "eval") if is_workdir else "eval_results")
    payload = write_results(out, results, samples, model=model.source,
                            tb_workdir=out if is_workdir else None,
                            step=int(model.source.get("step", 0) or 0),
                            extra=extra)
    print(f"wrote {os.path.join(out, 'eval_results.json')} and eval_results.md")
    return payload


if __name__ == "__main__":
    from ftjax.cli import run_main
    run_main(main)
