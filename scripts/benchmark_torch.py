"""The reference for scripts/benchmark.py: Hugging Face `LlamaForCausalLM` on CPU PyTorch.

    python scripts/benchmark_torch.py --preset tiny --mode full --batch 4 --seq 512 --steps 10
    python scripts/benchmark_torch.py --preset tiny --mode lora

Same shapes, same random-token batches (inputs / targets shifted by one, every token counted),
same loss (mean next-token cross-entropy in float32), AdamW (lr 1e-3, weight decay 0.01,
gradient clipping at global norm 1.0, like the Hugging Face Trainer's default) on float32
params. Prints one JSON line with the fields of scripts/benchmark.py plus "framework": "torch".
`compile_s` is the first step (eager PyTorch has nothing to compile unless `--compile`).
`--mode lora` wraps the same model with Hugging Face PEFT (`LoraConfig`: rank 16, alpha 32, no
dropout, on q/k/v/o and gate/up/down, as scripts/benchmark.py's lora mode) and runs AdamW
over the trainable (adapter) params only, with the same loss and clipping; the line adds
`trainable_params`, `lora_rank` and `lora_alpha`.
MFU uses ftjax's FLOPs-per-token formula, convention (`flops_convention`, `mfu_6n`: see
scripts/benchmark.py) and peak, imported after the timed steps so jax is not in the process
while torch runs. See docs/performance.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mirrors ftjax.models.config.SIZES (checked against it in tests/test_benchmark.py).
PRESETS = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
}
MODES = ("full", "forward", "lora")
# LoRA mode: PEFT's LoraConfig matching scripts/benchmark.py (LORA_RANK, LORA_ALPHA,
# LORA_TARGETS there; checked in tests/test_benchmark.py).
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                   help="transformers attn_implementation")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="autocast dtype for the forward (params stay float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=("system", "tuned"), default="system",
                   help="host allocator: system (glibc defaults, as users run transformers) or "
                        "tuned (ftjax.hostmem's settings, as scripts/benchmark.py runs)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over the timed steps: op classes and top ops to stderr")
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s per device for MFU (0: ftjax's measured matmul)")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def log(msg: str) -> None:
    print(f"[benchmark_torch] {msg}", file=sys.stderr, flush=True)


def op_class(name: str) -> str:
    """The class of one aten op, matching scripts/benchmark.py's `op_class` for XLA ops."""
    n = name.lower()
    if any(k in n for k in ("mm", "matmul", "linear", "addmm", "bmm", "baddbmm")):
        return "matmul (all)"
    if "attention" in n or "sdpa" in n or "flash" in n:
        return "attention kernel (sdpa, fwd + bwd)"
    if any(k in n for k in ("copy", "contiguous", "transpose", "permute", "clone", "cat",
                            "expand", "view", "reshape", "_to_copy", "t_", "slice", "split")):
        return "copies, transposes, views"
    if any(k in n for k in ("embedding", "index", "gather", "scatter", "nll_loss")):
        return "gather / scatter / index (embeddings, loss)"
    if any(k in n for k in ("sum", "mean", "max", "norm", "softmax", "logsumexp")):
        return "reductions (softmax, norms, loss, grad norms)"
    if n.startswith("optimizer") or "adam" in n or "foreach" in n:
        return "optimizer"
    return "elementwise (norms, rope, activations, ...)"


def summarize_profile(prof, steps: int) -> None:
    """Logs self CPU time per step by op class (summed over threads, like scripts/benchmark.py
    --profile for XLA) and the top aten ops, to stderr."""
    import collections
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows) / 1e3 / steps
    log(f"profile: {total:.1f} ms of self CPU time in ops per step; top 20:")
    for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:20]:
        log(f"  {e.self_cpu_time_total / 1e3 / steps:8.2f} ms x{e.count // steps:<4d} {e.key}")
    classes = collections.Counter()
    for e in rows:
        classes[op_class(e.key)] += e.self_cpu_time_total
    log("profile by op class (ms per step; docs/performance.md):")
    for cls, us in classes.most_common():
        log(f"  {us / 1e3 / steps:8.2f} ms {100 * us / sum(classes.values()):5.1f}%  {cls}")


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def build_model(preset: str, mode: str, seq: int = 512, attn: str = "sdpa", device=None):
    """(model, params of the base model, trainable params): `LlamaForCausalLM` of `preset` in
    float32, wrapped with PEFT LoRA in lora mode (`device="meta"` builds shapes only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**PRESETS[preset], rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, max_position_embeddings=max(4096, seq),
                         hidden_act="silu", attention_bias=False, mlp_bias=False,
                         initializer_range=0.02, use_cache=False,
                         attn_implementation=attn)
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM(hf_cfg).to(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS), bias="none"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n_params, trainable


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    model, n_params, n_trainable = build_model(args.preset, args.mode, args.seq, args.attn)
    vocab = PRESETS[args.preset]["vocab_size"]
    log(f"{args.preset}/{args.mode} batch {args.batch} seq {args.seq} threads {threads} "
        f"attn {args.attn} params {n_params} trainable {n_trainable} torch {torch.__version__}")

    rng = np.random.default_rng(args.seed)

    def host_batch():
        toks = rng.integers(0, vocab, (args.batch, args.seq + 1), dtype=np.int64)
        return torch.from_numpy(toks[:, :-1].copy()), torch.from_numpy(toks[:, 1:].copy())

    batches = [host_batch() for _ in range(2)]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else torch.autocast("cpu", enabled=False))
    fwd_model = torch.compile(model) if args.compile else model

    def loss_of(inputs, targets):
        with autocast:
            logits = fwd_model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))

    if args.mode in ("full", "lora"):
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]  # lora: the adapters
        opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=args.weight_decay)

        def step(inputs, targets):
            loss = loss_of(inputs, targets)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    else:
        model.eval()

        def step(inputs, targets):
            with torch.no_grad():
                return float(loss_of(inputs, targets))

    t0 = time.perf_counter()
    loss_first = step(*batches[0])
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        step(*batches[(1 + i) % 2])
    times, cpu_times, loss_last = [], [], loss_first
    prof = None
    if args.profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss_last = step(*batches[(1 + args.warmup + i) % 2])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if prof is not None:
        prof.__exit__(None, None, None)
        summarize_profile(prof, args.steps)
    rss = peak_rss_mb()

    # Same FLOPs convention and peak as ftjax (imported only now, after the timed steps).
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from ftjax import hostmem, models, monitor
    from ftjax.train import loop
    ft_cfg = models.preset("llama", size=args.preset, max_position_embeddings=max(4096, args.seq))
    training = args.mode != "forward"
    # LoRA's adapters are all dense matmul factors, so their count is the per-token one.
    adapter_params = float(n_trainable) if args.mode == "lora" else None
    fpt = loop.flops_per_token(ft_cfg, args.seq, training=training, adapter_params=adapter_params)
    fpt_6n = loop.flops_per_token(ft_cfg, args.seq, training=training)
    peak, peak_src = monitor.peak_flops_per_device(override=args.peak_flops or None)

    median = statistics.median(times)
    tokens_per_s = args.batch * args.seq / median
    row = {
        "framework": "torch",
        "host_malloc": hostmem.active(),
        "preset": args.preset,
        "mode": args.mode,
        "batch": args.batch,
        "seq": args.seq,
        "params": n_params,
        "trainable_params": n_trainable,
        "step_time_median_s": median,
        "tokens_per_s": tokens_per_s,
        "compile_s": compile_s,
        "mfu": tokens_per_s * fpt / peak,
        "mfu_6n": tokens_per_s * fpt_6n / peak,
        "flops_convention": loop.flops_convention(training, adapter_params is not None),
        "peak_rss_mb": rss,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "cpu_time_median_s": statistics.median(cpu_times),
        "load_avg_1m": [load_start, os.getloadavg()[0]],  # at start and end (shared hosts)
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "torch_compile": bool(args.compile),
        "flops_per_token": fpt,
        "flops_per_token_6n": fpt_6n,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "backend": "cpu",
        "device_kind": "cpu",
        "n_devices": 1,
        "threads": threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peak_flops": peak,
        "peak_flops_source": peak_src,
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.mode == "lora":
        row.update(lora_rank=LORA_RANK, lora_alpha=float(LORA_ALPHA))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    if "--malloc" in sys.argv and sys.argv[sys.argv.index("--malloc") + 1:][:1] == ["tuned"]:
        sys.path.insert(0, ROOT)
        from ftjax import hostmem
        hostmem.reexec_tuned()
    main()
