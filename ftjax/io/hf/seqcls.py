"""Sequence-classification checkpoints with one label (reward and value models).

transformers' `*ForSequenceClassification` is the decoder backbone (`model.*`, or
`transformer.*` for GPT-2) plus `score.weight` [num_labels, d] (no bias), read at each row's
last non-padding token (`config.pad_token_id`). There is no LM head. ftjax holds the same model
as its causal-LM params (tied embeddings stand in for the absent head: the reward forward never
computes logits) plus `{"score": {"kernel": [d, 1]}}` (`models.heads`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from ftjax.io.files import write_json
from ftjax.io.hf.config import read_config
from ftjax.io.hf.families import HF_FAMILIES, HFCheckpointError, family_of
from ftjax.io.hf.load import dtype_name, load_pretrained
from ftjax.io.hf.save import save_pretrained
from ftjax.models.config import ModelConfig

SCORE_KEY = "score.weight"


def seqcls_architecture(cfg: ModelConfig) -> str:
    """`LlamaForCausalLM` -> `LlamaForSequenceClassification` (GPT2LMHeadModel -> GPT2...)."""
    arch = HF_FAMILIES[cfg.family].architecture
    for suffix in ("ForCausalLM", "LMHeadModel"):
        if arch.endswith(suffix):
            return arch[:-len(suffix)] + "ForSequenceClassification"
    raise HFCheckpointError(f"no sequence-classification class known for {arch}")


def save_reward_model(path: str, cfg: ModelConfig, params: dict, *, pad_token_id: int,
                      extra_config: Optional[dict] = None, dtype: Any = None,
                      tokenizer_dir: Optional[str] = None, **save_kw: Any) -> list[str]:
    """Writes params (the backbone plus `score`) as a transformers `*ForSequenceClassification`
    directory with one label, which `AutoModelForSequenceClassification.from_pretrained` loads.

    pad_token_id goes into config.json: transformers finds each row's last real token by it.
    Structured (adapter) weights must be merged first (`peft.core.merge`). Returns the files
    written. `save_kw` goes to `save_pretrained` (e.g. shard_size_mb)."""
    if "score" not in params:
        raise ValueError("reward-model params need a 'score' head ({'kernel': [d, 1]}); got "
                         f"top-level keys {sorted(params)}")
    kernel = np.asarray(params["score"]["kernel"], np.float32)
    if kernel.shape != (cfg.hidden_size, 1):
        raise ValueError(f"score kernel has shape {list(kernel.shape)}, expected "
                         f"[{cfg.hidden_size}, 1]")
    body = {k: v for k, v in params.items() if k not in ("score", "lm_head")}
    storage = dtype_name(dtype if dtype is not None else cfg.param_dtype)
    # Tied embeddings make the layout skip lm_head, which a classification model does not have;
    # the head is stored [1, d], as torch's Linear holds it.
    files = save_pretrained(path, dataclasses.replace(cfg, tie_embeddings=True), body,
                            dtype=dtype, extra_config=extra_config, tokenizer_dir=tokenizer_dir,
                            extra_tensors={SCORE_KEY: kernel.T.astype(np.dtype(storage))},
                            **save_kw)
    c = read_config(path)
    c.update({"architectures": [seqcls_architecture(cfg)], "num_labels": 1,
              "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
              "tie_word_embeddings": bool(cfg.tie_embeddings), "pad_token_id": int(pad_token_id),
              "problem_type": "regression"})
    write_json(os.path.join(path, "config.json"), c)
    return files


def load_reward_model(path: str, dtype: Any = None) -> tuple[ModelConfig, dict, int]:
    """Reads a transformers `*ForSequenceClassification` directory with one label into
    `(ModelConfig, params with "score", pad_token_id)`; host numpy leaves. The config has
    tie_embeddings=True (the checkpoint has no LM head)."""
    path = os.fspath(path)
    c = read_config(path)
    archs = list(c.get("architectures") or [])
    causal = [a.replace("ForSequenceClassification", "ForCausalLM") for a in archs]
    causal = ["GPT2LMHeadModel" if a == "GPT2ForCausalLM" else a for a in causal]
    problems = []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        problems.append(f"architectures {archs} is not a *ForSequenceClassification class")
    labels = c.get("num_labels", len(c.get("id2label") or {}) or None)
    if labels not in (1, None):
        problems.append(f"num_labels={labels}; a reward model has one label (a scalar score)")
    family, why = family_of({**c, "architectures": causal})
    if family is None:
        problems.append(why)
    if c.get("pad_token_id") is None:
        problems.append("config.json has no pad_token_id; transformers needs it to find each "
                        "row's last token, and so does ftjax's reader")
    if problems:
        raise HFCheckpointError(f"cannot load {path!r} as a reward model:\n"
                                + "\n".join(f"  - {p}" for p in problems))
    causal_cfg = {**c, "architectures": causal, "tie_word_embeddings": True}
    cfg, params = load_pretrained(path, dtype, hf_config=causal_cfg, extra_tensors=(SCORE_KEY,))
    from safetensors import safe_open
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    score = None
    for name in files:
        with safe_open(os.path.join(path, name), framework="numpy") as f:
            if SCORE_KEY in f.keys():
                score = np.asarray(f.get_tensor(SCORE_KEY), np.float32)
    if score is None or score.shape != (1, cfg.hidden_size):
        raise HFCheckpointError(f"{path!r}: {SCORE_KEY} missing or not [1, {cfg.hidden_size}]")
    params["score"] = {"kernel": score.T.astype(np.dtype(cfg.param_dtype))}
    return cfg, params, int(c["pad_token_id"])
