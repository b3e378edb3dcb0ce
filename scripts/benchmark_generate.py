"""Generation throughput: ftjax's KV-cache `generate` against transformers' `model.generate`.

    python scripts/benchmark_generate.py --models tiny,small --batch-sizes 1,16 \
        --prompt-len 32 --new-tokens 64 --repeats 5
    python scripts/benchmark_generate.py --quick          # smoke run (tests)

Both sides run greedy decoding in float32 on CPU over the SAME random weights (a Llama preset of
ftjax.models.config.SIZES, initialised by `models.init`, written with `ftjax.io.hf.save_pretrained`
and read back by `transformers.AutoModelForCausalLM`) and the same random prompts of exactly
`--prompt-len` tokens (no padding). eos is disabled on both sides (ftjax eos_id -1, transformers
eos_token_id None, min_new_tokens = max_new_tokens), so every call emits exactly `--new-tokens`
tokens per row; the script checks that it did.

Timing: the wall time of the whole generate call (prefill included), host array in, host array
out. Each side is called once untimed (ftjax compiles there: `compile_s` is the tracing,
lowering and XLA compile time jax.monitoring reports during that call, `ftjax_first_call_s` its
wall time), then `--repeats` timed calls per side, interleaved (ftjax, torch, torch, ftjax, ...)
so both see the same machine load; the median is the figure. tokens/s = batch * new_tokens /
median seconds. torch runs with `torch.set_num_threads(--threads or the cores this process may
use)`; XLA:CPU uses its own pool over the same cores. `*_cpu_median_s` is the median process CPU
time per call (all threads), a check on wall times from a busy host: there torch's OpenMP
barriers stall (and spin) whenever one of its threads is preempted, so its wall time can grow
many times over while XLA's pool degrades gracefully. `taskset -c 0 python ...` runs both
sides on one core, a fairer comparison when the host is not idle.

Agreement: the first `--agree-tokens` greedy tokens of the two outputs are compared;
`agree_frac` is the fraction of equal (row, step) entries and `agree_prefix_frac` the mean
common-prefix length over K (once a row diverges, its later tokens differ anyway). Random
weights can produce near-ties between the top two logits, so this is reported, not asserted;
`--init-std` (larger = more peaked logits) makes ties unlikely.

Prints one JSON line per (model, batch) to stdout; logs go to stderr. Load average at the start
and end is included, since shared hosts make these numbers noisy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("tiny", "small")


def _int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small",
                   help=f"comma-separated Llama size presets ({', '.join(MODELS)})")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (P)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row (N)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side")
    p.add_argument("--agree-tokens", type=int, default=16,
                   help="compare the first K greedy tokens of the two outputs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                   help="transformers attn_implementation")
    p.add_argument("--init-std", type=float, default=None,
                   help="weight init std (default the ModelConfig's, 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny only, batch 1 and 2, P 8, N 8, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes = "tiny", "1,2"
        args.prompt_len, args.new_tokens, args.repeats = 8, 8, 2
        args.agree_tokens = min(args.agree_tokens, 8)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown preset {m!r}; choose from {', '.join(MODELS)}")
    try:
        args.batch_sizes = _int_list(args.batch_sizes)
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs at least one size, all >= 1")
    for name in ("prompt_len", "new_tokens", "repeats", "agree_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.agree_tokens = min(args.agree_tokens, args.new_tokens)
    return args


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under `taskset`), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def log(msg: str) -> None:
    print(f"[benchmark_generate] {msg}", file=sys.stderr, flush=True)


def build_models(size: str, args: argparse.Namespace, tmp: str):
    """(ModelConfig, ftjax params, transformers model): one set of random weights, both sides."""
    import jax
    import torch
    import transformers
    from ftjax import models
    from ftjax.io import hf

    extra = {} if args.init_std is None else {"init_std": args.init_std}
    cfg = models.preset("llama", size=size, rope_theta=10000.0, norm_eps=1e-5,
                        tie_embeddings=False, dtype="float32", param_dtype="float32",
                        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens),
                        **extra)
    params = jax.jit(lambda: models.init(cfg, jax.random.PRNGKey(args.seed)))()
    path = os.path.join(tmp, size)
    hf.save_pretrained(path, cfg, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=args.attn).eval()
    return cfg, params, model


def agreement(ours, theirs, k: int) -> tuple[float, float]:
    """(fraction of equal entries, mean common-prefix length / k) over the first k tokens."""
    import numpy as np
    eq = np.asarray(ours)[:, :k] == np.asarray(theirs)[:, :k]
    prefix = np.where(eq.all(axis=1), k, np.argmin(eq, axis=1))
    return float(eq.mean()), float(prefix.mean() / k)


# jax.monitoring listeners cannot be removed, so one is registered (in main) and forwards the
# compile-phase durations (trace, lowering, XLA compile) to whoever is listening.
_COMPILE_LISTENER: list = [None]


def _on_jax_event(name: str, seconds: float, **_) -> None:
    if _COMPILE_LISTENER[0] is not None and name.startswith("/jax/core/compile/"):
        _COMPILE_LISTENER[0](seconds)


def bench_one(cfg, params, model, batch: int, args: argparse.Namespace) -> dict:
    """Times both generators on one batch of random prompts; returns the JSON row."""
    import numpy as np
    import torch
    from ftjax.infer.generate import generate

    p, n = args.prompt_len, args.new_tokens
    rng = np.random.default_rng(args.seed + batch)
    prompts = rng.integers(0, cfg.vocab_size, (batch, p), dtype=np.int32)
    lengths = np.full((batch,), p, np.int32)
    prompts_t = torch.from_numpy(prompts.astype(np.int64))
    attn_mask = torch.ones_like(prompts_t)

    def run_ftjax():
        return generate(params, cfg, prompts, lengths, max_new_tokens=n, eos_id=-1, pad_id=0)

    def run_torch():
        with torch.inference_mode():
            out = model.generate(input_ids=prompts_t, attention_mask=attn_mask, do_sample=False,
                                 use_cache=True, max_new_tokens=n, min_new_tokens=n,
                                 eos_token_id=None, pad_token_id=0, num_beams=1,
                                 temperature=None, top_k=None, top_p=None)
        return out[:, p:].numpy()

    compile_events: list[float] = []
    _COMPILE_LISTENER[0] = compile_events.append
    t0 = time.perf_counter()
    ours = run_ftjax()
    ftjax_first = time.perf_counter() - t0
    _COMPILE_LISTENER[0] = None
    t0 = time.perf_counter()
    theirs = run_torch()
    torch_first = time.perf_counter() - t0
    for name, out in (("ftjax", ours), ("torch", theirs)):
        if out.shape != (batch, n):
            raise RuntimeError(f"{name} generated shape {out.shape}, expected {(batch, n)}")
    if (ours < 0).any():
        raise RuntimeError("ftjax emitted an invalid token id (early stop?)")

    times = {"ftjax": [], "torch": []}
    cpu = {"ftjax": [], "torch": []}
    runs = {"ftjax": run_ftjax, "torch": run_torch}
    for r in range(args.repeats):
        for side in (("ftjax", "torch") if r % 2 == 0 else ("torch", "ftjax")):
            t0, c0 = time.perf_counter(), time.process_time()
            runs[side]()
            times[side].append(time.perf_counter() - t0)
            cpu[side].append(time.process_time() - c0)

    med = {k: statistics.median(v) for k, v in times.items()}
    tok = {k: batch * n / v for k, v in med.items()}
    agree, agree_prefix = agreement(ours, theirs, args.agree_tokens)
    return {
        "model": None,  # filled by main
        "batch": batch,
        "prompt_len": p,
        "new_tokens": n,
        "ftjax_tok_s": tok["ftjax"],
        "torch_tok_s": tok["torch"],
        "speedup": tok["ftjax"] / tok["torch"],
        "compile_s": sum(compile_events),
        "ftjax_first_call_s": ftjax_first,
        "torch_first_call_s": torch_first,
        "ftjax_median_s": med["ftjax"],
        "torch_median_s": med["torch"],
        "ftjax_times_s": times["ftjax"],
        "torch_times_s": times["torch"],
        "ftjax_cpu_median_s": statistics.median(cpu["ftjax"]),
        "torch_cpu_median_s": statistics.median(cpu["torch"]),
        "agree_tokens": args.agree_tokens,
        "agree_frac": agree,
        "agree_prefix_frac": agree_prefix,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch
    import transformers
    from ftjax import models

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftjax_bench_gen_") as tmp:
        for size in args.models:
            cfg, params, model = build_models(size, args, tmp)
            n_params = models.count_params(params)
            for batch in args.batch_sizes:
                load_start = os.getloadavg()[0]
                log(f"{size} batch {batch} P {args.prompt_len} N {args.new_tokens} "
                    f"repeats {args.repeats} torch threads {threads} params {n_params}")
                row = bench_one(cfg, params, model, batch, args)
                row.update(
                    model=size, params=n_params, init_std=cfg.init_std, repeats=args.repeats,
                    threads=threads, attn_implementation=args.attn,
                    load_avg_1m=[load_start, os.getloadavg()[0]],
                    backend=jax.default_backend(), cpu_count=os.cpu_count(),
                    usable_cores=usable_cores(),
                    jax_version=jax.__version__, torch_version=torch.__version__,
                    transformers_version=transformers.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"))
                log(f"  ftjax {row['ftjax_tok_s']:.1f} tok/s, torch {row['torch_tok_s']:.1f} "
                    f"tok/s, speedup {row['speedup']:.2f}x, compile {row['compile_s']:.2f}s, "
                    f"agree {row['agree_frac']:.2f}")
                print(json.dumps(row), flush=True)
                rows.append(row)
            del model
    return rows


if __name__ == "__main__":
    main()
