"""Prune a model: unstructured / 2:4 (magnitude or Wanda) or structured (heads, MLP neurons).

    python scripts/prune.py --model experiments/quickstart_base/model.safetensors \
        --method wanda --pattern unstructured --sparsity 0.5 --out /tmp/pruned.safetensors
    python scripts/prune.py --model M --method magnitude --pattern 2:4 --recover-steps 100
    python scripts/prune.py --model M --structured heads=0.25,neurons=0.25 --out /tmp/small.safetensors

--model is an ftjax params file (character tokenizer unless --tokenizer) or a Hugging Face
directory. Calibration (Wanda, and Wanda-style structured scores) runs on --calib-examples
examples of the synthetic pretraining mixture (`ftjax.data.mixture(PRETRAIN_TASKS, seed=1)`,
test prompts excluded), or on the {"prompt", "answer"} rows of --calib-jsonl. Evaluation, before
and after: held-out loss / perplexity and greedy exact match on --eval-examples test-bucket
prompts per pretraining task (the quickstart's `eval_examples_for`), or on --eval-jsonl.
--recover-steps N then fine-tunes all weights N AdamW steps on the mixture with the masks
fixed (`ftjax.train.calibrate.train_masked`) and evaluates again. --out writes the pruned
params (masks materialized: zeros in place; structured: the smaller config): a `.safetensors`
params file, or else a Hugging Face directory. --json writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="params file or Hugging Face directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (params files)")
    p.add_argument("--method", default="magnitude", choices=("magnitude", "wanda"))
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M (e.g. 2:4)")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured: fraction removed")
    p.add_argument("--scope", default="output", choices=("output", "matrix"),
                   help="unstructured: compare scores per output column or per matrix")
    p.add_argument("--targets", default="", help="comma-separated path regexes (default: "
                   "the seven attention / MLP projections)")
    p.add_argument("--structured", default="", help="heads=F,neurons=F: remove kv-groups of "
                   "heads / MLP neurons (fractions per layer) instead of masking")
    p.add_argument("--calib-examples", type=int, default=128)
    p.add_argument("--calib-jsonl", default="")
    p.add_argument("--eval-examples", type=int, default=100, help="per pretraining task")
    p.add_argument("--eval-jsonl", default="")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--recover-steps", type=int, default=0)
    p.add_argument("--recover-lr", type=float, default=1e-4)
    p.add_argument("--out", default="")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    if args.pattern != "unstructured":
        try:
            n, m = (int(x) for x in args.pattern.split(":"))
        except ValueError:
            p.error(f"--pattern {args.pattern!r}: use unstructured or N:M, e.g. 2:4")
        args.nm = (n, m)
    if args.structured:
        kv = dict(item.split("=", 1) for item in args.structured.split(",") if item)
        bad = set(kv) - {"heads", "neurons"}
        if bad:
            p.error(f"--structured: unknown keys {sorted(bad)}; use heads=F,neurons=F")
        args.struct = {k: float(v) for k, v in kv.items()}
    return args


def load(model: str, tokenizer: Optional[str]):
    from ftjax.data import CharTokenizer, HFTokenizer
    if os.path.isdir(model):
        from ftjax.io.hf import load_pretrained
        cfg, params = load_pretrained(model)
        return cfg, params, HFTokenizer.from_dir(tokenizer or model)
    from ftjax.io.params_file import load_params
    cfg, params = load_params(model)
    return cfg, params, HFTokenizer.from_dir(tokenizer) if tokenizer else CharTokenizer()


def read_rows(path: str) -> list[dict]:
    from ftjax.data.readers import read_jsonl_objects
    rows = []
    for line, obj in read_jsonl_objects(path):
        if "prompt" not in obj or "answer" not in obj:
            raise ValueError(f"{path}:{line}: needs 'prompt' and 'answer' keys, has {sorted(obj)}")
        rows.append({"prompt": obj["prompt"], "answer": obj["answer"]})
    return rows


def evaluate(params, cfg, tok, evals: dict, args) -> dict:
    """Per-task and overall held-out loss / perplexity and exact match."""
    import math
    from ftjax.eval.harness import exact_match_eval, loglik_eval
    from ftjax.peft.core import merge
    from ftjax.train.run import fixed_batches
    params = merge(params)  # masked weights as zeros in place: the exported model
    out, nll, toks, hits, n = {}, 0.0, 0, 0.0, 0
    for task, ex in evals.items():
        ll = loglik_eval(params, cfg, fixed_batches(ex, tok, args.batch_size, args.seq_len))
        em = exact_match_eval(params, cfg, tok, ex, max_new_tokens=args.max_new_tokens,
                              batch_size=64)
        out[task] = {"loss": round(ll["loss"], 4), "exact_match": round(em["exact_match"], 4)}
        nll, toks = nll + ll["loss"] * ll["tokens"], toks + ll["tokens"]
        hits, n = hits + em["exact_match"] * em["n"], n + em["n"]
    out["all"] = {"loss": round(nll / toks, 4), "ppl": round(math.exp(nll / toks), 4),
                  "exact_match": round(hits / n, 4)}
    return out


def forward_time(params, cfg, args, reps: int = 10) -> float:
    """Median seconds of one jitted forward pass on [batch_size, seq_len] tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ftjax import models
    f = jax.jit(lambda p, x: models.apply(p, cfg, x)[0])
    x = jnp.ones((args.batch_size, args.seq_len), jnp.int32)
    jax.block_until_ready(f(params, x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def print_sparsity(params) -> dict:
    from ftjax.peft import prune
    rep = prune.sparsity_report(params)
    for path, r in rep.items():
        if path != "total" and r["zeros"]:
            layers = " ".join(f"{x:.2f}" for x in r.get("per_layer", []))
            print(f"  {path:34s} {r['sparsity']:6.1%}  per layer: {layers}")
    print(f"  total ({rep['total']['over']}): {rep['total']['sparsity']:.1%}")
    return rep["total"]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    import jax
    from ftjax import data as ftdata
    from ftjax.io.params_file import save_params
    from ftjax.peft import core, prune
    from ftjax.train import calibrate
    from ftjax.train.run import fixed_batches
    from ftjax.trainers._quickstart_base import eval_examples_for

    t_start = time.time()
    cfg, params, tok = load(args.model, args.tokenizer)
    targets = tuple(t for t in args.targets.split(",") if t) or prune.DEFAULT_TARGETS
    tasks = ftdata.PRETRAIN_TASKS
    evals = ({"jsonl": read_rows(args.eval_jsonl)} if args.eval_jsonl else
             {t: eval_examples_for(t, args.eval_examples, 0, 0.2) for t in tasks})
    calib = (read_rows(args.calib_jsonl) if args.calib_jsonl else
             ftdata.mixture(tasks, -(-args.calib_examples // len(tasks)), 1)[:args.calib_examples])
    res: dict = {"args": {k: v for k, v in vars(args).items()}, "model": args.model}
    res["params_before"] = core.count_params(params)
    res["before"] = evaluate(params, cfg, tok, evals, args)
    print(f"before: {json.dumps(res['before']['all'])}  ({res['params_before']} params)")

    need_norms = args.method == "wanda"
    norms = None
    if need_norms:
        t0 = time.time()
        norms = calibrate.activation_norms(params, cfg, fixed_batches(
            calib, tok, args.batch_size, args.seq_len), targets)
        print(f"calibrated on {len(calib)} examples in {time.time() - t0:.1f}s")
    if args.structured:
        res["forward_s_before"] = forward_time(params, cfg, args)
        new_cfg, pruned = prune.prune_structured(cfg, params, activation_norms=norms,
                                                 **args.struct)
        print(f"structured: heads {cfg.num_heads}/{cfg.num_kv_heads} kv -> "
              f"{new_cfg.num_heads}/{new_cfg.num_kv_heads} kv, MLP {cfg.intermediate_size} -> "
              f"{new_cfg.intermediate_size}")
        cfg = new_cfg
        res["forward_s_after"] = forward_time(pruned, cfg, args)
    else:
        if hasattr(args, "nm"):
            masks = prune.nm_masks(params, targets, n=args.nm[0], m=args.nm[1],
                                   activation_norms=norms)
        elif args.method == "wanda":
            masks = prune.wanda_masks(params, norms, args.sparsity, targets, scope=args.scope)
        else:
            masks = prune.magnitude_masks(params, args.sparsity, targets, scope=args.scope)
        pruned = prune.apply_masks(params, masks)
        print("sparsity per matrix:")
        res["sparsity"] = print_sparsity(pruned)
    res["params_after"] = core.count_params(core.merge(pruned)) if args.structured \
        else res["params_before"]
    res["after"] = evaluate(pruned, cfg, tok, evals, args)
    print(f"after:  {json.dumps(res['after']['all'])}  ({res['params_after']} params)")

    if args.recover_steps > 0:
        t0 = time.time()
        train_ex = ftdata.mixture(tasks, max(200, args.recover_steps * args.batch_size
                                             // len(tasks)), 2)
        loader = ftdata.SyntheticLoader(train_ex, tok, args.batch_size, args.seq_len, seed=2)
        pruned, losses = calibrate.train_masked(pruned, cfg, loader, steps=args.recover_steps,
                                                learning_rate=args.recover_lr)
        res["recover"] = {"steps": args.recover_steps, "lr": args.recover_lr,
                          "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                          "wall_s": round(time.time() - t0, 1)}
        if not args.structured:
            res["sparsity_after_recover"] = prune.sparsity_report(pruned)["total"]["sparsity"]
        res["after_recover"] = evaluate(pruned, cfg, tok, evals, args)
        print(f"after {args.recover_steps} recovery steps: "
              f"{json.dumps(res['after_recover']['all'])}")

    if args.out:
        dense = jax.device_get(core.merge(pruned))
        if args.out.endswith(".safetensors"):
            save_params(args.out, cfg, dense, pruned_from=args.model,
                        pruning={k: v for k, v in res["args"].items() if k != "json"})
        else:
            from ftjax.io import hf
            hf.save_pretrained(args.out, cfg, dense, tokenizer_dir=args.model
                               if os.path.isdir(args.model) else None)
        print(f"wrote {args.out}")
    res["wall_s"] = round(time.time() - t_start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return res


if __name__ == "__main__":
    main()
