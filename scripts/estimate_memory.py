"""Per-device memory of a run's training step, from shapes alone: nothing is allocated or run.

    python scripts/estimate_memory.py configs/lora_sft.py
    python scripts/estimate_memory.py configs/sft_synthetic.py:steps=5 --mesh data=2,fsdp=4 --devices 8
    python scripts/estimate_memory.py llama-7b --peft lora --batch 8 --seq 2048 --mesh fsdp=8 \\
        --devices 8 --layers 4 --json
    python scripts/estimate_memory.py small --config.model.remat=dots

CONFIG is a config file (`configs/NAME.py[:args]`, as for `ftjax.main`) or a preset shape:
tiny, small (`ftjax.models.config.SIZES`) or one of SHAPES below (Llama 1B / 7B / 8B / 13B),
trained like `configs/sft_synthetic.py` from a random init (full fine-tuning unless `--peft`).
The run is set up as a trainer sets it up (`Run.build`: model config, PEFT transform,
placement; a checkpoint named by `model.init_from` is never read, only its architecture), its
abstract training state comes from `loop.step_setup` (`jax.eval_shape`), and the real jitted
step (`loop.jit_step`, the SFT objective) is lowered and compiled on `jax.ShapeDtypeStruct`
inputs. Reported, per device:

  params (trainable, frozen)  from each leaf's sharding (`sharding.shard_shape`)
  optimizer state             the same for the optimizer's leaves (AdamW: 2x the trainable)
  batch                       the step's input rows on one device
  activations (XLA temp)      XLA's temporary buffers of the compiled step: activations kept
                              for the backward, gradients and workspace
  compiled arguments / outputs / aliased (donated) / temp, and their peak
                              `compiled.memory_analysis()`; peak = args + outputs - alias + temp

`--json` prints one JSON line instead of the table. On CPU, `--devices N` makes N fake devices
(`--xla_force_host_platform_device_count`) so a mesh of N can be compiled on one machine. XLA
CPU compiles a big model's step in seconds to a minute (scanned layers compile once);
`--layers` shortens the stack (params, state and activations scale with it, the LM head does
not). Trainers other than SFT-like ones (DPO, classification) are estimated with the SFT
objective, which undercounts their extra forward passes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published shapes (untied embeddings unless noted), random init: nothing is downloaded.
SHAPES = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, tie_embeddings=True,
                     rope_theta=500000.0),                      # Llama 3.2 1B
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_layers=32, num_heads=32, num_kv_heads=32),  # Llama 2 7B
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_layers=32, num_heads=32, num_kv_heads=8,
                     rope_theta=500000.0),                      # Llama 3 8B
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                      num_layers=40, num_heads=40, num_kv_heads=40),  # Llama 2 13B
}
PRESET_BATCH, PRESET_SEQ = 4, 512


def parse_args(argv=None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any --config.KEY=VALUE is applied as on the ftjax command line.")
    p.add_argument("config", help="configs/NAME.py[:args], or a preset: tiny small "
                                  + " ".join(SHAPES))
    p.add_argument("--mesh", default="", help="mesh axis sizes, e.g. 'data=2,fsdp=4' (axes not "
                                              "named are 1; default: the config's mesh)")
    p.add_argument("--rules", default="", help="sharding rule preset (dp fsdp fsdp_tp tp ep)")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's; "
                   f"presets {PRESET_BATCH}, rounded up to a multiple of the device count)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's; "
                   f"presets {PRESET_SEQ})")
    p.add_argument("--layers", type=int, default=0, help="override model.num_layers")
    p.add_argument("--peft", default="", help="peft.method (e.g. lora, qlora, full)")
    p.add_argument("--devices", type=int, default=0,
                   help="CPU: fake host devices (0 keeps the environment's XLA_FLAGS)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not (item.startswith("--config.") and "=" in item):
            p.error(f"unrecognized argument {item!r} (overrides are --config.KEY=VALUE)")
        key, value = item[len("--config."):].split("=", 1)
        overrides.append((key, value))
    for name in ("batch", "seq", "layers", "devices"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    return args, overrides


def set_xla_env(devices: int) -> None:
    """XLA_FLAGS must be final before jax is imported."""
    if not devices:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def parse_mesh(text: str) -> dict:
    sizes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise SystemExit(f"--mesh item {item!r} is not axis=size (e.g. 'data=2,fsdp=4')")
        k, v = (s.strip() for s in item.split("=", 1))
        sizes[k] = int(v)
    return sizes


def load_config(spec: str, args, overrides):
    """The resolved experiment config of a config file or a preset, with the flags applied."""
    import ml_collections

    from ftjax import config_utils
    from ftjax.models.config import SIZES, preset
    from ftjax.trainers import resolve_config

    is_preset = spec in SIZES or spec in SHAPES
    if is_preset:
        cfg = config_utils.load_config(os.path.join(ROOT, "configs", "sft_synthetic.py"))
        shape = dict(SIZES.get(spec) or SHAPES[spec])
        shape.setdefault("max_position_embeddings", max(4096, args.seq or PRESET_SEQ))
        model = preset("llama", **shape).to_dict()
        cfg.model = ml_collections.ConfigDict({**model, "init_from": ""})
        cfg.data.eval_before = False
    else:
        cfg = config_utils.load_config(spec)
    flags = list(overrides)
    if args.peft:
        flags.insert(0, ("peft.method", args.peft))
    if args.layers:
        flags.append(("model.num_layers", str(args.layers)))
    if args.rules:
        flags.append(("sharding.rules", args.rules))
    seq = args.seq or (PRESET_SEQ if is_preset else 0)
    if seq:
        flags.append(("train.seq_len", str(seq)))
        if is_preset or int(cfg.model.max_position_embeddings) < seq:
            flags.append(("model.max_position_embeddings", str(max(seq, 4096 if is_preset
                                                                   else seq))))
    cfg = resolve_config(cfg, flags)
    if args.mesh:
        cfg.mesh = ml_collections.ConfigDict(parse_mesh(args.mesh))
    return cfg, is_preset


def abstract_batch(batch: int, seq: int) -> dict:
    """The SFT step's global batch as ShapeDtypeStructs (`data.batching.BATCH_KEYS`)."""
    import jax
    import jax.numpy as jnp
    from ftjax.data.batching import BATCH_KEYS
    return {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
            for k in BATCH_KEYS}


def _itemsize(dtype) -> int:
    import numpy as np
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (typed PRNG keys)
        return 8


def bytes_of(tree, shardings=None) -> tuple[int, int]:
    """(bytes of the whole tree, bytes one device holds): each leaf's shard under its sharding
    (the largest shard, i.e. device 0's for evenly divided leaves)."""
    import jax
    leaves = jax.tree.leaves(tree)
    shs = ([None] * len(leaves) if shardings is None
           else jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
    if len(shs) != len(leaves):
        raise ValueError(f"{len(leaves)} leaves but {len(shs)} shardings")
    total = per_device = 0
    for x, sh in zip(leaves, shs):
        n = _itemsize(x.dtype)
        total += math.prod(x.shape) * n
        shard = x.shape if sh is None else sh.shard_shape(x.shape)
        per_device += math.prod(shard) * n
    return total, per_device


def estimate(args, overrides, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import jax

    from ftjax import models
    from ftjax.peft import core as peft_core
    from ftjax.train import loop
    from ftjax.train.run import Run
    from ftjax.train.step import sft_loss

    cfg, is_preset = load_config(args.config, args, overrides)
    if is_preset and not args.batch:  # the default rows, divisible over any mesh
        n = jax.device_count()
        cfg.train.batch_size = max(1, math.ceil(PRESET_BATCH / n)) * n
    if args.batch:
        cfg.train.batch_size = args.batch
    from ftjax.trainers import validate_config
    validate_config(cfg)
    trainer = cfg.get("trainer", "sft")
    if trainer not in ("sft", "quickstart", "memory_tuning"):
        log(f"[estimate_memory] trainer {trainer!r}: estimated with the SFT objective (one "
            "forward and backward), which leaves out its other passes")

    run = Run.build(cfg, "/nonexistent-estimate-memory", name="estimate")
    setup = loop.step_setup(run)
    loss_fn = sft_loss(run.model_cfg, float(cfg.train.z_loss), run.method.apply_fn,
                       run.method.bind_rng)
    step = loop.jit_step(run, loss_fn, setup)
    batch, seq = int(cfg.train.batch_size), int(cfg.train.seq_len)
    state, state_sh = setup.abstract_state, setup.state_shardings
    t0 = time.perf_counter()
    compiled = step.lower(state, abstract_batch(batch, seq)).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()

    mesh = run.placement.mesh
    trainable = bytes_of(state.params, state_sh.params)
    frozen = (bytes_of(state.frozen, state_sh.frozen) if state.frozen is not None else (0, 0))
    opt = bytes_of(state.opt_state, state_sh.opt_state)
    other = bytes_of((state.step, state.rng), (state_sh.step, state_sh.rng))
    bt = abstract_batch(batch, seq)
    batch_bytes = bytes_of(bt, jax.tree.map(lambda _: run.placement.batch, bt))
    mc = run.model_cfg
    xla = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "generated_code": int(getattr(ma, "generated_code_size_in_bytes", 0) or 0),
    }
    xla["peak"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    return {
        "config": args.config,
        "trainer": trainer,
        "peft_method": run.method.name,
        "model": {"family": mc.family, "vocab_size": mc.vocab_size,
                  "hidden_size": mc.hidden_size, "intermediate_size": mc.intermediate_size,
                  "num_layers": mc.num_layers, "num_heads": mc.num_heads,
                  "num_kv_heads": mc.num_kv_heads, "num_experts": mc.num_experts,
                  "dtype": mc.dtype, "param_dtype": mc.param_dtype, "remat": mc.remat,
                  "scan_layers": mc.scan_layers},
        "params": models.count_params(models.param_shapes(mc)),
        "trainable_params": peft_core.count(setup.train_abstract),
        "optimizer": str(cfg.optimizer.name),
        "batch": batch,
        "seq": seq,
        "accum_steps": setup.accum_steps,
        "n_devices": int(mesh.size),
        "mesh": {k: int(v) for k, v in mesh.shape.items() if v > 1},
        "rules": str(cfg.sharding.rules),
        "backend": jax.default_backend(),
        # Whole-run totals, then what one device holds.
        "total_bytes": {"params_trainable": trainable[0], "params_frozen": frozen[0],
                        "optimizer_state": opt[0]},
        "per_device_bytes": {
            "params_trainable": trainable[1],
            "params_frozen": frozen[1],
            "params": trainable[1] + frozen[1],
            "optimizer_state": opt[1],
            "state_other": other[1],
            "batch": batch_bytes[1],
            "activations_xla_temp": xla["temp"],
        },
        "xla_per_device_bytes": xla,
        "compile_s": compile_s,
        "jax_version": jax.__version__,
    }


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:10.2f} {unit}"
    return f"{n:10.0f} B  "


def table(row: dict) -> str:
    m, d, x = row["model"], row["per_device_bytes"], row["xla_per_device_bytes"]
    mesh = ",".join(f"{k}={v}" for k, v in row["mesh"].items()) or "one device"
    lines = [
        f"{row['config']}: trainer {row['trainer']}, peft {row['peft_method']}, "
        f"optimizer {row['optimizer']}",
        f"model {m['family']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"mlp {m['intermediate_size']}, heads {m['num_heads']}/{m['num_kv_heads']}, vocab "
        f"{m['vocab_size']}" + (f", {m['num_experts']} experts" if m["num_experts"] else "")
        + f"; {m['param_dtype']} params, {m['dtype']} compute, remat {m['remat']}",
        f"params {row['params']:,} (trainable {row['trainable_params']:,}); batch "
        f"{row['batch']} x seq {row['seq']} (accum {row['accum_steps']}); mesh {mesh} "
        f"({row['n_devices']} devices, rules {row['rules']})",
        "",
        "per device                                   bytes",
        f"  params, trainable                   {_fmt(d['params_trainable'])}",
        f"  params, frozen                      {_fmt(d['params_frozen'])}",
        f"  optimizer state                     {_fmt(d['optimizer_state'])}",
        f"  step counter, rng                   {_fmt(d['state_other'])}",
        f"  batch                               {_fmt(d['batch'])}",
        f"  activations, grads, workspace (temp){_fmt(d['activations_xla_temp'])}",
        "",
        "compiled step (XLA memory analysis, per device)",
        f"  arguments                           {_fmt(x['argument'])}",
        f"  outputs                             {_fmt(x['output'])}",
        f"  aliased (donated state)             {_fmt(x['alias'])}",
        f"  temp                                {_fmt(x['temp'])}",
        f"  peak = args + outputs - alias + temp{_fmt(x['peak'])}",
        f"  (compiled in {row['compile_s']:.1f} s on {row['backend']})",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    set_xla_env(args.devices)
    row = estimate(args, overrides)
    print(json.dumps(row) if args.json else table(row), flush=True)
    return row


if __name__ == "__main__":
    main()
