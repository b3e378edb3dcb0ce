"""Converts between Hugging Face directories and ftjax checkpoints.

    # Hugging Face directory -> one ftjax params file (ftjax.io.params_file)
    python scripts/convert_hf.py --to ftjax --hf HF_DIR --out model.safetensors [--dtype bfloat16]

    # ftjax params file -> Hugging Face directory (AutoModelForCausalLM.from_pretrained loads it)
    python scripts/convert_hf.py --to hf --ckpt model.safetensors --out HF_DIR

    # latest (or --step N) orbax checkpoint of a training workdir -> Hugging Face directory
    python scripts/convert_hf.py --to hf --ckpt WORKDIR --out HF_DIR [--step N]

Options for --to hf: --dtype (storage: float32, bfloat16, float16; default the params' dtype),
--shard-size-mb (default 5000), --tokenizer DIR (copy tokenizer files from DIR instead).
Every family of ftjax.io.hf converts, Mixtral included (its experts are written per expert,
the Hub layout; both the Hub and transformers 5's fused layout are read).

--to hf writes a complete directory: weights, config (with the tokenizer's bos/eos/pad ids),
tokenizer files and chat template. For a workdir: the run's tokenizer (the
model.init_from=hf:DIR directory's files, else the built-in character tokenizer's) and the
chat template it trained with (`ftjax.train.export`); a workdir without checkpoints of its own
is searched for its one sub-run that has them (the quickstart's finetune/). For a params file:
the template recorded in its metadata (ftjax writes it from runs), the built-in character
tokenizer for a file without a recorded tokenizer source and vocab 99 (with template
"plain", the synthetic tasks' layout, when none is recorded), or the files of the Hugging Face
directory it was converted from. See docs/checkpoints.md.
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
    p.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from "
                   "(default: the run's or the params file's own, see below)")
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


def file_tokenizer(path: str, cfg: Any) -> tuple[Any, Optional[str], str]:
    """(tokenizer, template source or None, note) for a params file: see the module doc."""
    from ftjax.data.hf_tokenizer import HFTokenizer
    from ftjax.data.tokenizer import CharTokenizer
    from ftjax.io.files import read_metadata
    from ftjax.train.export import recorded_template
    src = read_metadata(path).get("source")
    if isinstance(src, str) and os.path.isfile(os.path.join(src, "tokenizer.json")):
        return HFTokenizer.from_dir(src), None, f"tokenizer files of {src}"
    name, source, recorded = recorded_template(path)
    if recorded or cfg.vocab_size == CharTokenizer.vocab_size:
        return CharTokenizer(), source, (
            f"the built-in character tokenizer, chat template {name!r}" if recorded else
            "the built-in character tokenizer; no chat template recorded in the file, so the "
            "synthetic tasks' layout 'plain'")
    return None, None, ""


def main(argv=None) -> str:
    args = parse_args(argv)
    from ftjax.io import hf
    from ftjax.io.params_file import load_params, save_params
    from ftjax.train import export

    if args.to == "ftjax":
        cfg, params = hf.load_pretrained(args.hf, dtype=args.dtype)
        save_params(args.out, cfg, params, source=os.path.abspath(args.hf))
        print(f"wrote {args.out} ({cfg.family}, {cfg.num_layers} layers) from {args.hf}")
        return args.out

    kw = dict(shard_size_mb=args.shard_size_mb, dtype=args.dtype)
    if os.path.isdir(args.ckpt):
        from ftjax.io.restore import find_run
        from ftjax.train.run import tokenizer_for
        workdir, note = find_run(args.ckpt)
        if note:
            print(note)
        cfg, params, run_cfg, step = restore_workdir(workdir, args.step)
        tok = tokenizer_for(run_cfg)
        name, template = export.trained_template(run_cfg, tok)
        files = export.save_model(args.out, cfg, params, tok, template,
                                  tokenizer_dir=args.tokenizer, **kw)
        what = f"{workdir} step {step}; chat template {name!r}"
    else:
        cfg, params = load_params(args.ckpt)
        tok, template, what = file_tokenizer(args.ckpt, cfg)
        if args.tokenizer:
            files = hf.save_pretrained(args.out, cfg, params, tokenizer_dir=args.tokenizer, **kw)
        elif tok is None:
            files = hf.save_pretrained(args.out, cfg, params, **kw)
            print(f"warning: {args.ckpt} records no tokenizer, so {args.out} has none; pass "
                  "--tokenizer DIR (the Hugging Face directory of the model's tokenizer)",
                  file=sys.stderr)
        elif template is None:  # the Hugging Face directory it came from: its files as they are
            files = hf.save_pretrained(args.out, cfg, params,
                                       extra_config=export.special_token_ids(tok),
                                       tokenizer_dir=tok.name_or_path, **kw)
        else:
            files = export.save_model(args.out, cfg, params, tok, template, **kw)
        what = f"{args.ckpt}" + (f"; {what}" if what and not args.tokenizer else "")
    print(f"wrote {args.out} ({cfg.family}: {', '.join(files)}) from {what}")
    return args.out


if __name__ == "__main__":
    from ftjax.cli import run_main
    run_main(main)
