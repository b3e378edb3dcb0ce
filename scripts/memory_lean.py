"""Peak memory of one compiled training step on the `small` llama preset, for the memory-lean
methods against AdamW full fine-tuning (docs/memory_lean.md):

    python scripts/memory_lean.py                 # JSON, one object with a row per method
    python scripts/memory_lean.py --markdown      # the table of docs/memory_lean.md
    python scripts/memory_lean.py --only adamw,mezo --seq 256

Every row but LOMO is the real jitted step of the loop (`loop.jit_step` through
`scripts/estimate_memory.py:estimate`, the SFT objective, donated state) with a different
optimizer or PEFT method: adamw / sgd (full fine-tuning), mezo (`optimizer.name=mezo`), lora,
lora_fa, dylora (`peft.dynamic_rank=True`). LOMO is `ftjax.train.lomo.make_lomo_step` jitted
with donated params on the same model and batch. Numbers are XLA's `memory_analysis()` of the
compiled step (nothing is allocated or run): argument, output, alias (donated), temp, and
peak = argument + output - alias + temp; plus params and optimizer-state bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import estimate_memory as em  # noqa: E402

NO_CLIP = [("optimizer.grad_clip_norm", "0")]
LOOP_ROWS = {  # method -> (--peft, --config overrides)
    "adamw": ("", []),
    "sgd": ("", [("optimizer.name", "sgd"), ("optimizer.momentum", "0")] + NO_CLIP),
    "mezo": ("", [("optimizer.name", "mezo")] + NO_CLIP),
    "lora": ("lora", []),
    "lora_fa": ("lora_fa", []),
    "dylora": ("lora", [("peft.dynamic_rank", "True")]),
}
METHODS = ("adamw", "sgd", "mezo", "lomo", "lora", "lora_fa", "dylora")


def _row(method: str, xla: dict, params: int, trainable: int, opt: int, extra=None) -> dict:
    return {"method": method, "trainable_params": trainable, "params_bytes": params,
            "optimizer_state_bytes": opt, **{f"xla_{k}": v for k, v in xla.items()},
            **(extra or {})}


def loop_row(method: str, batch: int, seq: int) -> dict:
    peft_name, overrides = LOOP_ROWS[method]
    argv = ["small", "--batch", str(batch), "--seq", str(seq)]
    if peft_name:
        argv += ["--peft", peft_name]
    args, _ = em.parse_args(argv)
    r = em.estimate(args, overrides, log=lambda m: None)
    d = r["per_device_bytes"]
    return _row(method, r["xla_per_device_bytes"], d["params"], r["trainable_params"],
                d["optimizer_state"], {"remat": r["model"]["remat"]})


def lomo_row(batch: int, seq: int) -> dict:
    import jax

    from ftjax.train import lomo
    from ftjax.train.run import Run

    args, _ = em.parse_args(["small", "--batch", str(batch), "--seq", str(seq)])
    cfg, _ = em.load_config("small", args, [])
    cfg.train.batch_size = batch
    mcfg = Run.build(cfg, "/nonexistent-memory-lean", name="lomo").model_cfg
    from ftjax import models
    params = models.param_shapes(mcfg)
    step = jax.jit(lomo.make_lomo_step(mcfg, learning_rate=1e-3), donate_argnums=0)
    ma = step.lower(params, em.abstract_batch(batch, seq), 0).compile().memory_analysis()
    xla = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes)}
    xla["peak"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    p_bytes, _ = em.bytes_of(params)
    return _row("lomo", xla, p_bytes, models.count_params(params), 0,
                {"remat": "layer inputs kept (as full)"})


def markdown(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:,.1f}"
    base = next((r["xla_peak"] for r in rows if r["method"] == "adamw"), None)
    out = ["| method | trainable params | params MiB | opt state MiB | argument MiB | "
           "output MiB | alias MiB | temp MiB | peak MiB | peak vs AdamW |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['xla_peak'] / base:.2f}x" if base else ""
        out.append(f"| {r['method']} | {r['trainable_params']:,} | {mib(r['params_bytes'])} | "
                   f"{mib(r['optimizer_state_bytes'])} | {mib(r['xla_argument'])} | "
                   f"{mib(r['xla_output'])} | {mib(r['xla_alias'])} | {mib(r['xla_temp'])} | "
                   f"{mib(r['xla_peak'])} | {rel} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=em.PRESET_BATCH)
    p.add_argument("--seq", type=int, default=em.PRESET_SEQ)
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    a = p.parse_args(argv)
    methods = [m for m in a.only.split(",") if m] or list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    rows = []
    for m in methods:
        rows.append(lomo_row(a.batch, a.seq) if m == "lomo" else loop_row(m, a.batch, a.seq))
        print(f"[memory_lean] {m}: peak {rows[-1]['xla_peak'] / 2**20:,.1f} MiB",
              file=sys.stderr, flush=True)
    import jax
    meta = {"model": "llama small", "batch": a.batch, "seq": a.seq,
            "backend": jax.default_backend(), "jax_version": jax.__version__}
    print(markdown(rows) if a.markdown else json.dumps({**meta, "rows": rows}), flush=True)
    return rows


if __name__ == "__main__":
    main()
