"""Weight-only quantized inference on the quickstart base: float32 vs int8 vs NF4.

    python scripts/benchmark_quant_inference.py                       # the documented run
    python scripts/benchmark_quant_inference.py --examples 20 --repeats 2 --new-tokens 8  # smoke

The parent process loads the quickstart base (`experiments/quickstart_base/model.safetensors`,
or --model), writes one checkpoint per kind into --out-dir (a temporary directory by default):
float32 with `ftjax.io.params_file.save_params`, int8 and nf4 with
`ftjax.io.quantized.save_quantized` after `quantize_for_inference`, and reports the bytes of
each params tree (`param_bytes`: total, the quantized kernels, and those kernels as float32)
and each file's size. Each kind is then measured in a fresh subprocess that loads ITS file
(the quantized ones without any float copy of the quantized kernels), so `peak_rss_mb`
(ru_maxrss of that process) covers exactly loading, compiling and running that kind:
  * generation throughput: `ftjax.infer.generate.generate`, greedy, at --batch rows of
    held-out quickstart prompts (left-padded to a multiple of 16), eos disabled (eos_id -1) so
    every call emits exactly --new-tokens tokens per row; one untimed warm-up call (compile),
    then the median wall time of --repeats calls; tokens/s = batch * new_tokens / median.
  * held-out quality on the five pretraining tasks the base knows (`--examples` prompts each,
    from `eval_examples_for`, the quickstart's own held-out sets; `lookup` is recall of
    trained facts, as the quickstart scores it): greedy exact match with `generate_text` and
    the quickstart's generation settings (max_new_tokens and batch from configs/quickstart.py),
    and the answer-token mean NLL (`loglik_eval` over `fixed_batches`, i.e. the eval loss of
    the quickstart) with its perplexity exp(NLL).
  * `generate_compiled_bytes`: XLA's memory analysis of the compiled generate program
    (arguments, temporaries, outputs), since ru_maxrss is dominated by the JAX runtime and
    compilation at this model size.
The parent adds, per quantized kind, the fraction of prompts whose greedy output equals the
float32 one. Prints ONE JSON object to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BASE = os.path.join(ROOT, "experiments", "quickstart_base", "model.safetensors")
KINDS = ("float32", "int8", "nf4")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=BASE, help="float ftjax params file (default: the "
                                                 "quickstart base)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of " + str(KINDS))
    p.add_argument("--examples", type=int, default=100, help="held-out prompts per task")
    p.add_argument("--batch", type=int, default=32, help="rows of the throughput batch")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=5, help="timed generate calls (median)")
    p.add_argument("--block-size", type=int, default=64, help="NF4 block size")
    p.add_argument("--out-dir", default="", help="where the checkpoints go (default: temp)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--file", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(f"[benchmark_quant_inference] {msg}", file=sys.stderr, flush=True)


def _eval_sets(n: int) -> tuple[dict, object]:
    """The quickstart base's held-out prompts per pretraining task, and its generation
    settings (configs/quickstart.py)."""
    from configs import quickstart
    from ftjax.trainers._quickstart_base import eval_examples_for
    c = quickstart.get_config()
    sets = {t: eval_examples_for(t, n, int(c.base.seed), float(c.base.test_frac))
            for t in c.base.tasks}
    return sets, c


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _compiled_bytes(params, cfg, tokens, lengths, new_tokens) -> dict | None:
    """XLA's memory analysis of the compiled greedy generate program: argument bytes (the
    params as stored + prompts) and temporaries (KV cache, per-layer weight copies, and any
    dequantized weights XLA keeps). Uses generate's private jitted function; None if that
    changes."""
    try:
        import jax
        import jax.numpy as jnp
        from ftjax.infer import generate as g
        m = g._generate_jit.lower(
            params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.int32(-1), jnp.int32(0),
            jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0), jax.random.PRNGKey(0), cfg=cfg,
            max_new_tokens=new_tokens, greedy=True).compile().memory_analysis()
        return {"arguments": int(m.argument_size_in_bytes),
                "temporaries": int(m.temp_size_in_bytes), "outputs": int(m.output_size_in_bytes)}
    except Exception as e:  # noqa: BLE001 -- a report field, never a reason to fail the run
        _log(f"no compiled memory analysis ({type(e).__name__}: {e})")
        return None


def worker(args) -> dict:
    """Everything measured in the process of one kind (see the module docstring)."""
    import jax
    import numpy as np
    from ftjax import data as ftdata
    from ftjax import monitor
    from ftjax.data.batching import bos_prefix
    from ftjax.eval.harness import loglik_eval
    from ftjax.infer.generate import PROMPT_BUCKET, generate, generate_text
    from ftjax.io.params_file import load_params
    from ftjax.train.run import fixed_batches

    t0 = time.perf_counter()
    cfg, params = load_params(args.file)  # a quantized file: NF4Weight/Int8Weight leaves
    params = jax.device_put(params)
    jax.block_until_ready(params)
    out = {"kind": args.worker, "load_s": round(time.perf_counter() - t0, 3),
           "rss_after_load_mb": _current_rss_mb()}
    tok = ftdata.CharTokenizer()
    sets, c = _eval_sets(args.examples)

    # Throughput: a fixed batch of held-out prompts, exactly new_tokens tokens per row.
    prompts = [ex["prompt"] for t in sets for ex in sets[t]][:args.batch]
    while len(prompts) < args.batch:
        prompts += prompts[:args.batch - len(prompts)]
    enc = [bos_prefix(tok) + list(tok.encode(p + "\n")) for p in prompts]
    width = -(-max(map(len, enc)) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((args.batch, width), tok.pad_id, np.int32)
    for i, ids in enumerate(enc):
        tokens[i, width - len(ids):] = ids
    lengths = np.array([len(e) for e in enc], np.int32)
    call = lambda: generate(params, cfg, tokens, lengths, max_new_tokens=args.new_tokens,  # noqa: E731
                            eos_id=-1, pad_id=tok.pad_id)
    t0 = time.perf_counter()
    first = call()
    out["first_call_s"] = round(time.perf_counter() - t0, 3)
    assert first.shape == (args.batch, args.new_tokens)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out["generate_compiled_bytes"] = _compiled_bytes(params, cfg, tokens, lengths, args.new_tokens)
    out.update(generate_median_s=round(med, 4),
               tokens_per_s=round(args.batch * args.new_tokens / med, 1),
               generate_times_s=[round(t, 4) for t in times])

    # Held-out quality: greedy exact match and answer-token NLL per task.
    d = c.data
    quality, predictions = {}, {}
    nll_sum = tok_sum = 0.0
    for task, examples in sets.items():
        preds = generate_text(params, cfg, tok, [ex["prompt"] for ex in examples],
                              max_new_tokens=int(d.max_new_tokens),
                              batch_size=int(d.eval_batch_size))
        em = ftdata.exact_match(preds, [ex["answer"] for ex in examples])
        ll = loglik_eval(params, cfg, fixed_batches(examples, tok, int(c.train.batch_size),
                                                    int(c.train.seq_len)))
        quality[task] = {"n": len(examples), "exact_match": round(em, 4),
                         "answer_nll": round(ll["loss"], 5),
                         "answer_ppl": round(math.exp(ll["loss"]), 4)}
        nll_sum += ll["loss"] * ll["tokens"]
        tok_sum += ll["tokens"]
        predictions[task] = preds
    n_all = sum(q["n"] for q in quality.values())
    out["quality"] = quality
    out["exact_match_mean"] = round(sum(q["exact_match"] * q["n"] for q in quality.values())
                                    / n_all, 4)
    out["answer_nll"] = round(nll_sum / tok_sum, 5)
    out["answer_ppl"] = round(math.exp(nll_sum / tok_sum), 4)
    out["peak_rss_mb"] = round(monitor.peak_rss_mb(), 1)
    out["predictions"] = predictions
    return out


def write_checkpoints(args, kinds, out_dir: str) -> dict:
    """One file per kind; the params bytes and file sizes."""
    from ftjax.io.params_file import load_params, save_params
    from ftjax.io.quantized import param_bytes, quantize_for_inference, save_quantized
    cfg, params = load_params(args.model)
    info = {}
    ref = param_bytes(quantize_for_inference(params, "int8"))  # which kernels get quantized
    for kind in kinds:
        path = os.path.join(out_dir, f"model.{kind}.safetensors")
        if kind == "float32":
            save_params(path, cfg, params)
            b = param_bytes(params)
            b.update(quantized=0, target_kernels_float32=ref["quantized_as_float32"])
        else:
            t0 = time.perf_counter()
            q = quantize_for_inference(params, kind, block_size=args.block_size)
            b = param_bytes(q)
            b["quantize_s"] = round(time.perf_counter() - t0, 3)
            save_quantized(path, cfg, q, {"quantized_from": os.path.abspath(args.model)})
        info[kind] = {"file": path, "file_bytes": os.path.getsize(path), "param_bytes": b}
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        sys.exit(f"benchmark_quant_inference.py: error: --kinds {bad or args.kinds!r}: choose "
                 f"from {list(KINDS)}")
    tmp = None if args.out_dir else tempfile.TemporaryDirectory(prefix="ftjax-quant-bench-")
    out_dir = args.out_dir or tmp.name
    os.makedirs(out_dir, exist_ok=True)
    files = write_checkpoints(args, kinds, out_dir)
    results = {}
    for kind in kinds:
        _log(f"measuring {kind} in a subprocess")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
               "--file", files[kind]["file"], "--examples", str(args.examples),
               "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"benchmark_quant_inference.py: the {kind} worker failed:\n"
                     f"{proc.stderr[-4000:]}")
        results[kind] = {**files[kind], **json.loads(proc.stdout.strip().splitlines()[-1])}
        results[kind].pop("file")
        results[kind].pop("kind")
    if "float32" in results:
        ref = results["float32"]["predictions"]
        for kind, r in results.items():
            same = [a == b for t in ref for a, b in zip(ref[t], r["predictions"][t])]
            r["same_output_as_float32"] = round(sum(same) / len(same), 4)
    for r in results.values():
        r.pop("predictions")
    import jax
    report = {
        "benchmark": "quant_inference",
        "model": os.path.relpath(args.model, ROOT) if args.model.startswith(ROOT)
        else args.model,
        "settings": {"examples_per_task": args.examples, "batch": args.batch,
                     "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "nf4_block_size": args.block_size},
        "platform": jax.default_backend(), "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    print(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
