"""QLoRA against LoRA at equal rank in one process, steps alternated; prints one JSON line.

    python scripts/benchmark_qlora.py --preset tiny --steps 10
    python scripts/benchmark_qlora.py --preset small --steps 6 --quant int8

Both training steps are built exactly as `scripts/benchmark.py --mode lora` / `--mode qlora`
build theirs (rank 16, alpha 32 on the seven attention and MLP projections, AdamW, random
tokens, batch 4 x 512, float32), compiled ahead of time, warmed up, then run alternately
(lora, qlora, lora, qlora, ...) so that both see the same machine load: on a shared host this
ratio is far steadier than one from separate processes. Reports each mode's median step time,
`qlora_over_lora` (ratio of the medians) and the median of the per-pair ratios, with XLA's
temp bytes of each compiled step and the bytes of each frozen base. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    p.add_argument("--quant", choices=("nf4", "int8"), default="nf4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import ml_collections
    import numpy as np

    import benchmark as bm
    from ftjax import models, sharding
    from ftjax.peft import core as peft_core
    from ftjax.peft.lora import apply_lora
    from ftjax.peft.qlora import apply_qlora
    from ftjax.train import loop, optim
    from ftjax.train.state import create_state
    from ftjax.train.step import jit_train_step, make_train_step, sft_loss

    model_cfg = models.preset("llama", size=args.preset, dtype="float32", param_dtype="float32",
                              remat="none", scan_layers=True, rope_theta=10000.0, norm_eps=1e-5,
                              tie_embeddings=False,
                              max_position_embeddings=max(4096, args.seq))
    cfg = ml_collections.ConfigDict()
    cfg.mesh = ml_collections.ConfigDict(bm.parse_mesh("data=-1"))
    cfg.sharding = ml_collections.ConfigDict(dict(rules="fsdp"))
    opt_cfg = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=0,
        weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0))
    total_steps = 1 + args.warmup + args.steps
    rng = np.random.default_rng(args.seed)
    loss_fn = sft_loss(model_cfg)
    base_placement = loop.Placement(cfg, model_cfg)

    def host_batch():
        toks = rng.integers(0, model_cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
        return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
                "loss_mask": np.ones((args.batch, args.seq), np.float32)}

    batches = [host_batch() for _ in range(2)]
    runs = {}
    for mode in ("lora", "qlora"):
        params = jax.jit(lambda: models.init(model_cfg, jax.random.PRNGKey(args.seed)),
                         out_shardings=base_placement.params)()
        transform = functools.partial(
            apply_lora, rank=bm.LORA_RANK, alpha=bm.LORA_ALPHA, targets=bm.LORA_TARGETS
        ) if mode == "lora" else functools.partial(
            apply_qlora, rank=bm.LORA_RANK, alpha=bm.LORA_ALPHA, targets=bm.LORA_TARGETS,
            quant_kind=args.quant)
        tkey = loop.transform_key(args.seed)
        abstract = jax.eval_shape(transform, params, tkey)
        placement = loop.Placement(cfg, model_cfg, abstract_params=abstract)
        tparams = jax.jit(transform, out_shardings=placement.params)(params, tkey)
        del params
        trainable, frozen = peft_core.partition(tparams, peft_core.trainable_mask(tparams, ()))
        del tparams
        tx, sched = optim.make_optimizer(opt_cfg, total_steps)
        make = lambda t, f, tx=tx: create_state(t, tx, args.seed, f)
        state_sh = sharding.state_shardings(jax.eval_shape(make, trainable, frozen), abstract,
                                            placement.params, placement.mesh)
        state = jax.jit(make, out_shardings=state_sh)(trainable, frozen)
        base_bytes = int(sum(x.nbytes for x in jax.tree.leaves(frozen)))
        del trainable, frozen
        fn = jit_train_step(make_train_step(loss_fn, tx, schedule=sched), state_sh,
                            placement.batch)
        dev_batches = [placement.put_batch(b) for b in batches]
        compiled = fn.lower(state, dev_batches[0]).compile()
        runs[mode] = dict(state=state, compiled=compiled, batches=dev_batches, times=[],
                          base_weight_bytes=base_bytes,
                          xla_temp_mb=bm.xla_analysis(compiled).get("temp_mb"))
        bm.log(f"{mode}: compiled, frozen base {base_bytes / 2**20:.1f} MiB")

    def step(mode, i):
        r = runs[mode]
        t0 = time.perf_counter()
        r["state"], metrics = r["compiled"](r["state"], r["batches"][i % 2])
        jax.block_until_ready((r["state"], metrics))
        r["loss"] = float(metrics["loss"])
        return time.perf_counter() - t0

    load_start = os.getloadavg()[0]
    for i in range(1 + args.warmup):
        for mode in runs:
            step(mode, i)
    ratios = []
    for i in range(args.steps):
        t = {mode: step(mode, 1 + args.warmup + i) for mode in runs}
        for mode in runs:
            runs[mode]["times"].append(t[mode])
        ratios.append(t["qlora"] / t["lora"])
    med = {m: statistics.median(r["times"]) for m, r in runs.items()}
    row = {"preset": args.preset, "quant": args.quant, "batch": args.batch, "seq": args.seq,
           "lora_rank": bm.LORA_RANK, "steps": args.steps,
           "lora_step_s": med["lora"], "qlora_step_s": med["qlora"],
           "qlora_over_lora": med["qlora"] / med["lora"],
           "pair_ratio_median": statistics.median(ratios),
           "lora_times": runs["lora"]["times"], "qlora_times": runs["qlora"]["times"],
           **{f"{m}_{k}": r[k] for m, r in runs.items()
              for k in ("xla_temp_mb", "base_weight_bytes", "loss")},
           "load_avg_1m": [load_start, os.getloadavg()[0]],
           "jax_version": jax.__version__, "cpu_count": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    from ftjax import hostmem
    hostmem.reexec_tuned()
    main()
