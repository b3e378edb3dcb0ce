"""Trainer "distill": knowledge distillation of a frozen teacher into the run's model.

The student is the run's model (`model` section, any PEFT method: all set-up comes from
`Run`). The teacher is any model ftjax loads (`distill.teacher`: an ftjax params file, a
Hugging Face directory, `hf:DIR`, or a training workdir; `ftjax.evaluate.load_model`), placed
on the run's mesh and frozen. Its forward runs inside the jitted training step: its params are
closed over by the loss (JAX hoists closed-over arrays to executable arguments, so they are not
compiled in as constants), never differentiated, never checkpointed.

Objective per token of the data's loss mask (sums, as every ftjax loss):
    alpha * D(p_T, p_S) + (1 - alpha) * CE(data)
with D = `ftjax.align.distill.token_divergence` (forward KL, reverse KL or generalized JSD,
at `temperature`; TRL's GKD conventions). alpha = 0 is plain next-token cross-entropy (the
baseline; the teacher's forward is then skipped). `teacher_completions=True` replaces every
training answer by the teacher's greedy completion of its prompt, once, before training
(sequence-level KD, Kim & Rush 2016; offline, not on-policy). `student_init="truncate"`
starts the student from the teacher's layers, evenly spaced (first and last kept).

Data: the synthetic suite (`data.tasks`), held-out exact match of teacher and student.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from ftjax import data as ftdata
from ftjax import models
from ftjax.align import distill as kd
from ftjax.eval.harness import exact_match_eval
from ftjax.models.config import ModelConfig
from ftjax.models.moe import add_moe_losses
from ftjax.train.losses import token_cross_entropy
from ftjax.train.run import (Run, fixed_batches, host_params, model_config, resolve_path,
                             synthetic_loader, tokenizer_for, uses_files)

DEFAULTS = {"distill": dict(
    teacher="",                 # params file, HF dir (or hf:DIR) or ftjax workdir
    loss="forward_kl",          # forward_kl | reverse_kl | jsd
    beta=0.5,                   # generalized JSD interpolation (jsd only; 0 = fwd, 1 = rev KL)
    temperature=1.0,            # softmax(logits / temperature) for both models
    t2_scale=False,             # multiply the divergence by temperature**2 (Hinton et al.)
    alpha=0.5,                  # weight of the divergence; 1 - alpha on the data CE
    student_init="config",      # config (model section / init_from) | truncate (teacher layers)
    teacher_completions=False,  # train on the teacher's greedy answers (sequence-level KD)
    eval_teacher=True,          # held-out exact match of the teacher too
)}
CHECKS = {"distill": dict(loss=kd.KINDS, beta="in [0, 1]", temperature="> 0",
                          alpha="in [0, 1]", student_init=("config", "truncate"))}

# ModelConfig fields that do not change the function a model computes.
_RUNTIME = ("dtype", "param_dtype", "scan_layers", "remat", "init_std",
            "max_position_embeddings")


# ------------------------------------------------------------------------------------------
# The teacher
# ------------------------------------------------------------------------------------------

def load_teacher(cfg: Any):
    """The teacher (`ftjax.evaluate.EvalModel`) placed on the run's mesh (`cfg.mesh`)."""
    from ftjax.evaluate import load_model
    src = str(cfg.distill.teacher or "")
    if not src:
        raise ValueError("distill.teacher is empty: set --config.distill.teacher to an ftjax "
                         "params file, a Hugging Face directory (hf:DIR) or a training workdir")
    path = src[3:] if src.startswith("hf:") else src
    path = resolve_path(path, "distill.teacher")
    return load_model(path, layout=cfg)


def check_same_vocab(student_cfg: ModelConfig, student_tok, teacher_cfg: ModelConfig,
                     teacher_tok, probe: str = "") -> None:
    """Refuses a student and teacher whose logits do not index the same tokens: different
    vocabulary sizes, tokenizer kinds or encodings of `probe` (a sample of the data)."""
    problems = []
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        problems.append(f"vocab_size: student {student_cfg.vocab_size}, teacher "
                        f"{teacher_cfg.vocab_size}")
    if type(student_tok).__name__ != type(teacher_tok).__name__:
        problems.append(f"tokenizer: student {type(student_tok).__name__}, teacher "
                        f"{type(teacher_tok).__name__}")
    elif int(student_tok.vocab_size) != int(teacher_tok.vocab_size):
        problems.append(f"tokenizer vocab: student {student_tok.vocab_size}, teacher "
                        f"{teacher_tok.vocab_size}")
    elif probe and list(student_tok.encode(probe)) != list(teacher_tok.encode(probe)):
        problems.append(f"the tokenizers encode {probe[:40]!r} differently")
    if problems:
        raise ValueError("distillation needs a student and a teacher with the same tokenizer and "
                         "vocabulary (token-level losses compare their logits id by id): "
                         + "; ".join(problems) + ". Use a teacher of the student's family/"
                         "tokenizer (or set model.vocab_size / model.init_from to match)")


def truncated_params(teacher_params: Any, teacher_cfg: ModelConfig,
                     student_cfg: ModelConfig) -> dict:
    """The teacher's params with `student_cfg.num_layers` of its stacked layers, evenly spaced
    (first and last kept): a student that differs from the teacher only in depth."""
    diff = {k: (v, getattr(student_cfg, k)) for k, v in dataclasses.asdict(teacher_cfg).items()
            if k not in _RUNTIME + ("num_layers",) and getattr(student_cfg, k) != v}
    if diff:
        raise ValueError("distill.student_init='truncate' keeps the teacher's layers, so the "
                         "student may differ from it only in num_layers; it differs in "
                         + ", ".join(f"{k} (teacher {a!r}, student {b!r})"
                                     for k, (a, b) in diff.items()))
    n, total = int(student_cfg.num_layers), int(teacher_cfg.num_layers)
    if not (teacher_cfg.scan_layers and student_cfg.scan_layers) or n > total:
        raise ValueError(f"distill.student_init='truncate' needs stacked layers (scan_layers) "
                         f"and a student no deeper than the teacher ({n} > {total} layers)")
    keep = np.round(np.linspace(0, total - 1, n)).astype(int) if n > 1 else np.array([0])
    from ftjax.peft.core import merge
    host = jax.device_get(merge(teacher_params))
    out = {k: v for k, v in host.items() if k != "layers"}
    out["layers"] = jax.tree.map(lambda x: np.asarray(x)[keep], host["layers"])
    return out


# ------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------

def distill_loss(model_cfg: ModelConfig, teacher_cfg: ModelConfig, teacher_params: Any,
                 s: Any, apply_fn=None, teacher_apply_fn=None, bind_rng=None) -> Callable:
    """`loss_fn(params, batch, rng) -> (objective_sum, stats)`: alpha * divergence + (1 - alpha)
    * CE over the loss mask. stats: "nll" (data CE, reported as the loss), "distill" (the
    divergence; also at alpha = 0 when the teacher is given), "correct", "tokens"."""
    apply_fn = apply_fn or models.apply
    teacher_apply_fn = teacher_apply_fn or models.apply
    alpha = float(s.alpha)
    div = dict(kind=str(s.loss), beta=float(s.beta), temperature=float(s.temperature),
               t2_scale=bool(s.t2_scale))

    def loss_fn(params, batch, rng):
        if bind_rng is not None and rng is not None:
            params = bind_rng(params, rng)
        kw = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        logits, aux = apply_fn(params, model_cfg, batch["inputs"], **kw)
        stats = token_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        stats.pop("z")
        objective = stats["nll"]
        if alpha > 0:
            t_logits, _ = teacher_apply_fn(teacher_params, teacher_cfg, batch["inputs"], **kw)
            d = kd.distill_sums(logits, t_logits, batch["loss_mask"], **div)["distill"]
            stats["distill"] = d
            objective = alpha * d + (1.0 - alpha) * stats["nll"]
        return add_moe_losses(objective, stats, aux, model_cfg)

    return loss_fn


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------

def teacher_answers(teacher, examples: list[dict], max_new_tokens: int) -> list[dict]:
    """Each example with its answer replaced by the teacher's greedy completion."""
    if not examples:
        return []
    from ftjax.infer.generate import generate_text
    from ftjax.train.run import gather
    preds = generate_text(jax.device_get(gather(teacher.params)), teacher.cfg,
                          teacher.tokenizer, [e["prompt"] for e in examples],
                          max_new_tokens=max_new_tokens, batch_size=64,
                          apply_fn=teacher.apply_fn)
    return [{**e, "answer": p.strip()} for e, p in zip(examples, preds)]


def _n_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def run(cfg: Any, workdir: str) -> dict:
    if uses_files(cfg):
        raise ValueError("trainer 'distill' trains on the synthetic suite (data.tasks); "
                         "distillation on data.source files is not implemented yet")
    s, d, t = cfg.distill, cfg.data, cfg.train
    teacher = load_teacher(cfg)
    init_params = None
    student_cfg = model_config(cfg.model)
    tok = tokenizer_for(cfg)
    train_ex, test_ex, per_task = [], [], []
    for task in d.tasks:
        tr, te = ftdata.make_splits(task, int(d.n_per_task), int(d.seed), float(d.test_frac))
        train_ex += tr
        test_ex += te
        per_task.append(te)
    probe = "".join(e["prompt"] + "\n" + e["answer"] for e in train_ex[:8])
    check_same_vocab(student_cfg, tok, teacher.cfg, teacher.tokenizer, probe)
    if str(s.student_init) == "truncate":
        init_params = host_params(lambda: truncated_params(teacher.params, teacher.cfg,
                                                           student_cfg))
    r = Run.build(cfg, workdir, name="distill", tokenizer=tok, model_cfg=student_cfg,
                  init_params=init_params)
    r.check_exportable()
    n_em, new = int(d.eval_examples), int(d.max_new_tokens)
    # Scored on the first test examples of every task in turn (every task is represented).
    held_out = [ex for row in zip(*per_task) for ex in row][:n_em]

    def score(params, model_cfg, apply_fn, placement):
        return exact_match_eval(params, model_cfg, tok, held_out, max_new_tokens=new,
                                apply_fn=apply_fn, placement=placement)

    teacher_em = (score(teacher.params, teacher.cfg, teacher.apply_fn, teacher.placement)
                  if n_em > 0 and bool(s.eval_teacher) else None)
    if teacher_em is not None:
        print(f"[distill] teacher held-out exact match: {teacher_em['exact_match']:.3f} "
              f"over {teacher_em['n']} examples")
    if bool(s.teacher_completions):
        train_ex = teacher_answers(teacher, train_ex, new)
        print(f"[distill] training on the teacher's greedy answers to {len(train_ex)} prompts")
    before = None
    if n_em > 0 and bool(d.get("eval_before", False)):
        before = score(r.starting_params(), r.model_cfg, r.method.apply_fn,
                       r.placement)["exact_match"]
    loss_fn = distill_loss(r.model_cfg, teacher.cfg, teacher.params, s, r.method.apply_fn,
                           teacher.apply_fn, r.method.bind_rng)
    n_t, n_s = _n_params(teacher.params), _n_params(jax.eval_shape(r.init_params))
    print(f"[distill] teacher {n_t} params, student {n_s} ({n_s / n_t:.2f}x); loss={s.loss} "
          f"beta={s.beta} T={s.temperature} alpha={s.alpha} init={s.student_init}")
    batches = synthetic_loader(train_ex, tok, cfg)
    result = r.train(loss_fn, batches,
                     eval_batches=fixed_batches(test_ex, tok, int(t.batch_size), int(t.seq_len)))
    em = score(result.params, r.model_cfg, r.method.apply_fn, r.placement) if n_em > 0 else None
    if em is not None:
        print("[distill] student held-out exact match: "
              + (f"{before:.3f} -> " if before is not None else "")
              + f"{em['exact_match']:.3f} over {em['n']} examples")
    last = result.history[-1] if result.history else {}
    summary = {"trainer": "distill", "teacher": str(s.teacher), "loss": str(s.loss),
               "beta": float(s.beta), "temperature": float(s.temperature),
               "alpha": float(s.alpha), "student_init": str(s.student_init),
               "teacher_completions": bool(s.teacher_completions),
               "teacher_params": n_t, "student_params": n_s,
               "teacher_exact_match": teacher_em["exact_match"] if teacher_em else None,
               "exact_match": em["exact_match"] if em else None,
               "exact_match_before": before, "n_test": em["n"] if em else 0,
               "final_loss": last.get("loss"), "final_distill": last.get("distill"),
               "evals": result.evals, "wall_s": result.wall_s,
               "resumed_from": result.resumed_from,
               "exported_hf_dir": r.export_hf(result.params)}
    r.write_summary(summary)
    return summary


