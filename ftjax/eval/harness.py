"""Evaluation harness: exact-match generation accuracy and token-level log-likelihood.

`exact_match_eval` scores greedy (or sampled) completions of `{"prompt", "answer"}` examples,
the format of the synthetic task suite. `loglik_eval` averages the NLL of masked target tokens
over batches in the training layout {inputs, targets, loss_mask, segment_ids, positions}.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import models
from ftjax.data.batching import SEPARATOR, bos_prefix
from ftjax.data.chat import apply_chat_template
from ftjax.infer.generate import generate_ids, generate_text
from ftjax.models.config import ModelConfig

__all__ = ["exact_match_eval", "chat_exact_match", "loglik_eval"]

Params = dict[str, Any]

NUM_SAMPLES = 5  # (prompt, prediction, answer) triples kept for inspection
LOGLIK_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def exact_match_eval(params: Params, cfg: ModelConfig, tokenizer,
                     examples: Sequence[Mapping[str, str]], *, max_new_tokens: int,
                     batch_size: int = 64, placement=None, **sampling) -> dict:
    """Fraction of examples whose generated text equals the answer (both `.strip()`-ed).

    Returns {"exact_match": float, "n": int, "samples": [(prompt, prediction, answer)] * <=5}.
    `sampling` (temperature, top_k, top_p, rng) is passed to `generate_text`; default greedy.
    placement: the run's `Placement` when `params` are sharded on its mesh: generation then
    runs there (`ftjax.eval.engine`, greedy only), without gathering the params to a host.
    """
    for i, ex in enumerate(examples):
        missing = [k for k in ("prompt", "answer") if k not in ex]
        if missing:
            raise ValueError(f"exact_match_eval: example {i} lacks keys {missing} "
                             f"(has {sorted(ex)}); each example needs 'prompt' and 'answer'")
    prompts = [ex["prompt"] for ex in examples]
    answers = [ex["answer"] for ex in examples]
    if placement is not None:
        ids = [bos_prefix(tokenizer) + list(tokenizer.encode(p + SEPARATOR)) for p in prompts]
        predictions = [tokenizer.decode(g) for g in _sharded_greedy(
            params, cfg, tokenizer, ids, placement, max_new_tokens, batch_size, sampling)]
    else:
        predictions = generate_text(params, cfg, tokenizer, prompts,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    **sampling)
    hits = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    n = len(examples)
    return {"exact_match": hits / n if n else 0.0, "n": n,
            "samples": list(zip(prompts, predictions, answers))[:NUM_SAMPLES]}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _nll_sums(params: Params, batch: dict, *, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Sum of masked target NLL and the number of masked tokens in one batch."""
    logits, _ = models.apply(params, cfg, batch["inputs"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(target_logp * mask), jnp.sum(mask)


def loglik_eval(params: Params, cfg: ModelConfig,
                batches: Iterable[Mapping[str, Any]]) -> dict:
    """Token-level mean NLL over `batches`: {"loss": float, "tokens": int}.

    Each batch holds [B, T] arrays `inputs`, `targets`, `loss_mask`, `segment_ids`, `positions`;
    the loss is the mask-weighted mean over all batches together (not a mean of batch means).
    """
    sums = []  # device scalars, summed on the host at the end so batches dispatch back to back
    for i, batch in enumerate(batches):
        missing = [k for k in LOGLIK_KEYS if k not in batch]
        if missing:
            raise ValueError(f"loglik_eval: batch {i} lacks keys {missing} (has {sorted(batch)})")
        arrays = {k: jnp.asarray(batch[k], jnp.int32) if k != "loss_mask"
                  else jnp.asarray(batch[k]) for k in LOGLIK_KEYS}
        sums.append(_nll_sums(params, arrays, cfg=cfg))
    total_nll = float(sum(np.float64(nll) for nll, _ in sums))
    total_tokens = float(sum(np.float64(count) for _, count in sums))
    if total_tokens <= 0:
        raise ValueError("loglik_eval: no tokens to score (every loss_mask is zero, or no batches)")
    return {"loss": total_nll / total_tokens, "tokens": int(round(total_tokens))}


def _sharded_greedy(params, cfg, tokenizer, ids, placement, max_new_tokens, batch_size,
                    sampling, apply_fn=None) -> list[list[int]]:
    """Greedy continuations (ids up to eos) on the mesh of `placement`."""
    from ftjax.eval.engine import Engine
    apply_fn = sampling.pop("apply_fn", apply_fn)
    if sampling.get("temperature", 0.0):
        raise ValueError("sharded exact-match evaluation decodes greedily; drop temperature")
    engine = Engine(params, cfg, tokenizer, placement=placement, apply_fn=apply_fn,
                    batch_size=batch_size)
    return [list(g.ids) for g in engine.generate(ids, max_new_tokens=max_new_tokens,
                                                 eos_ids=[int(tokenizer.eos_id)])]


def chat_exact_match(params: Params, cfg: ModelConfig, tokenizer, examples: Sequence[Mapping],
                     *, template, max_new_tokens: int, apply_fn=None,
                     batch_size: int = 64, placement=None) -> dict:
    """Exact match of greedy generation after each conversation's last user turn, rendered
    with the training `template` (and its generation prompt), against the reference reply.

    examples: canonical chat examples (`{"messages": [...]}`); those that do not end with an
    assistant turn are skipped. Returns {"exact_match", "n", "samples"} like
    `exact_match_eval` (exact_match None when nothing could be scored)."""
    prompts, answers = [], []
    for ex in examples:
        msgs = ex.get("messages") or []
        if len(msgs) >= 2 and msgs[-1]["role"] == "assistant":
            prompts.append(apply_chat_template(tokenizer, msgs[:-1], add_generation_prompt=True,
                                               template=template))
            answers.append(msgs[-1]["content"])
    if not prompts:
        return {"exact_match": None, "n": 0, "samples": []}
    if placement is not None:
        out = _sharded_greedy(params, cfg, tokenizer, prompts, placement, max_new_tokens,
                              batch_size, {}, apply_fn)
    else:
        out = generate_ids(params, cfg, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, apply_fn=apply_fn)
    preds = [tokenizer.decode(ids) for ids in out]
    hits = sum(p.strip() == a.strip() for p, a in zip(preds, answers))
    return {"exact_match": hits / len(answers), "n": len(answers),
            "samples": list(zip([tokenizer.decode(p) for p in prompts[:NUM_SAMPLES]],
                                preds[:NUM_SAMPLES], answers[:NUM_SAMPLES]))}
