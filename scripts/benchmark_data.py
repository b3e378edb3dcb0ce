"""Throughput of the data pipeline (source -> format -> clean -> tokenize -> pack -> batch) on
the synthetic suite, against the training step it feeds; prints one JSON line.

    python scripts/benchmark_data.py --preset small --step-time 3.38
    python scripts/benchmark.py --preset small > step.json
    python scripts/benchmark_data.py --preset small --step-json step.json
    python scripts/benchmark_data.py --preset small --run-step   # runs scripts/benchmark.py

The synthetic suite (the pretraining tasks) is written as an instruction JSONL file, prepared
with `pipeline.prepare` (ArrayRecord build, canonical form, cleaning, exact dedup, splits:
reported as `prepare_s`, a one-time cost), and the train split is read through the Grain
loader of `pipeline.make_loader` with the batch shape of the benchmark preset (global batch
`--batch` rows of `--seq` tokens; `scripts/benchmark.py` defaults 4 x 512). After `--warmup`
batches, `--batches` batches are timed. `examples_per_s` counts packed documents,
`tokens_per_s` real (non-padding) tokens, `slots_per_s` batch x seq. `ratio` = step time /
loader time per batch: how many times faster the loader produces a batch than the step
consumes it (the issue asks for >= 10). Only the JSON line goes to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("tiny", "small"), default="small",
                   help="the scripts/benchmark.py preset whose step is fed (its batch shape)")
    p.add_argument("--batch", type=int, default=4, help="global batch (rows), as benchmark.py")
    p.add_argument("--seq", type=int, default=512, help="row length (tokens), as benchmark.py")
    p.add_argument("--examples", type=int, default=4000, help="synthetic examples per task")
    p.add_argument("--batches", type=int, default=200, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--template", default="", help="'' = the char tokenizer's default (alpaca)")
    p.add_argument("--packing", default="best_fit", choices=("best_fit", "first_fit", "none"))
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--step-time", type=float, default=0.0, help="seconds per training step")
    p.add_argument("--step-json", default="", help="a JSON line of scripts/benchmark.py")
    p.add_argument("--run-step", action="store_true",
                   help="run scripts/benchmark.py --preset PRESET (full) for the step time")
    p.add_argument("--workdir", default="", help="where the JSONL and prepared data go")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[benchmark_data] {msg}", file=sys.stderr, flush=True)


def step_time(args) -> tuple[float, str]:
    """(seconds per step, where the figure came from)."""
    if args.step_time > 0:
        return args.step_time, "--step-time"
    if args.step_json:
        with open(args.step_json) as f:
            line = [l for l in f.read().splitlines() if l.strip().startswith("{")][-1]
        rec = json.loads(line)
        return float(rec["step_time_median_s"]), f"{args.step_json} ({rec.get('preset')}, " \
            f"{rec.get('mode')}, batch {rec.get('batch')} x seq {rec.get('seq')})"
    if args.run_step:
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--preset",
               args.preset, "--batch", str(args.batch), "--seq", str(args.seq)]
        log("running " + " ".join(cmd))
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rec = json.loads(out.strip().splitlines()[-1])
        return float(rec["step_time_median_s"]), "scripts/benchmark.py (run now)"
    return 0.0, "none (pass --step-time, --step-json or --run-step)"


def write_suite(path: str, n_per_task: int) -> int:
    from ftjax.data import PRETRAIN_TASKS, mixture
    rows = mixture(list(PRETRAIN_TASKS), n_per_task, seed=0)
    with open(path, "w") as f:
        for e in rows:
            f.write(json.dumps({"instruction": e["prompt"], "output": e["answer"]}) + "\n")
    return len(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from configs import common
    from ftjax.data import CharTokenizer
    from ftjax.data.pipeline import make_loader, prepare

    work = args.workdir or tempfile.mkdtemp(prefix="ftjax_bench_data_")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "suite.jsonl")
    n_rows = write_suite(src, args.examples)
    tok = CharTokenizer()
    d = common.data_file(f"jsonl:{src}", "instruction", template=args.template,
                         packing=args.packing, num_workers=args.num_workers,
                         splits=dict(ratios=(1.0,)))
    t0 = time.perf_counter()
    prepared = prepare(d, tok, work, seq_len=args.seq, verbose=False)
    prepare_s = time.perf_counter() - t0
    log(f"prepared {n_rows} rows in {prepare_s:.1f}s -> {len(prepared.split('train'))} train")

    loader = make_loader(prepared, "train", tok, args.batch, args.seq, seed=0)
    try:
        for _ in range(args.warmup):
            next(loader)
        docs = tokens = 0
        t0 = time.perf_counter()
        for _ in range(args.batches):
            b = next(loader)
            seg = b["segment_ids"]
            tokens += int((seg > 0).sum())
            docs += int(seg.max(axis=1).sum())
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    per_batch = elapsed / args.batches
    st, st_source = step_time(args)
    ratio = st / per_batch if st > 0 else None
    rec = {
        "preset": args.preset, "batch": args.batch, "seq": args.seq,
        "template": args.template or "default (alpaca)", "packing": args.packing,
        "num_workers": args.num_workers, "rows_in_source": n_rows,
        "examples_per_s": docs / elapsed, "tokens_per_s": tokens / elapsed,
        "slots_per_s": args.batch * args.seq * args.batches / elapsed,
        "s_per_batch": per_batch, "packing_efficiency": loader.pack_stats.efficiency,
        "prepare_s": prepare_s, "step_time_s": st or None, "step_time_source": st_source,
        "ratio_step_over_loader": ratio, "meets_10x": None if ratio is None else ratio >= 10,
        "load_avg_1m": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
