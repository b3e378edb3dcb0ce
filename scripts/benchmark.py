"""Training-step throughput of ftjax on a random-init Llama or Mixtral preset; prints one JSON line.

    python scripts/benchmark.py --preset tiny --mode full --batch 4 --seq 512 --steps 10
    python scripts/benchmark.py --preset mixtral-tiny --mode lora --dispatch capacity

Modes:
  full     the real training step: `make_train_step` + `jit_train_step` (explicit shardings,
           donated state), AdamW in float32 params, random tokens, masked next-token loss.
  forward  `apply` + the same loss, jitted, no gradient (what evaluation costs).
  lora     the training step on LoRA (rank 16, alpha 32) over the attention and MLP/expert
           kernels; only the adapters train.
  qlora    as lora over a quantized frozen base (`ftjax.peft.qlora.apply_qlora`).

Timing: the step is compiled ahead of time (`compile_s` = lower + compile), run `--warmup`
times untimed, then `--steps` times with `block_until_ready` after each; the median is the
figure. MFU uses the model FLOPs of `loop.flops_per_token` over the peak of
`monitor.peak_flops_per_device` (on CPU a measured f32 matmul, so a sanity figure only). The
FLOPs follow `flops_convention`: PaLM's 6N + attention for full, 2N + attention for forward,
and for lora / qlora what a step over a frozen base computes, 4·N_frozen + 6·N_trainable +
attention (`loop.flops_per_token(adapter_params=...)`). `mfu_6n` / `flops_per_token_6n` are
always the PaLM figures, comparable with older runs (docs/performance.md, "FLOP conventions").
Only the JSON line goes to stdout; logs go to stderr. See docs/performance.md.

MoE presets (mixtral-*) take `--dispatch dropless|capacity`, `--capacity-factor`, and for
dropless `--grouped-impl auto|ragged_dot|blocks` and `--block-size` (docs/moe.md); LoRA then
adapts the attention projections and the stacked expert kernels (the router stays frozen).
Their JSON adds `dispatch experts top_k active_params_per_token` (embeddings included, only
k of E experts counted, Mixtral's convention), `moe_dropped` / `moe_aux_loss` of the last
step, and for capacity dispatch `capacity_slots` (C per expert and sequence) and
`capacity_compute_ratio` (E*C / (k*T): expert work done per expert work needed). The FLOPs
per token (and MFU) count only the k active experts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MoE presets: Mixtral-style (SwiGLU experts, top-k softmax router, aux loss 0.02).
MOE_PRESETS = {
    "mixtral-tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=512,
                         expert_intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                         num_experts=8, num_experts_per_tok=2),
}
PRESETS = ("tiny", "small") + tuple(MOE_PRESETS)
DISPATCHES = ("dropless", "capacity")
GROUPED_IMPLS = ("auto", "ragged_dot", "blocks")
MODES = ("full", "forward", "lora", "qlora")
# LoRA / QLoRA preset: rank 16, alpha 32 on every attention and MLP projection, AdamW.
LORA_RANK, LORA_ALPHA = 16, 32.0
LORA_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel", r"layers/mlp/(gate|up|down)_proj/kernel")
MOE_LORA_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel",
                    r"layers/moe/(gate|up|down)_proj/kernel")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--dispatch", choices=DISPATCHES, default=None,
                   help="MoE presets: token dispatch (default dropless)")
    p.add_argument("--grouped-impl", choices=GROUPED_IMPLS, default=None,
                   help="MoE presets, dropless: the expert product (default auto: blocks on CPU)")
    p.add_argument("--block-size", type=int, default=None,
                   help="MoE presets, --grouped-impl blocks/auto: rows per expert block (128)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="MoE presets, capacity dispatch: slots C = ceil(cf * T * k / E) "
                        "(default 1.25)")
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=512, help="sequence length (tokens)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--remat", default="none",
                   help="remat policy: none | full | dots | dots_no_batch | save_attn_out")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (params and optimizer state stay float32)")
    p.add_argument("--attention-impl", default="auto",
                   choices=("auto", "xla", "blocked", "cudnn", "splash"),
                   help="attention core (ModelConfig.attention_impl; auto: blocked on CPU)")
    p.add_argument("--fused-head", type=int, default=1, choices=(0, 1),
                   help="1: LM head fused with the cross-entropy (the SFT default); 0: logits, "
                        "then token_cross_entropy")
    p.add_argument("--scan-layers", type=int, default=1, choices=(0, 1),
                   help="1: lax.scan over stacked layers (default); 0: unrolled layers")
    p.add_argument("--devices", type=int, default=0,
                   help="CPU only: fake host devices (sets --xla_force_host_platform_device_count;"
                        " 0 keeps the environment's setting)")
    p.add_argument("--mesh", default="data=-1",
                   help="mesh axis sizes, e.g. 'data=-1' or 'fsdp=4,tensor=2'")
    p.add_argument("--rules", default="fsdp", help="sharding rule preset (dp fsdp fsdp_tp tp)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s per device for MFU (0: table or measured matmul)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS, appended to the environment's")
    p.add_argument("--profile", default="",
                   help="write a jax.profiler trace of the timed steps to this directory")
    p.add_argument("--dump-hlo", default="",
                   help="write the optimized HLO of the step and its cost analysis here")
    args = p.parse_args(argv)
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.preset not in MOE_PRESETS:
        for flag in ("dispatch", "capacity_factor", "grouped_impl", "block_size"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} applies to MoE presets only "
                        f"({', '.join(MOE_PRESETS)}), not --preset {args.preset}")
    else:
        args.dispatch = args.dispatch or "dropless"
        if args.capacity_factor is not None and args.dispatch != "capacity":
            p.error("--capacity-factor needs --dispatch capacity")
        if args.capacity_factor is None:
            args.capacity_factor = 1.25
        elif args.capacity_factor <= 0:
            p.error("--capacity-factor must be > 0")
        args.grouped_impl = args.grouped_impl or "auto"
        if args.block_size is None:
            args.block_size = 128
        elif args.block_size < 1:
            p.error("--block-size must be >= 1")
    return args


def set_xla_env(args: argparse.Namespace) -> None:
    """XLA_FLAGS must be final before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if args.devices:
        flags = [f for f in flags if "xla_force_host_platform_device_count" not in f]
        flags.append(f"--xla_force_host_platform_device_count={args.devices}")
    flags += args.xla_flags.split()
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)


def log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


def parse_mesh(text: str) -> dict:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise SystemExit(f"--mesh item {item!r} is not axis=size (e.g. 'data=-1,fsdp=2')")
        k, v = (s.strip() for s in item.split("=", 1))
        sizes[k] = int(v)
    return sizes


def xla_analysis(compiled) -> dict:
    """XLA's own cost and memory figures for a compiled step (best effort, backend dependent).

    Note: XLA's cost analysis counts a while loop's body once, so with scanned layers its FLOPs
    cover one layer, not all of them; the MFU figure uses `loop.flops_per_token` instead.
    """
    out = {}
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["flops_one_loop_iteration"] = float(ca.get("flops", float("nan")))
        out["bytes_accessed"] = float(ca.get("bytes accessed", float("nan")))
    except Exception as e:  # pylint: disable=broad-except
        log(f"cost analysis unavailable: {e}")
    try:
        ma = compiled.memory_analysis()
        out["temp_mb"] = ma.temp_size_in_bytes / 2**20
        out["argument_mb"] = ma.argument_size_in_bytes / 2**20
        out["output_mb"] = ma.output_size_in_bytes / 2**20
        out["alias_mb"] = ma.alias_size_in_bytes / 2**20  # donated state aliased to the output
    except Exception as e:  # pylint: disable=broad-except
        log(f"memory analysis unavailable: {e}")
    return out


def summarize_profile(trace_dir: str, hlo_text: str, steps: int, top: int = 30) -> None:
    """Logs the XLA ops that took the most time per step in a jax.profiler trace (to stderr).

    Each op is shown with its shape and the jax op it came from (the HLO `op_name` metadata).
    Times are summed over threads, so concurrent ops can add up to more than the wall time.
    """
    import collections
    import glob
    import re
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        log(f"no .xplane.pb trace under {trace_dir}")
        return
    meta = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            meta.setdefault(m.group(1), (m.group(2)[:40], op.group(1) if op else ""))
    total, count, events = collections.Counter(), collections.Counter(), []
    for plane in ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "Threadpool",
                                       "while")):
                    continue  # containers and waits, not ops
                total[ev.name] += ev.duration_ns
                count[ev.name] += 1
                events.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
    if not total:
        log("the trace holds no XLA op events")
        return
    all_ms = sum(total.values()) / 1e6 / steps
    log(f"profile: {all_ms:.1f} ms of XLA ops per step (summed over threads); top {top}:")
    for name, ns in total.most_common(top):
        shape, op = meta.get(name, ("?", ""))
        log(f"  {ns / 1e6 / steps:8.2f} ms x{count[name] // steps:<3d} {name[:32]:32s} "
            f"{shape:40s} {op[-80:]}")
    # Wall time by op class: each moment is shared equally among the ops running then (XLA
    # runs independent ops side by side, and a product also spreads over the pool's threads
    # without showing it), so the classes add up to the time any op was running.
    edges = sorted([(t0, 1, i) for i, (t0, _, _) in enumerate(events)]
                   + [(t1, -1, i) for i, (_, t1, _) in enumerate(events)],
                   key=lambda e: (e[0], e[1]))
    classes, active, last = collections.Counter(), set(), None
    for t, kind, i in edges:
        if active and t > last:
            for j in active:
                name = events[j][2]
                classes[op_class(name, meta.get(name, ("", ""))[1])] += (t - last) / len(active)
        (active.add if kind == 1 else active.discard)(i)
        last = t
    busy = sum(classes.values())
    log(f"profile by op class: ms of wall time per step, shared among concurrent ops "
        f"({busy / 1e6 / steps:.1f} ms with an op running; docs/performance.md):")
    for cls, ns in classes.most_common():
        log(f"  {ns / 1e6 / steps:8.2f} ms {100 * ns / busy:5.1f}%  {cls}")


def op_class(name: str, op_name: str) -> str:
    """The class of one XLA:CPU op for the profile breakdown, from its HLO name and the jax
    op it came from: matrix products (split into the LM head, attention's score/value
    products and the rest), then the non-matmul fusions by what they do."""
    n = name.lower()
    if n.startswith(("dot", "convolution")) or "dot_general" in op_name:
        if "btv" in op_name or "btd,vd" in op_name:
            return "matmul: LM head (fwd + bwd)"
        if "bkgt" in op_name:  # the attention core's einsums (layers._core_*)
            return "matmul: attention scores / values"
        return "matmul: projections and MLP"
    if "while" in n or "conditional" in n or "call" == n[:4]:
        return "control flow (scan / while overhead)"
    if any(k in n for k in ("gather", "scatter", "dynamic-slice", "dynamic-update", "dynamic_")):
        return "gather / scatter / dynamic slices (embeddings, scan carries)"
    if n.startswith(("copy", "transpose", "bitcast", "concatenate", "slice", "pad")) or \
            n.startswith("wrapped_broadcast") or n.startswith("broadcast"):
        return "copies, transposes, broadcasts"
    if "reduce" in n or "reduce" in op_name:
        return "reductions (softmax, norms, loss sums, grad norms)"
    return "elementwise fusions (norms, rope, activations, softmax, optimizer)"


def active_params_per_token(model_cfg) -> int:
    """Params a token passes through: all but the E - k experts it is not routed to
    (embeddings and LM head included, as Mixtral counts its 12.9B "active" params)."""
    import jax
    import numpy as np
    from ftjax import models
    total = 0.0
    for s in jax.tree.leaves(models.param_specs(model_cfg),
                             is_leaf=lambda x: isinstance(x, models.transformer.Spec)):
        n = float(np.prod(s.shape))
        if "expert" in s.axes:
            n *= model_cfg.num_experts_per_tok / model_cfg.num_experts
        total += n
    return int(round(total))


def moe_fields(model_cfg, args, metrics: dict) -> dict:
    """The MoE part of the JSON line (see the module docstring)."""
    import numpy as np
    from ftjax.models import moe
    e, k = model_cfg.num_experts, model_cfg.num_experts_per_tok
    out = {"dispatch": model_cfg.moe_dispatch, "experts": e, "top_k": k,
           "grouped_impl": moe.grouped_impl(model_cfg) if model_cfg.moe_dispatch == "dropless"
           else None, "block_size": model_cfg.moe_block_size,
           "expert_intermediate": model_cfg.expert_width,
           "active_params_per_token": active_params_per_token(model_cfg)}
    if model_cfg.moe_dispatch == "capacity":
        c = moe.capacity(model_cfg, args.seq)
        out.update(capacity_factor=model_cfg.capacity_factor, capacity_slots=c,
                   capacity_compute_ratio=e * c / (k * args.seq))
    for name in ("dropped", "aux_loss"):  # the last timed step, mean over layers
        if f"moe_{name}" in metrics:
            out[f"moe_{name}"] = float(np.mean(np.asarray(metrics[f"moe_{name}"])))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    set_xla_env(args)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from ftjax import hostmem, models, monitor, sharding
    from ftjax.train import loop, optim
    from ftjax.train.state import create_state
    from ftjax.train.step import jit_train_step, make_train_step, sft_loss

    fields = dict(dtype=args.dtype, param_dtype="float32", remat=args.remat,
                  scan_layers=bool(args.scan_layers), attention_impl=args.attention_impl,
                  rope_theta=10000.0, norm_eps=1e-5,
                  tie_embeddings=False, max_position_embeddings=max(4096, args.seq))
    if args.preset in MOE_PRESETS:
        model_cfg = models.preset("mixtral", **MOE_PRESETS[args.preset], **fields,
                                  moe_dispatch=args.dispatch,
                                  capacity_factor=args.capacity_factor,
                                  moe_grouped_impl=args.grouped_impl,
                                  moe_block_size=args.block_size)
    else:
        model_cfg = models.preset("llama", size=args.preset, **fields)
    is_moe = model_cfg.num_experts > 0
    cfg = ml_collections.ConfigDict()
    cfg.mesh = ml_collections.ConfigDict(parse_mesh(args.mesh))
    cfg.sharding = ml_collections.ConfigDict(dict(rules=args.rules))
    opt_cfg = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=args.lr, schedule="constant", warmup_steps=0,
        weight_decay=args.weight_decay, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip_norm=args.grad_clip))
    placement = loop.Placement(cfg, model_cfg)
    sharding.check_batch_divisible(args.batch, placement.mesh, placement.rules)
    n_dev = placement.mesh.size
    dev = jax.devices()[0]
    log(f"{args.preset}/{args.mode} batch {args.batch} seq {args.seq} dtype {args.dtype} "
        f"remat {args.remat} on {n_dev}x {dev.platform}:{dev.device_kind} "
        f"mesh {dict(placement.mesh.shape)} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    # Random tokens: `targets` are `inputs` shifted by one, every position counts in the loss.
    rng = np.random.default_rng(args.seed)
    n_batches = 2

    def host_batch():
        toks = rng.integers(0, model_cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
        return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
                "loss_mask": np.ones((args.batch, args.seq), np.float32)}

    batches = [placement.put_batch(host_batch()) for _ in range(n_batches)]

    loss_fn = sft_loss(model_cfg, fused_head=bool(args.fused_head))
    total_steps = 1 + args.warmup + args.steps
    init_fn = lambda: models.init(model_cfg, jax.random.PRNGKey(args.seed))
    params = jax.jit(init_fn, out_shardings=placement.params)()
    n_params = models.count_params(params)
    adapter_params = None  # full / forward: every weight counts as trainable (PaLM)
    extra = {"trainable_params": n_params,
             "base_weight_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params)))}

    if args.mode in ("lora", "qlora"):
        import functools
        from ftjax.peft import core as peft_core
        from ftjax.peft.lora import apply_lora
        from ftjax.peft.qlora import apply_qlora
        from ftjax.peft.quant import bits_per_param
        transform = functools.partial(apply_lora if args.mode == "lora" else apply_qlora,
                                      rank=LORA_RANK, alpha=LORA_ALPHA,
                                      targets=MOE_LORA_TARGETS if is_moe else LORA_TARGETS)
        tkey = loop.transform_key(args.seed)
        abstract = jax.eval_shape(transform, params, tkey)
        placement = loop.Placement(cfg, model_cfg, abstract_params=abstract)
        tparams = jax.jit(transform, out_shardings=placement.params)(params, tkey)
        del params
        mask = peft_core.trainable_mask(tparams, ())
        trainable, frozen = peft_core.partition(tparams, mask)
        del tparams
        tx, sched = optim.make_optimizer(opt_cfg, total_steps)
        make = lambda t, f: create_state(t, tx, args.seed, f)
        abstract_state = jax.eval_shape(make, trainable, frozen)
        state_sh = sharding.state_shardings(abstract_state, abstract, placement.params,
                                            placement.mesh)
        state = jax.jit(make, out_shardings=state_sh)(trainable, frozen)
        adapter_params = loop.adapter_params_per_token(model_cfg, trainable)
        extra = {"trainable_params": peft_core.count(trainable),
                 "base_weight_bytes": int(sum(x.nbytes for x in jax.tree.leaves(frozen))),
                 "adapted_base_bits_per_param": (bits_per_param(frozen) if args.mode == "qlora"
                                                 else 32.0),
                 "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA}
        del trainable, frozen
        fn = jit_train_step(make_train_step(loss_fn, tx, schedule=sched), state_sh,
                            placement.batch)
        carry = state
    elif args.mode == "full":
        tx, sched = optim.make_optimizer(opt_cfg, total_steps)
        abstract_state = jax.eval_shape(lambda p: create_state(p, tx, args.seed), params)
        state_sh = sharding.state_shardings(abstract_state, jax.eval_shape(lambda: params),
                                            placement.params, placement.mesh)
        state = jax.jit(lambda p: create_state(p, tx, args.seed), out_shardings=state_sh)(params)
        del params
        fn = jit_train_step(make_train_step(loss_fn, tx, schedule=sched), state_sh,
                            placement.batch)
        carry = state
    else:
        def forward(params, batch):
            obj, stats = loss_fn(params, batch, jax.random.PRNGKey(0))
            return obj / jnp.maximum(stats["tokens"], 1.0)
        fn = jax.jit(forward, in_shardings=(placement.params, placement.batch),
                     out_shardings=placement.replicated)
        carry = params

    t0 = time.perf_counter()
    lowered = fn.lower(carry, batches[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    hostmem.trim()  # the compiler's freed memory: back to the system before the steps
    log(f"compiled in {compile_s:.2f}s")

    xla = xla_analysis(compiled)
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        name = f"{args.preset}_{args.mode}_b{args.batch}_t{args.seq}" + (
            f"_{args.dispatch}" if is_moe else "")
        with open(os.path.join(args.dump_hlo, f"{name}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
        with open(os.path.join(args.dump_hlo, f"{name}.cost.json"), "w") as f:
            json.dump(xla, f, indent=1)

    last_metrics = {}

    def run_one(i):
        nonlocal carry, last_metrics
        b = batches[i % n_batches]
        if args.mode != "forward":
            old = carry
            carry, metrics = compiled(carry, b)
            jax.block_until_ready((carry, metrics))
            last_metrics = metrics
            return float(metrics["loss"]), old
        loss = compiled(carry, b)
        jax.block_until_ready(loss)
        return float(loss), None

    t0 = time.perf_counter()
    loss_first, old_state = run_one(0)
    first_step_s = time.perf_counter() - t0
    donated = None
    if old_state is not None:  # donation worked iff the old state's buffers were consumed
        donated = all(x.is_deleted() for x in jax.tree.leaves(old_state.params))
        del old_state
    for i in range(args.warmup):
        run_one(1 + i)

    times, cpu_times, loss_last = [], [], loss_first
    rss = monitor.peak_rss_mb()  # init, transforms, compile and warm-up included
    steps_only = monitor.reset_peak_rss()
    if args.profile:
        jax.profiler.start_trace(args.profile)
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss_last, _ = run_one(1 + args.warmup + i)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if args.profile:
        jax.profiler.stop_trace()
        summarize_profile(args.profile, compiled.as_text(), args.steps)
    rss_steps = monitor.vm_hwm_mb() if steps_only else None
    rss = max(rss, monitor.peak_rss_mb(), rss_steps or 0.0)

    median = statistics.median(times)
    tokens = args.batch * args.seq
    training = args.mode != "forward"
    fpt = loop.flops_per_token(model_cfg, args.seq, training=training,
                               adapter_params=adapter_params)
    fpt_6n = loop.flops_per_token(model_cfg, args.seq, training=training)
    peak, peak_src = monitor.peak_flops_per_device(dev, override=args.peak_flops or None)
    thr = monitor.Throughput(tokens, fpt, n_devices=n_dev, peak_flops_per_device=peak)
    m = thr.measure(1, median)

    row = {
        "framework": "jax",
        "preset": args.preset,
        "mode": args.mode,
        "batch": args.batch,
        "seq": args.seq,
        "params": n_params,
        **extra,
        "step_time_median_s": median,
        "tokens_per_s": m["tokens_per_s"],
        "compile_s": compile_s,
        "mfu": m["mfu"],
        "mfu_6n": m["mfu"] if fpt_6n == fpt else m["mfu"] * fpt_6n / fpt,
        "flops_convention": loop.flops_convention(training, adapter_params is not None),
        "peak_rss_mb": rss,
        "peak_rss_steps_mb": rss_steps,
        "host_malloc": hostmem.active(),
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "cpu_time_median_s": statistics.median(cpu_times),
        "load_avg_1m": [load_start, os.getloadavg()[0]],  # at start and end (shared hosts)
        "first_step_s": first_step_s,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "remat": args.remat,
        "scan_layers": bool(args.scan_layers),
        "attention_impl": args.attention_impl,
        "fused_head": bool(args.fused_head),
        "flops_per_token": fpt,
        "flops_per_token_6n": fpt_6n,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "donated": donated,
        "xla_temp_mb": xla.get("temp_mb"),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "n_devices": n_dev,
        "mesh": {k: int(v) for k, v in placement.mesh.shape.items() if v > 1},
        "jax_version": jax.__version__,
        "peak_flops": peak,
        "peak_flops_source": peak_src,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if is_moe:
        row.update(moe_fields(model_cfg, args, last_metrics))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    from ftjax import hostmem
    hostmem.reexec_tuned()  # the allocator ftjax's entry points use (docs/performance.md)
    main()
