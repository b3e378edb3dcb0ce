"""Converts between Hugging Face directories and ftjax checkpoints.

    # Hugging Face directory -> one ftjax params file (ftjax.io.params_file)
    python scripts/convert_hf.py --to ftjax --hf HF_DIR --out model.safetensors [--dtype bfloat16]

    # ftjax params file -> Hugging Face directory (AutoModelForCausalLM.from_pretrained loads it)
    python scripts/convert_hf.py --to hf --ckpt model.safetensors --out HF_DIR

    # latest (or --step N) orbax checkpoint of a training workdir -> Hugging Face directory
    python scripts/convert_hf.py --to hf --ckpt WORKDIR --out HF_DIR [--step N]

Options for --to hf: --dtype (storage: float32, bfloat16, float16; default the params' dtype),
--shard-size-mb (default 5000), --tokenizer DIR (copy tokenizer files, e.g. from the HF
directory the run started from; for a workdir started with model.init_from=hf:DIR that
directory is the default). Every family of ftjax.io.hf converts, Mixtral included (its
experts are written per expert, the Hub layout; both the Hub and transformers 5's fused layout
are read). See docs/checkpoints.md.
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
    p.add_argument("--to", choices=("ftjax", "hf"), required=True)
    p.add_argument("--hf", help="Hugging Face directory to read (--to ftjax)")
    p.add_argument("--ckpt", help="ftjax params file or training workdir (--to hf)")
    p.add_argument("--out", required=True, help="output file (--to ftjax) or directory (--to hf)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (| float16 for --to hf)")
    p.add_argument("--shard-size-mb", type=float, default=5000.0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from")
    args = p.parse_args(argv)
    if args.to == "ftjax" and not args.hf:
        p.error("--to ftjax needs --hf DIR")
    if args.to == "hf" and not args.ckpt:
        p.error("--to hf needs --ckpt FILE_OR_WORKDIR")
    return args


def restore_workdir(workdir: str, step: Optional[int] = None) -> tuple[Any, dict, Any, int]:
    """(ModelConfig, host params, run config, step) from an orbax checkpoint of a training run.

    The model config is rebuilt from the workdir's resolved config.json exactly as the run
    built it (`ftjax.train.run.model_config`); only the params are read from the checkpoint.
    """
    from ftjax import models
    from ftjax.io.restore import read_run_config, restore_params
    from ftjax.train.run import model_config

    run_cfg = read_run_config(workdir)
    method = run_cfg.get("peft", {}).get("method", "full")
    if method != "full":
        raise ValueError(f"{workdir!r} is a peft.method={method!r} run: its checkpoints hold only "
                         "the trained leaves. Export it with scripts/export_peft.py --workdir "
                         f"{workdir} --out DIR --format merged (or --format peft)")
    model_cfg = model_config(run_cfg.model)
    params, step = restore_params(workdir, step, models.param_shapes(model_cfg))
    return model_cfg, params, run_cfg, step


def main(argv=None) -> str:
    args = parse_args(argv)
    from ftjax.io import hf
    from ftjax.io.params_file import load_params, save_params

    if args.to == "ftjax":
        cfg, params = hf.load_pretrained(args.hf, dtype=args.dtype)
        save_params(args.out, cfg, params, source=os.path.abspath(args.hf))
        print(f"wrote {args.out} ({cfg.family}, {cfg.num_layers} layers) from {args.hf}")
        return args.out

    tokenizer = args.tokenizer
    if os.path.isdir(args.ckpt):
        cfg, params, run_cfg, step = restore_workdir(args.ckpt, args.step)
        src = run_cfg.model.get("init_from", "") or ""
        if tokenizer is None and src.startswith("hf:"):
            tokenizer = src[len("hf:"):]
        what = f"{args.ckpt} step {step}"
    else:
        cfg, params = load_params(args.ckpt)
        what = args.ckpt
    files = hf.save_pretrained(args.out, cfg, params, shard_size_mb=args.shard_size_mb,
                               dtype=args.dtype, tokenizer_dir=tokenizer)
    print(f"wrote {args.out} ({cfg.family}: {', '.join(files)}) from {what}")
    return args.out


if __name__ == "__main__":
    from ftjax.cli import run_main
    run_main(main)
