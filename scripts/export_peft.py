"""Exports a PEFT training run (LoRA, rsLoRA, DoRA, IA3) as a PEFT adapter or a merged HF model.

    # adapter directory for peft.PeftModel.from_pretrained(base_model, OUT)
    python scripts/export_peft.py --workdir WORKDIR --out OUT --format peft

    # merged Hugging Face directory for transformers.AutoModelForCausalLM.from_pretrained(OUT)
    python scripts/export_peft.py --workdir WORKDIR --out OUT --format merged [--dtype bfloat16]

The checkpoints of a PEFT run hold only the trained leaves; the frozen base is rebuilt as the
run built it (the config's `model.init_from`, or the seeded random init) and the run's PEFT
transform (`ftjax.peft.get_method(cfg.peft, apply_fn=models.apply)`) is re-applied with the run's key, then the
trained leaves of the latest (or --step N) checkpoint replace their initial values.
--format peft supports LoRA, rsLoRA, DoRA and IA3 runs (LoRA on Mixtral's router and
experts is written as PEFT `target_parameters`); runs with `peft.init=pissa` are
converted to a plain rank-2r adapter on the original base (as PEFT's
path_initial_model_for_weight_conversion does), and plain leaves that trained too (e.g.
`peft.train_patterns=("lm_head/.*",)`) are written as PEFT `modules_to_save`. --format
merged works for every method that only transforms weights (no prompt/prefix tuning).

Options: --base-model NAME (adapter_config.json's base_model_name_or_path; default the
init_from directory), --tokenizer DIR (copy tokenizer files; default the init_from
directory), --step, --dtype and --shard-size-mb (merged only).
See docs/peft_format.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--workdir", required=True, help="ftjax training workdir (config.json + "
                   "checkpoints/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("peft", "merged"), default="peft")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the init_from directory)")
    p.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from")
    p.add_argument("--dtype", default=None, help="merged storage dtype (float32, bfloat16, "
                   "float16; default the run's param_dtype)")
    p.add_argument("--shard-size-mb", type=float, default=5000.0)
    return p.parse_args(argv)


def _flat_with_fields(tree: Any) -> dict[str, Any]:
    """'layers/attn/q_proj/kernel/a' -> array: every array leaf, fields of structured weights
    included (the names orbax stores them under)."""
    import jax
    from ftjax.peft.core import path_str
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_peft_run(workdir: str, step: Optional[int] = None):
    """(ModelConfig, trained params, initial params, base params, run config, step, paths).

    The params carry the method's structured weights (LoRAWeight, DoRAWeight, ...); the
    initial ones are the transform's output before training (with the run's key), the base
    ones the untransformed model; paths lists the leaves read from the checkpoint.
    """
    import jax
    import numpy as np
    from ftjax import models
    from ftjax.io.restore import read_run_config, restore_params
    from ftjax.peft import get_method
    from ftjax.train import loop
    from ftjax.train.run import initial_params, model_config

    run_cfg = read_run_config(workdir)
    model_cfg = model_config(run_cfg.model)
    saved, step = restore_params(workdir, step)
    method = get_method(run_cfg.get("peft"), apply_fn=models.apply)
    if method.apply_fn is not None:
        raise ValueError(f"peft.method={method.name!r} changes the model's inputs (apply_fn); "
                         "it has no merged or PEFT LoRA form")
    base = jax.tree.map(np.asarray, initial_params(run_cfg, model_cfg)())
    key = loop.transform_key(int(run_cfg.seed))
    initial = jax.jit(method.transform)(base, key) if method.transform else base

    trained_flat = {k: v for k, v in _flat_with_fields(saved).items() if v is not None}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(initial)
    from ftjax.peft.core import path_str
    used, new, problems = set(), [], []
    for p, x in leaves:
        k = path_str(p)
        if k in trained_flat:
            t = trained_flat[k]
            if tuple(t.shape) != tuple(x.shape):
                problems.append(f"{k}: checkpoint {list(t.shape)}, rebuilt {list(x.shape)}")
            used.add(k)
            new.append(t)
        else:
            new.append(x)
    unused = sorted(set(trained_flat) - used)
    if unused:
        problems.append(f"checkpoint leaves with no place in the rebuilt params: {unused}")
    if problems:
        raise ValueError(f"checkpoint step {step} of {workdir!r} does not match the params "
                         f"rebuilt from its config ({method.name}): " + "; ".join(problems))
    trained = jax.tree_util.tree_unflatten(treedef, new)
    return model_cfg, trained, initial, base, run_cfg, step, sorted(used)


def main(argv=None) -> str:
    args = parse_args(argv)
    from ftjax.io import hf, peft_format
    from ftjax.io.params_file import flatten
    from ftjax.peft.core import is_structured, merge

    model_cfg, trained, initial, base, run_cfg, step, used = restore_peft_run(
        args.workdir, args.step)
    src = run_cfg.model.get("init_from", "") or ""
    src_dir = os.path.abspath(src[len("hf:"):]) if src.startswith("hf:") else None
    tokenizer = args.tokenizer or src_dir
    what = f"{args.workdir} step {step}"

    if args.format == "merged":
        import jax
        files = hf.save_pretrained(args.out, model_cfg, jax.device_get(merge(trained)),
                                   shard_size_mb=args.shard_size_mb, dtype=args.dtype,
                                   tokenizer_dir=tokenizer or None)
        print(f"wrote merged {model_cfg.family} model to {args.out} ({', '.join(files)}) "
              f"from {what}")
        return args.out

    # Plain leaves that trained in full (peft.train_patterns) go to PEFT's modules_to_save.
    structured = {p for p, w in flatten(trained).items() if is_structured(w)}
    plain_trained = sorted(k for k in used if not any(k.startswith(p + "/") for p in structured))
    pcfg = run_cfg.get("peft") or {}
    params = trained
    if pcfg.get("init", "default") == "pissa":
        params = peft_format.residual_to_standard(trained, initial, base)
    files = peft_format.save_peft_adapter(
        args.out, model_cfg, params,
        base_model_name_or_path=args.base_model if args.base_model is not None else (src_dir or ""),
        use_rslora=bool(pcfg.get("rslora", False)) or None, modules_to_save=plain_trained)
    if tokenizer:
        files += hf.copy_tokenizer_files(tokenizer, args.out)
    print(f"wrote PEFT adapter to {args.out} ({', '.join(files)}) from {what}")
    return args.out


if __name__ == "__main__":
    from ftjax.cli import run_main
    run_main(main)
