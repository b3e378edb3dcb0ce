"""Supervised fine-tuning (trainer "sft") on the built-in synthetic suite or on the user's data.

Synthetic: the data section names tasks of `ftjax.data.synthetic`; a held-out test split of
each is used for the evaluation loss during training and for exact match (generation) at the
end. Files / TFDS: when `data.source` (or `data.sources`) is set (`configs/common.py:
data_file`), `ftjax.data.pipeline.prepare` reads, cleans and splits the data (the data report
is printed and saved in the workdir), a Grain loader tokenizes and packs the train split, and
the validation split gives the eval loss and the held-out exact match (see docs/data.md).
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

    path = resolve_path(src)

    def load_file():
        _, params = load_params(path, expected_cfg=model_cfg)
        return params
    return loop.host_params(load_file)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_path(src: str) -> str:
    """`src` if it exists; a relative path that does not exist under the current directory is
    taken relative to the repository root (so configs can name shipped files portably)."""
    if os.path.exists(src) or os.path.isabs(src):
        return src
    alt = os.path.join(REPO_ROOT, src)
    if os.path.exists(alt):
        return alt
    raise FileNotFoundError(f"model.init_from={src!r} not found (looked under {os.getcwd()!r} "
                            f"and the repository root {REPO_ROOT!r})")


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
    if cfg.get("export", {}).get("hf_dir", "") and not method.mergeable:
        raise ValueError(f"export.hf_dir: peft.method={method.name!r} has no merged Hugging Face "
                         "form (its weights depend on each token's routing); unset "
                         "export.hf_dir and keep the ftjax checkpoint")


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


def uses_files(cfg: Any) -> bool:
    """Whether the data section names the user's data (`source` / `sources`)."""
    d = cfg.get("data", {})
    return bool(d.get("source", "") or d.get("sources", ()))


def prepare_data(cfg: Any, tok, workdir: str):
    """`pipeline.prepare` on every process; process 0 builds new sources first (one writer)."""
    from ftjax.data import pipeline
    seq_len = int(cfg.train.seq_len)
    if jax.process_count() == 1:
        return pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len)
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
        prepared = pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len)
    multihost_utils.sync_global_devices("ftjax_data_prepared")
    if jax.process_index() != 0:
        prepared = pipeline.prepare(cfg.data, tok, workdir, seq_len=seq_len, verbose=False)
    return prepared


def file_exact_match(params, model_cfg: ModelConfig, tok, examples, *, template,
                     max_new_tokens: int, apply_fn=None, batch_size: int = 64) -> dict:
    """Greedy generation after each conversation's last user turn, rendered with the training
    template (and its generation prompt), compared with the reference assistant reply."""
    import numpy as np
    from ftjax.data.chat import apply_chat_template
    from ftjax.infer.generate import generate
    prompts, answers = [], []
    for ex in examples:
        msgs = ex.get("messages") or []
        if len(msgs) >= 2 and msgs[-1]["role"] == "assistant":
            prompts.append(apply_chat_template(tok, msgs[:-1], add_generation_prompt=True,
                                               template=template))
            answers.append(msgs[-1]["content"])
    if not prompts:
        return {"exact_match": None, "n": 0, "samples": []}
    width = -(-max(len(p) for p in prompts) // 16) * 16
    rows = min(batch_size, len(prompts))
    preds = []
    for start in range(0, len(prompts), rows):
        chunk = prompts[start:start + rows]
        tokens = np.full((rows, width), tok.pad_id, np.int32)
        lengths = np.ones((rows,), np.int32)
        tokens[:, -1] = tok.eos_id  # filler rows
        for i, ids in enumerate(chunk):
            tokens[i] = tok.pad_id
            tokens[i, width - len(ids):] = ids
            lengths[i] = len(ids)
        out = generate(params, model_cfg, tokens, lengths, max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, pad_id=tok.pad_id, apply_fn=apply_fn)
        for row in out[:len(chunk)]:
            ids = row.tolist()
            preds.append(tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids))
    hits = sum(p.strip() == a.strip() for p, a in zip(preds, answers))
    return {"exact_match": hits / len(answers), "n": len(answers),
            "samples": list(zip([tok.decode(p) for p in prompts[:5]], preds[:5], answers[:5]))}


def run_files(cfg: Any, workdir: str, tok, model_cfg: ModelConfig) -> dict:
    """SFT on the user's data: prepare, Grain loader (packed), eval split, exact match."""
    from ftjax.data import pipeline
    from ftjax.data.errors import DataError
    d, t = cfg.data, cfg.train
    prepared = prepare_data(cfg, tok, workdir)
    if prepared.kind not in ("sft", "text"):
        raise DataError(f"trainer 'sft' trains on conversations or text, but this data is "
                        f"{prepared.kind!r} (formats of data.source/sources); use the "
                        "classification or preference trainers for it")
    bs, seq = int(t.batch_size), int(t.seq_len)
    pi, pc = jax.process_index(), jax.process_count()
    it = pipeline.make_loader(prepared, "train", tok, bs, seq, int(cfg.seed), pi, pc)
    eval_split = d.get("eval_split", "validation")
    evals = (pipeline.eval_batches(prepared, eval_split, tok, bs, seq, pi, pc)
             if eval_split in prepared.splits else [])
    method = get_method(cfg.get("peft"))
    check_exportable(cfg)
    try:
        result = loop.train(cfg, workdir, model_cfg=model_cfg,
                            init_params=initial_params(cfg, model_cfg),
                            loss_fn=sft_loss(model_cfg, float(t.z_loss), method.apply_fn,
                                             method.bind_rng),
                            transform=method.transform, train_patterns=method.train_patterns,
                            wrap_optimizer=method.wrap_optimizer, train_iter=it,
                            eval_batches=evals)
    finally:
        it.close()
    em = {"exact_match": None, "n": 0}
    n_em = int(d.get("eval_examples", 0))
    if n_em > 0 and prepared.kind == "sft" and eval_split in prepared.splits:
        params = result.params
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        view = prepared.split(eval_split)
        held_out = [view[i] for i in range(min(n_em, len(view)))]
        em = file_exact_match(params, model_cfg, tok, held_out,
                              template=prepared.options.template,
                              max_new_tokens=int(d.get("max_new_tokens", 16)),
                              apply_fn=method.apply_fn)
        if em["n"]:
            print(f"held-out exact match ({eval_split}): {em['exact_match']:.3f} over "
                  f"{em['n']} examples")
            for prompt, pred, ans in em["samples"][:3]:
                print(f"  {prompt!r} -> {pred!r} (reference {ans!r})")
    exported = export_hf(cfg, model_cfg, result.params)
    summary = {"exported_hf_dir": exported,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "exact_match": em["exact_match"], "n_test": em["n"],
               "wall_s": result.wall_s, "stopped_early": result.stopped_early,
               "resumed_from": result.resumed_from,
               "data": {"kind": prepared.kind, "fingerprint": prepared.fingerprint,
                        "splits": {k: len(v) for k, v in prepared.splits.items()},
                        "packing": it.pack_stats.to_dict(), "report": "data_report.json"}}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def run(cfg: Any, workdir: str) -> dict:
    tok = tokenizer_for(cfg)
    model_cfg = model_config(cfg.model)
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}; set --config.model.vocab_size={tok.vocab_size}")
    if uses_files(cfg):
        return run_files(cfg, workdir, tok, model_cfg)
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
