"""`python -m ftjax.evaluate`: evaluate any model on a list of tasks, without training.

The command of the evaluation stage (`ftjax/eval/`): it loads the model (`load_model`, which
sits at the trainers' level because a workdir is read through `train.restore_run`), builds
the sharded engine and runs the tasks.

    python -m ftjax.evaluate --model /tmp/qs --tasks examples --out /tmp/qs/eval
    python -m ftjax.evaluate --model HF_DIR --adapter PEFT_DIR --tasks mmlu.jsonl:num_fewshot=5
    python -m ftjax.evaluate --model WORKDIR --step 100 --tasks gsm8k.jsonl:extract=last_number

--model: an ftjax workdir (its latest checkpoint, or --step), a Hugging Face directory (with
--adapter, a PEFT adapter on top) or an ftjax params file. --tasks: comma-separated task
files with options (`PATH:key=value,...`; see docs/evaluation.md), or `examples` for the
shipped example tasks. --safety adds refusal rates on harmful / benign look-alike prompts,
--guard GUARD_DIR the unsafe rates a guard model (Llama Guard 3) gives the model's answers to
red-team prompts (docs/evaluation.md, "Safety"). Writes eval_results.json, eval_results.md
and samples_<task>.jsonl to --out (default: <workdir>/eval, or ./eval_results), and TensorBoard scalars when the
model is a workdir. --mesh data=4,tensor=2 places the params as training would on that mesh
(default: a workdir's own mesh; else every device data-parallel with FSDP rules).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections

from ftjax.models.config import ModelConfig

__all__ = ["EvalModel", "load_model", "mesh_sections", "inference_layout", "engine_for", "main"]


@dataclasses.dataclass
class EvalModel:
    """A model ready to evaluate: params placed by `placement`, its tokenizer, forward pass,
    chat template (Jinja source or None) and where it came from (for reports)."""
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    placement: Any
    apply_fn: Optional[Callable] = None
    template: Optional[str] = None
    source: dict = dataclasses.field(default_factory=dict)


def mesh_sections(data: int = -1, fsdp: int = 1, tensor: int = 1,
                  rules: str = "fsdp") -> ml_collections.ConfigDict:
    """A config with just the `mesh` and `sharding` sections a `Placement` reads."""
    return ml_collections.ConfigDict(dict(
        mesh=dict(data=data, fsdp=fsdp, tensor=tensor),
        sharding=dict(rules=rules)))


def inference_layout(spec: str, rule_overrides: str = "") -> tuple[Any, list]:
    """(layout, devices) for inference from a mesh spec such as "tensor=8" or
    "data=2,tensor=4": tensor-parallel rules (heads and MLP over "tensor"; `fsdp_tp` when an
    fsdp axis is given) with `rule_overrides` (e.g. "vocab=none") first, on the first
    data x fsdp x tensor devices. An empty spec: one device."""
    if not spec:
        return mesh_sections(data=1), jax.devices()[:1]
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep or k.strip() not in sizes or not v.strip().isdigit():
            raise ValueError(f"mesh {spec!r}: use AXIS=N pairs over data, fsdp, tensor "
                             "(e.g. tensor=8)")
        sizes[k.strip()] = int(v)
    n = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if n > jax.device_count():
        raise ValueError(f"mesh {spec!r} needs {n} devices; this process sees "
                         f"{jax.device_count()}")
    from ftjax.sharding import get_rules
    rules = get_rules("tp" if sizes["fsdp"] == 1 else "fsdp_tp",
                      overrides=rule_overrides or None)
    layout = mesh_sections(data=sizes["data"], fsdp=sizes["fsdp"], tensor=sizes["tensor"],
                           rules=[list(r) for r in rules])
    return layout, jax.devices()[:n]


def _placement(layout: Any, cfg: ModelConfig, params: Any, devices=None):
    from ftjax.train.placement import Placement
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return Placement(layout, cfg, devices, abstract_params=abstract)


def _is_workdir(path: str) -> bool:
    from ftjax import workdir as wd
    if "://" in path:
        return True
    return os.path.isdir(path) and (wd.exists(path, "config.json") and not os.path.exists(
        os.path.join(path, "model.safetensors")) and not os.path.exists(
        os.path.join(path, "model.safetensors.index.json"))
        or os.path.isdir(os.path.join(path, "checkpoints"))
        or any(os.path.isdir(os.path.join(path, d, "checkpoints")) for d in os.listdir(path)))


def load_model(path: str, *, adapter: Optional[str] = None, step: Optional[int] = None,
               tokenizer: Optional[str] = None, layout: Any = None,
               dtype: Optional[str] = None, devices=None) -> EvalModel:
    """The model at `path` (workdir, HF directory or params file), placed on a mesh.

    layout: a config with `mesh` and `sharding` sections (default: a workdir's own, else
    all devices data-parallel with FSDP rules: `mesh_sections()`).
    adapter: a PEFT adapter directory applied to an HF directory's weights.
    devices: the devices of the mesh (default: all).
    """
    if _is_workdir(path):
        if adapter:
            raise ValueError(f"--adapter applies to a Hugging Face directory; {path!r} is an "
                             "ftjax workdir, whose adapters are loaded from its checkpoint")
        return _from_workdir(path, step, layout, devices)
    if step is not None:
        raise ValueError(f"step={step} applies to an ftjax workdir; {path!r} is not one")
    if os.path.isdir(path):
        return _from_hf(path, adapter, tokenizer, layout, dtype, devices)
    if os.path.isfile(path):
        if adapter:
            raise ValueError("--adapter applies to a Hugging Face directory, not a params file")
        return _from_params_file(path, tokenizer, layout, devices)
    raise FileNotFoundError(f"model {path!r} is neither an ftjax workdir, a Hugging Face "
                            "directory nor a params file")


def _from_workdir(path: str, step: Optional[int], layout: Any, devices=None) -> EvalModel:
    from ftjax.config_record import config_hash
    from ftjax.io.restore import find_run
    from ftjax.train.export import trained_template
    from ftjax.train.restore_run import restore_run
    run_dir, note = find_run(path)
    if note:
        print(note)
    r = restore_run(run_dir, step)
    layout = layout if layout is not None else r.run_cfg
    placement = _placement(layout, r.model_cfg, r.params, devices)
    params = placement.put_params(r.params)
    name, template = trained_template(r.run_cfg, r.tokenizer)
    return EvalModel(cfg=r.model_cfg, params=params, tokenizer=r.tokenizer,
                     placement=placement, apply_fn=r.method.apply_fn, template=template,
                     source={"kind": "workdir", "path": os.fspath(run_dir), "step": r.step,
                             "peft": r.method.name, "config_hash": config_hash(r.run_cfg),
                             "template": name})


def _from_hf(path: str, adapter: Optional[str], tokenizer: Optional[str], layout: Any,
             dtype: Optional[str], devices=None) -> EvalModel:
    from ftjax.data import CharTokenizer, HFTokenizer
    from ftjax.io.hf import load_pretrained
    cfg, params = load_pretrained(path, dtype=dtype)
    tok_dir = tokenizer or path
    tok = (HFTokenizer.from_dir(tok_dir) if os.path.exists(os.path.join(tok_dir, "tokenizer.json"))
           else CharTokenizer())
    source = {"kind": "hf", "path": os.path.abspath(path)}
    if adapter:
        from ftjax.io.peft_format import load_peft_adapter
        params = load_peft_adapter(adapter, cfg, params)
        source["adapter"] = os.path.abspath(adapter)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer of {tok_dir} has {tok.vocab_size} ids but the model "
                         f"only {cfg.vocab_size} embeddings; pass the model's own tokenizer")
    placement = _placement(layout if layout is not None else mesh_sections(), cfg, params,
                           devices)
    template = getattr(tok, "chat_template", None)
    return EvalModel(cfg=cfg, params=placement.put_params(params), tokenizer=tok,
                     placement=placement, template=template, source=source)


def _from_params_file(path: str, tokenizer: Optional[str], layout: Any,
                      devices=None) -> EvalModel:
    from ftjax.data import CharTokenizer, HFTokenizer
    from ftjax.io.params_file import load_params
    from ftjax.train.export import recorded_template
    cfg, params = load_params(path)
    tok = HFTokenizer.from_dir(tokenizer) if tokenizer else CharTokenizer()
    name, template, _ = recorded_template(path)
    placement = _placement(layout if layout is not None else mesh_sections(), cfg, params,
                           devices)
    return EvalModel(cfg=cfg, params=placement.put_params(params), tokenizer=tok,
                     placement=placement, template=template,
                     source={"kind": "params_file", "path": os.path.abspath(path),
                             "template": name})


def engine_for(model: EvalModel, **kw):
    """An `ftjax.eval.engine.Engine` over the model's placed params."""
    from ftjax.eval.engine import Engine
    return Engine(model.params, model.cfg, model.tokenizer, placement=model.placement,
                  apply_fn=model.apply_fn, **kw)



# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split_specs(text: str) -> list[str]:
    """Comma-separated specs; a comma inside a spec's options (after `:`) belongs to it
    unless what follows looks like a new file (`*.jsonl`) or `examples`."""
    parts = re.split(r",(?=\s*(?:examples\b|[^,:=]*\.jsonl?\b))", text)
    return [p.strip() for p in parts if p.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ftjax.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="workdir, HF directory or params file")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory (HF --model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (params files)")
    p.add_argument("--tasks", default=[], action="append",
                   help="task specs, comma-separated (repeatable), or 'examples'")
    p.add_argument("--safety", action="store_true",
                   help="refusal rates on harmful / benign look-alike prompts")
    p.add_argument("--guard", default=None,
                   help="guard model directory (Llama Guard 3): unsafe rates of the model's "
                        "answers to red-team prompts (implies --safety)")
    p.add_argument("--redteam", default="", help="red-team prompts JSONL (default: shipped)")
    p.add_argument("--refusal-pairs", default="", help="harmful/benign pairs JSONL "
                                                       "(default: shipped)")
    p.add_argument("--safety-max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="rows per compiled batch")
    p.add_argument("--max-len", type=int, default=0, help="longest scored row (0 = model's)")
    p.add_argument("--limit", type=int, default=0, help="first N records of each task")
    p.add_argument("--mesh", default=None, help="e.g. data=4,tensor=2 (axis sizes)")
    p.add_argument("--rules", default="fsdp", help="sharding rules preset with --mesh")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="HF directories: parameter dtype to load (default float32)")
    args = p.parse_args(argv)
    if not args.tasks and not (args.safety or args.guard):
        p.error("give --tasks, --safety or --guard")
    return args


def _layout(args):
    if not args.mesh:
        return None
    sizes = {}
    for part in args.mesh.split(","):
        k, eq, v = part.partition("=")
        if not eq or k.strip() not in ("data", "fsdp", "tensor"):
            raise ValueError(f"--mesh {args.mesh!r}: use axis=size pairs over data, fsdp, "
                             "tensor, e.g. data=4,tensor=2")
        sizes[k.strip()] = int(v)
    return mesh_sections(rules=args.rules, **sizes)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from ftjax.eval.evaluate import evaluate, load_tasks, write_results

    specs = [s for group in args.tasks for s in _split_specs(group)]
    tasks = load_tasks(specs)   # bad task files fail before the model is loaded
    if args.limit:
        tasks = [(t, recs[:args.limit]) for t, recs in tasks]
    model = load_model(args.model, adapter=args.adapter, step=args.step,
                       tokenizer=args.tokenizer, layout=_layout(args), dtype=args.dtype)
    kw = {"batch_size": args.batch_size}
    if args.max_len:
        kw["max_len"] = args.max_len
    engine = engine_for(model, **kw)
    results, samples = evaluate(engine, tasks, template=model.template)
    extra = {"mesh": dict(model.placement.mesh.shape)}
    if args.safety or args.guard:
        from ftjax.eval.evaluate import safety_results
        extra["safety"] = safety_results(
            engine, model.template, guard=args.guard, redteam=args.redteam,
            refusal_pairs=args.refusal_pairs, limit=args.limit or None,
            max_new_tokens=min(args.safety_max_new_tokens,
                               model.cfg.max_position_embeddings // 2))
    is_workdir = model.source.get("kind") == "workdir"
    out = args.out or (os.path.join(args.model, "eval") if is_workdir else "eval_results")
    payload = write_results(out, results, samples, model=model.source,
                            tb_workdir=out if is_workdir else None,
                            step=int(model.source.get("step", 0) or 0),
                            extra=extra)
    print(f"wrote {os.path.join(out, 'eval_results.json')} and eval_results.md")
    return payload


if __name__ == "__main__":
    from ftjax.cli import run_main
    run_main(main)
