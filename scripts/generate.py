"""Generate text from an HF checkpoint directory or an ftjax params file; prints completions.

    python scripts/generate.py --model path/to/hf_dir --chat "What is 2 + 3?"
    python scripts/generate.py --model tiny.safetensors --prompt "2+3=" --prompt "7*6="
    python scripts/generate.py --model tiny.safetensors --tokenizer path/to/hf_dir \\
        --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1

--model is either a Hugging Face directory (config.json + *.safetensors + tokenizer files,
loaded with `ftjax.io.hf.load_pretrained`; every ftjax export is one) or an ftjax
`.safetensors` params file (written by `ftjax.io.params_file.save_params`), which uses the
built-in CharTokenizer unless --tokenizer names an HF tokenizer directory.

Prompt formats:
  --chat TEXT    a user message (after --system, if given) rendered with the generation prompt
                 by the chat template the model was trained with: the directory's
                 chat_template.jinja (ftjax exports write the run's template there), the
                 template recorded in a params file's metadata, or for a params file without
                 one the synthetic tasks' layout "plain" (`[bos] TEXT "\\n"`). --template
                 overrides it, with a warning on stderr when it differs from the recorded one.
  --prompt TEXT  raw text. HF tokenizers encode it with their special tokens (bos, as
                 `tokenizer(text)` does); CharTokenizer uses the synthetic-suite format
                 `[bos] prompt "\\n"` (`generate_text`).
Quantized inference: --quant int8|nf4 quantizes the loaded float weights (weight-only, every
dense projection kernel: `ftjax.io.quantized.quantize_for_inference`) before generating; a
quantized file written by `ftjax.io.quantized.save_quantized` (or `python -m ftjax.io.quantized`)
is accepted as --model as it is, without --quant (docs/quantized_inference.md).

Sharded generation: --mesh tensor=N places the params tensor-parallel on N devices first
(`python -m ftjax.serve --mesh` places them the same way; docs/serving.md).

Generation stops at any of the tokenizer's eos ids (e.g. Llama 3's <|eot_id|> and
<|end_of_text|>). Greedy when --temperature is 0. One completion per line; --json prints
`{"prompt", "completion"}` objects instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROMPT_BUCKET = 16  # prompt lengths are padded to a multiple of this (fewer recompilations)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="HF checkpoint directory, or an ftjax params .safetensors file (float "
                        "or quantized)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory (default: the --model directory; CharTokenizer "
                        "for a params file)")
    p.add_argument("--prompt", action="append", default=[], help="raw prompt (repeatable)")
    p.add_argument("--chat", action="append", default=[],
                   help="user message rendered through the chat template (repeatable)")
    p.add_argument("--system", default=None, help="system message for --chat prompts")
    p.add_argument("--template", default=None,
                   help="chat template: a name of the tokenizer's templates, a built-in "
                        "(plain, chatml, llama3, alpaca) or Jinja source (default: the one the "
                        "model was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="HF directories: parameter dtype to load (default float32)")
    p.add_argument("--quant", default="none", choices=("none", "int8", "nf4"),
                   help="weight-only quantization of the loaded float weights before "
                        "generating (default none; a quantized --model file needs none)")
    p.add_argument("--mesh", default="", help="e.g. tensor=8: generate with the params "
                   "sharded tensor-parallel over heads and MLP (default: one device)")
    p.add_argument("--rule-overrides", default="", help="with --mesh, e.g. vocab=none")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    args = p.parse_args(argv)
    if not args.prompt and not args.chat:
        p.error("give at least one --prompt or --chat")
    if args.prompt and args.chat:
        p.error("use either --prompt or --chat, not both")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def load_model_and_tokenizer(model: str, tokenizer: Optional[str] = None,
                             dtype: Optional[str] = None, quant: str = "none"):
    """(cfg, params, tokenizer) for an HF directory or an ftjax params file (float, or
    quantized by `ftjax.io.quantized.save_quantized`); `quant` "int8"/"nf4" quantizes float
    weights after loading."""
    from ftjax.data.hf_tokenizer import HFTokenizer
    from ftjax.data.tokenizer import CharTokenizer

    if os.path.isdir(model):
        from ftjax.io.hf import load_pretrained
        cfg, params = load_pretrained(model, dtype=dtype)
        tok = HFTokenizer.from_dir(tokenizer or model)
    elif os.path.isfile(model):
        from ftjax.io.params_file import load_params
        cfg, params = load_params(model)
        tok = HFTokenizer.from_dir(tokenizer) if tokenizer else CharTokenizer()
    else:
        raise FileNotFoundError(f"--model {model!r} is neither a directory nor a file")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                         f"{cfg.vocab_size} embeddings; use the tokenizer the model was "
                         "trained with (--tokenizer)")
    if quant != "none":
        from ftjax.io.quantized import quantize_for_inference, quantized_kind
        have = quantized_kind(params)
        if have is not None and have != quant:
            raise ValueError(f"--model {model!r} is already quantized ({have}); leave --quant "
                             "out, or quantize the float model instead")
        if have is None:
            params = quantize_for_inference(params, quant)
    return cfg, params, tok


def recorded_template(model: str, tok, tokenizer: Optional[str] = None) \
        -> Optional[tuple[str, str]]:
    """(where, Jinja source) of the chat template the model was trained with, or None when
    nothing says: a directory's (or --tokenizer directory's) default template; a params file's
    `chat_template` metadata; "plain" for a params file with neither (the layout of ftjax's
    character-tokenizer models, the quickstart base among them)."""
    if os.path.isdir(model) or tokenizer:
        own = getattr(tok, "chat_template", None)
        return (f"the chat template of {tokenizer or model}", own) if own else None
    from ftjax.train.export import recorded_template as file_template
    name, source, recorded = file_template(model)
    return (f"template {name!r} recorded in {model}" if recorded
            else "the synthetic tasks' layout 'plain'"), source


def chat_template_for(args, tok) -> Optional[str]:
    """The template --chat renders with: --template, else the recorded one; warns on stderr
    when --template differs from what the model was trained with."""
    from ftjax.data.chat import resolve_template
    recorded = recorded_template(args.model, tok, args.tokenizer)
    if args.template is None:
        return None if recorded is None else recorded[1]
    chosen = resolve_template(tok, args.template)
    if recorded is not None and chosen != recorded[1]:
        print(f"generate.py: warning: --template {args.template[:40]!r} is not the template the "
              f"model was trained with ({recorded[0]}); its answers may be garbage: leave "
              "--template out to use that one", file=sys.stderr)
    return chosen


def _eos_ids(tok) -> list[int]:
    ids = list(getattr(tok, "eos_ids", ()) or ())
    return ids or [int(tok.eos_id)]


def generate_ids(params, cfg, tok, prompts: list[list[int]], *, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int) -> list[list[int]]:
    """Left-pads the prompts into one batch and continues them; returns ids up to eos."""
    import jax
    import numpy as np
    from ftjax.infer.generate import generate

    eos = _eos_ids(tok)
    pad_id = int(tok.pad_id)
    width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} encodes to no tokens")
        tokens[i, width - len(ids):] = ids
    lengths = np.array([len(p) for p in prompts], np.int32)
    rng = jax.random.PRNGKey(seed) if temperature > 0 else None
    # `generate` stops rows at one eos id; any other eos id ends the text below.
    out = generate(params, cfg, tokens, lengths, max_new_tokens=max_new_tokens, eos_id=eos[0],
                   pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
    results = []
    for row in out.tolist():
        cut = next((n for n, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results


def place_on_mesh(cfg, params, mesh: str, rule_overrides: str = ""):
    """Params sharded tensor-parallel (heads and MLP over "tensor") on the first
    data x fsdp x tensor devices, as `python -m ftjax.serve --mesh` places them; generation
    then runs sharded (each device holds its slice of every kernel)."""
    from ftjax.evaluate import _placement, inference_layout
    layout, devices = inference_layout(mesh, rule_overrides)
    return _placement(layout, cfg, params, devices).put_params(params)


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    args = parse_args(argv)
    from ftjax.data.chat import apply_chat_template
    from ftjax.data.hf_tokenizer import HFTokenizer

    cfg, params, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype,
                                                args.quant)
    if args.mesh:
        params = place_on_mesh(cfg, params, args.mesh, args.rule_overrides)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    if args.chat:
        shown = args.chat
        system = [{"role": "system", "content": args.system}] if args.system else []
        template = chat_template_for(args, tok)
        prompts = [apply_chat_template(tok, system + [{"role": "user", "content": c}],
                                       add_generation_prompt=True, template=template)
                   for c in args.chat]
    elif isinstance(tok, HFTokenizer):
        shown = args.prompt
        prompts = [tok.encode(p, add_special_tokens=True) for p in args.prompt]
    else:  # CharTokenizer: the synthetic-suite prompt format
        import jax
        from ftjax.infer.generate import generate_text
        shown = args.prompt
        rng = jax.random.PRNGKey(args.seed) if args.temperature > 0 else None
        completions = generate_text(params, cfg, tok, args.prompt,
                                    max_new_tokens=args.max_new_tokens, rng=rng, **sampling)
        prompts = None
    if prompts is not None:
        ids = generate_ids(params, cfg, tok, prompts, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, **sampling)
        completions = [tok.decode(i) for i in ids]

    for prompt, completion in zip(shown, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            print(completion)
    return completions


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad paths, files or templates
        sys.exit(f"generate.py: error: {e}")
