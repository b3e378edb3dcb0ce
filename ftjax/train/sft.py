"""Supervised fine-tuning on the built-in synthetic suite (trainer "sft").

The data section names tasks of `ftjax.data.synthetic`; a held-out test split of each is used
for the evaluation loss during training and for exact match (generation) at the end.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from ftjax import data as ftdata
from ftjax import models
from ftjax.io.params_file import load_params
from ftjax.models import upcycle
from ftjax.models.config import ModelConfig
from ftjax.peft import get_method
from ftjax.train import loop
from ftjax.train.step import sft_loss


def model_config(model_section: Any, dense: bool = False) -> ModelConfig:
    """ModelConfig from a config's `model` section (every field but `init_from`, `upcycle`).

    With `init_from="hf:DIR"` the architecture comes from DIR/config.json and only the
    run-time fields (dtype, param_dtype, scan_layers, remat) from the section; overridden
    section fields are printed (see docs/checkpoints.md). An enabled `model.upcycle` section
    turns it into the sparse MoE the run trains (`ftjax.models.upcycle`), unless `dense`.
    """
    fields = {k: v for k, v in model_section.to_dict().items()
              if k not in ("init_from", "upcycle")}
    src = model_section.get("init_from", "") or ""
    if src.startswith("hf:"):
        from ftjax.io.hf import model_config_from_section
        base = model_config_from_section(fields, src[len("hf:"):])
    else:
        base = ModelConfig.from_dict(fields)
    return base if dense else upcycle.config_from_section(model_section.get("upcycle"), base)


def initial_params(cfg: Any, model_cfg: ModelConfig):
    """A zero-argument function returning the starting params (random init or `init_from`),
    upcycled into experts when `model.upcycle` is enabled (before any PEFT transform)."""
    sec = cfg.model.get("upcycle")
    if not upcycle.enabled(sec):
        return dense_initial_params(cfg, model_cfg)
    dense_cfg = model_config(cfg.model, dense=True)
    load = dense_initial_params(cfg, dense_cfg)
    key = upcycle.upcycle_key(int(cfg.seed))
    fn = lambda: upcycle.upcycle_from_section(sec, load(), dense_cfg, key)[0]
    return loop.host_params(fn) if getattr(load, "on_host", False) else fn


def dense_initial_params(cfg: Any, model_cfg: ModelConfig):
    """The starting params of `model_cfg` before upcycling (random init or `init_from`).

    Checkpoints are read lazily (only when the run does not resume) and marked with
    `loop.host_params`, so the loop places the host arrays shard by shard.
    """
    src = cfg.model.get("init_from", "")
    if not src:
        return lambda: models.init(model_cfg, jax.random.PRNGKey(int(cfg.seed)))
    if src.startswith("hf:"):
        def load_hf():
            from ftjax.io.hf import load_pretrained
            hf_cfg, params = load_pretrained(src[len("hf:"):], dtype=model_cfg.param_dtype)
            runtime = ("dtype", "param_dtype", "scan_layers", "remat", "init_std")
            diff = {k: (v, getattr(model_cfg, k)) for k, v in hf_cfg.to_dict().items()
                    if k not in runtime and getattr(model_cfg, k) != v}
            if diff:  # model_config derives the architecture from the same config.json
                raise ValueError(f"model.init_from={src!r} holds a different architecture than "
                                 "the model config: " + ", ".join(
                                     f"{k}: checkpoint {a!r}, configured {b!r}"
                                     for k, (a, b) in diff.items()))
            return params
        return loop.host_params(load_hf)

    def load_file():
        _, params = load_params(src, expected_cfg=model_cfg)
        return params
    return loop.host_params(load_file)


def eval_batches(examples, tok, batch_size: int, seq_len: int) -> list[dict]:
    """Every test example once, in fixed batches (the last one padded with empty rows)."""
    it = ftdata.SyntheticLoader(examples, tok, batch_size, seq_len, seed=0, shuffle=False,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), drop_remainder=False,
                                num_epochs=1)
    return list(it)


def tokenizer_for(cfg: Any):
    """The checkpoint's own tokenizer when starting from a Hugging Face directory that has
    one (`tokenizer.json`); the built-in character tokenizer otherwise."""
    src = cfg.model.get("init_from", "")
    if src.startswith("hf:") and os.path.exists(os.path.join(src[3:], "tokenizer.json")):
        return ftdata.HFTokenizer.from_dir(src[3:])
    return ftdata.CharTokenizer()


def check_exportable(cfg: Any) -> None:
    """Fails before training when `export.hf_dir` is set for a method with no merged form."""
    method = get_method(cfg.get("peft"))
    if cfg.get("export", {}).get("hf_dir", "") and method.apply_fn is not None:
        raise ValueError(f"export.hf_dir: peft.method={method.name!r} changes the model's inputs "
                         "(virtual tokens / prefixes) and has no merged Hugging Face form; "
                         "unset export.hf_dir and keep the ftjax checkpoint")


def export_hf(cfg: Any, model_cfg: ModelConfig, params: Any) -> str | None:
    """Writes the trained model as a Hugging Face directory when `export.hf_dir` is set."""
    out = cfg.get("export", {}).get("hf_dir", "")
    if not out:
        return None
    check_exportable(cfg)
    from ftjax.io.hf import save_pretrained
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        src = cfg.model.get("init_from", "")
        tok_dir = src[3:] if src.startswith("hf:") else None
        if tok_dir and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            tok_dir = None
        from ftjax.peft.core import merge
        save_pretrained(out, model_cfg, jax.device_get(merge(params)), tokenizer_dir=tok_dir)
        print(f"exported Hugging Face model to {out}")
    return out


def run(cfg: Any, workdir: str) -> dict:
    tok = tokenizer_for(cfg)
    model_cfg = model_config(cfg.model)
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
    d = cfg.data
    train_ex, test_ex = [], []
    for task in d.tasks:
        tr, te = ftdata.make_splits(task, int(d.n_per_task), int(d.seed), float(d.test_frac))
        train_ex += tr
        test_ex += te
    t = cfg.train
    it = ftdata.SyntheticLoader(train_ex, tok, int(t.batch_size), int(t.seq_len), int(cfg.seed),
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    method = get_method(cfg.get("peft"))
    check_exportable(cfg)
    result = loop.train(cfg, workdir, model_cfg=model_cfg,
                        init_params=initial_params(cfg, model_cfg),
                        loss_fn=sft_loss(model_cfg, float(t.z_loss), method.apply_fn,
                                         method.bind_rng),
                        transform=method.transform, train_patterns=method.train_patterns,
                        wrap_optimizer=method.wrap_optimizer,
                        train_iter=it,
                        eval_batches=eval_batches(test_ex, tok, int(t.batch_size), int(t.seq_len)))
    em = {"exact_match": None, "n": 0}
    if int(d.eval_examples) > 0:
        from ftjax.eval.harness import exact_match_eval
        params = result.params
        if jax.process_count() > 1:  # generation runs per process on a gathered copy
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        em = exact_match_eval(params, model_cfg, tok, test_ex[:int(d.eval_examples)],
                              max_new_tokens=int(d.max_new_tokens), apply_fn=method.apply_fn)
        print(f"held-out exact match: {em['exact_match']:.3f} over {em['n']} examples")
    exported = export_hf(cfg, model_cfg, result.params)
    summary = {"exported_hf_dir": exported, "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "exact_match": em["exact_match"], "n_test": em["n"],
               "wall_s": result.wall_s, "stopped_early": result.stopped_early,
               "resumed_from": result.resumed_from}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
