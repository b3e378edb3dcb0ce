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

Every exported directory is complete: weights and config (or the adapter), the tokenizer
files (the init_from directory's, else the built-in character tokenizer's; --tokenizer DIR
to copy others) and the chat template the run trained with (`chat_template.jinja`), so
transformers' AutoTokenizer / AutoModelForCausalLM and scripts/generate.py load it. For
--format peft the adapter's base_model_name_or_path names a base that exists: the init_from
directory (model.init_from=hf:DIR), else the rebuilt base written as a Hugging Face directory
to --base-out (default OUT/base; an ftjax params file or a seeded random init has no other
form transformers can load). --base-model NAME records NAME instead and writes no base.

The base is checked before anything is written: the fingerprint of the base weights recorded
with the checkpoint (`ftjax.io.fingerprint`) must match the rebuilt one, so a base file that
changed or was replaced since training is refused instead of silently giving another model.
A workdir without checkpoints of its own is searched for its one sub-run that has them (the
quickstart's `finetune/`). Other options: --step, --dtype and --shard-size-mb (merged only).
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
                   "checkpoints/, or a quickstart workdir with finetune/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("peft", "merged"), default="peft")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the init_from directory, "
                        "else the base written to --base-out)")
    p.add_argument("--base-out", default=None,
                   help="--format peft: where to write the rebuilt base when it is not a "
                        "Hugging Face directory already (default: OUT/base)")
    p.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from")
    p.add_argument("--dtype", default=None, help="merged storage dtype (float32, bfloat16, "
                   "float16; default the run's param_dtype)")
    p.add_argument("--shard-size-mb", type=float, default=5000.0)
    return p.parse_args(argv)


def restore_peft_run(workdir: str, step: Optional[int] = None):
    """(ModelConfig, trained params, initial params, base params, run config, step, paths):
    `ftjax.train.restore_run.restore_run` for the methods this script exports (those that
    only transform weights)."""
    from ftjax.train.restore_run import restore_run
    r = restore_run(workdir, step)
    if r.method.apply_fn is not None:
        raise ValueError(f"peft.method={r.method.name!r} changes the model's inputs (apply_fn); "
                         "it has no merged or PEFT LoRA form")
    initial = r.initial if r.initial is not None else r.params
    base = r.base if r.base is not None else r.params
    return r.model_cfg, r.params, initial, base, r.run_cfg, r.step, r.used


def main(argv=None) -> str:
    args = parse_args(argv)
    from ftjax.io import peft_format
    from ftjax.io.params_file import flatten
    from ftjax.io.restore import find_run
    from ftjax.models import upcycle
    from ftjax.peft.core import is_structured, merge
    from ftjax.train.export import save_model, trained_template, write_tokenizer
    from ftjax.train.run import base_source, tokenizer_for

    workdir, note = find_run(args.workdir)
    if note:
        print(note)
    model_cfg, trained, initial, base, run_cfg, step, used = restore_peft_run(workdir, args.step)
    tok = tokenizer_for(run_cfg)
    template_name, template = trained_template(run_cfg, tok)
    src = run_cfg.model.get("init_from", "") or ""
    # The init_from directory is the adapter's base unless the run changed it (upcycling).
    src_dir = (os.path.abspath(src[len("hf:"):]) if src.startswith("hf:")
               and not upcycle.enabled(run_cfg.model.get("upcycle")) else None)
    what = f"{workdir} step {step}"
    extras = f"tokenizer files and chat template {template_name!r}"

    if args.format == "merged":
        import jax
        files = save_model(args.out, model_cfg, jax.device_get(merge(trained)), tok, template,
                           tokenizer_dir=args.tokenizer, shard_size_mb=args.shard_size_mb,
                           dtype=args.dtype)
        print(f"wrote merged {model_cfg.family} model to {args.out} ({', '.join(files)}; "
              f"{extras}) from {what}")
        return args.out

    # Plain leaves that trained in full (peft.train_patterns) go to PEFT's modules_to_save.
    structured = {p for p, w in flatten(trained).items() if is_structured(w)}
    plain_trained = sorted(k for k in used if not any(k.startswith(p + "/") for p in structured))
    pcfg = run_cfg.get("peft") or {}
    params = trained
    if pcfg.get("init", "default") == "pissa":
        params = peft_format.residual_to_standard(trained, initial, base)
    base_ref = args.base_model if args.base_model is not None else src_dir
    if base_ref is None:  # an ftjax params file or a random init: written where PEFT loads it
        base_out = base_ref = os.path.abspath(args.base_out or os.path.join(args.out, "base"))
        save_model(base_out, model_cfg, base, tok, template, tokenizer_dir=args.tokenizer)
        print(f"wrote the base ({base_source(run_cfg)}) as a Hugging Face directory to "
              f"{base_out}")
    files = peft_format.save_peft_adapter(
        args.out, model_cfg, params, base_model_name_or_path=base_ref,
        use_rslora=bool(pcfg.get("rslora", False)) or None, modules_to_save=plain_trained)
    files += write_tokenizer(args.out, tok, template, args.tokenizer)
    print(f"wrote PEFT adapter to {args.out} ({', '.join(files)}; {extras}) from {what}; "
          f"its base: {base_ref}")
    return args.out


if __name__ == "__main__":
    from ftjax.cli import run_main
    run_main(main)
