"""Trainer "sft": supervised fine-tuning on the built-in synthetic suite or on the user's data.

Synthetic: `data.tasks` of `ftjax.data.synthetic`; a held-out test split of each gives the
eval loss during training and exact match (greedy generation) at the end. Files / TFDS: with
`data.source` (or `data.sources`, `configs/common.py:data_file`) the data pipeline reads,
cleans and splits the data (report in the workdir), a Grain loader tokenizes and packs the
train split, and the validation split gives the eval loss and the held-out exact match.
"""
from __future__ import annotations

from typing import Any

import jax

from ftjax import data as ftdata
from ftjax.eval.harness import chat_exact_match, exact_match_eval
from ftjax.train.run import Run, fixed_batches, synthetic_loader, uses_files
from ftjax.train.step import sft_loss


def synthetic_data(run: Run):
    """(train loader, eval batches, exact-match scorer, summary info) over `data.tasks`."""
    d, t, tok = run.cfg.data, run.cfg.train, run.tokenizer
    train_ex, test_ex = [], []
    for task in d.tasks:
        tr, te = ftdata.make_splits(task, int(d.n_per_task), int(d.seed), float(d.test_frac))
        train_ex += tr
        test_ex += te

    def score(params, when=""):
        return exact_match_eval(params, run.model_cfg, tok, test_ex[:int(d.eval_examples)],
                                max_new_tokens=int(d.max_new_tokens), apply_fn=run.method.apply_fn,
                                placement=run.placement)
    return (synthetic_loader(train_ex, tok, run.cfg),
            fixed_batches(test_ex, tok, int(t.batch_size), int(t.seq_len)),
            score if int(d.eval_examples) > 0 else None, lambda: {})


def file_data(run: Run):
    """(train loader, eval batches, exact-match scorer, summary info) from the data pipeline."""
    from ftjax.data import pipeline
    from ftjax.data.errors import DataError
    d, t, tok = run.cfg.data, run.cfg.train, run.tokenizer
    prepared = run.prepare_data()
    if prepared.kind not in ("sft", "text"):
        raise DataError(f"trainer 'sft' trains on conversations or text, but this data is "
                        f"{prepared.kind!r} (formats of data.source/sources); use the "
                        "classification or preference trainers for it")
    bs, seq = int(t.batch_size), int(t.seq_len)
    pi, pc = jax.process_index(), jax.process_count()
    it = pipeline.make_loader(prepared, "train", tok, bs, seq, int(run.cfg.seed), pi, pc)
    eval_split = d.get("eval_split", "validation")
    has_eval = eval_split in prepared.splits
    evals = pipeline.eval_batches(prepared, eval_split, tok, bs, seq, pi, pc) if has_eval else []
    n_em = int(d.get("eval_examples", 0))

    def score(params, when=""):
        view = prepared.split(eval_split)
        em = chat_exact_match(params, run.model_cfg, tok,
                              [view[i] for i in range(min(n_em, len(view)))],
                              template=prepared.options.template,
                              max_new_tokens=int(d.get("max_new_tokens", 16)),
                              apply_fn=run.method.apply_fn, placement=run.placement)
        if em["n"]:
            print(f"held-out exact match ({eval_split}{when}): {em['exact_match']:.3f} over "
                  f"{em['n']} examples")
            for prompt, pred, ans in em["samples"][:3]:
                print(f"  {prompt!r} -> {pred!r} (reference {ans!r})")
        return em
    def info():  # after training: the packing statistics of the batches the run drew
        return {"data": {"kind": prepared.kind, "fingerprint": prepared.fingerprint,
                         "splits": {k: len(v) for k, v in prepared.splits.items()},
                         "packing": it.pack_stats.to_dict(), "report": "data_report.json"}}
    return it, evals, score if n_em > 0 and prepared.kind == "sft" and has_eval else None, info


def run(cfg: Any, workdir: str) -> dict:
    r = Run.build(cfg, workdir, name="train")
    r.check_exportable()
    batches, evals, score, info = file_data(r) if uses_files(cfg) else synthetic_data(r)
    loss_fn = sft_loss(r.model_cfg, float(cfg.train.z_loss), r.method.apply_fn,
                       r.method.bind_rng)
    before = None
    if score is not None and bool(cfg.data.get("eval_before", False)):
        # Held-out exact match of the starting model, so the run shows what it learned.
        before = score(r.starting_params(), ", before training")["exact_match"]
    try:
        result = r.train(loss_fn, batches, eval_batches=evals)
    finally:
        if hasattr(batches, "close"):
            batches.close()
    em = {"exact_match": None, "n": 0}
    if score is not None:
        em = score(result.params)  # on the mesh: nothing gathered to a host
        if not uses_files(cfg):
            print("held-out exact match: " + (f"{before:.3f} -> " if before is not None else "")
                  + f"{em['exact_match']:.3f} over {em['n']} examples")
    summary = {"exported_hf_dir": r.export_hf(result.params),
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evals": result.evals, "exact_match": em["exact_match"],
               "exact_match_before": before, "n_test": em["n"],
               "wall_s": result.wall_s, "stopped_early": result.stopped_early,
               "resumed_from": result.resumed_from, **info()}
    r.write_summary(summary)
    return summary
