"""A trained reward model as a Python reward function: `RewardModel.from_pretrained(dir).score`.

The directory is a transformers `*ForSequenceClassification` checkpoint with one label (what
the "reward" trainer exports, or any such Llama / Mistral / Qwen / Gemma / GPT-2 / Mixtral
directory). Texts are encoded as the trainer encoded them: a (prompt, completion) pair becomes
`[bos] prompt "\\n" completion [eos]` (the batch layout of `data.batching`), a plain string
`[bos] string`; the score is read at the last token.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.data.batching import SEPARATOR, bos_prefix, encode_example
from ftjax.models.config import ModelConfig
from ftjax.models.heads import sequence_scores

Text = Union[str, tuple[str, str]]


class RewardModel:
    """Scores texts with a reward model's params (backbone + `score`), batched and jitted.

    params may be host arrays or arrays placed on a mesh (the jitted forward follows their
    shardings); apply_fn is a PEFT method's apply when the params hold unmerged adapters."""

    def __init__(self, params: Any, cfg: ModelConfig, tokenizer: Any, *, batch_size: int = 32,
                 apply_fn: Optional[Callable] = None, bucket: int = 16):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.batch_size, self.bucket = int(batch_size), int(bucket)
        self._fwd = jax.jit(lambda p, i, s, q: sequence_scores(p, cfg, i, s, q, apply_fn)[0])

    @classmethod
    def from_pretrained(cls, path: str, dtype: Any = None, **kw) -> "RewardModel":
        from ftjax.data import CharTokenizer, HFTokenizer
        from ftjax.io.hf.seqcls import load_reward_model
        cfg, params, _ = load_reward_model(path, dtype)
        tok = (HFTokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json"))
               else CharTokenizer())
        return cls(jax.tree.map(jnp.asarray, params), cfg, tok, **kw)

    def _row(self, text: Text, seq_len: int) -> dict:
        tok = self.tokenizer
        if isinstance(text, str):
            ids = bos_prefix(tok) + list(tok.encode(text))
            row = {"inputs": np.full(seq_len, tok.pad_id, np.int32),
                   "segment_ids": np.zeros(seq_len, np.int32),
                   "positions": np.zeros(seq_len, np.int32)}
            row["inputs"][:len(ids)] = ids
            row["segment_ids"][:len(ids)] = 1
            row["positions"][:len(ids)] = np.arange(len(ids))
            return row
        prompt, completion = text
        return encode_example(tok, {"prompt": prompt, "answer": completion}, seq_len)

    def _length(self, text: Text) -> int:
        tok = self.tokenizer
        if isinstance(text, str):
            return len(bos_prefix(tok)) + len(tok.encode(text))
        prompt, completion = text   # [bos] prompt SEPARATOR completion [eos], all in the inputs
        return (len(bos_prefix(tok)) + len(tok.encode(prompt + SEPARATOR))
                + len(tok.encode(completion)) + 1)

    def score(self, texts: Sequence[Text]) -> np.ndarray:
        """[N] float32 rewards of strings or (prompt, completion) pairs."""
        texts = list(texts)
        if not texts:
            return np.zeros((0,), np.float32)
        for i, t in enumerate(texts):
            if not (isinstance(t, str) or (isinstance(t, (tuple, list)) and len(t) == 2)):
                raise TypeError(f"RewardModel.score: text {i} is {type(t).__name__}; pass strings "
                                "or (prompt, completion) pairs")
        lengths = [self._length(t) for t in texts]
        limit = self.cfg.max_position_embeddings
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if too_long:
            raise ValueError(f"RewardModel.score: texts {too_long[:5]} have "
                             f"{max(lengths[i] for i in too_long)} tokens, more than the model's "
                             f"{limit} positions; shorten them")
        seq_len = min(limit, -(-max(lengths) // self.bucket) * self.bucket)
        out = []
        for lo in range(0, len(texts), self.batch_size):
            chunk = texts[lo:lo + self.batch_size]
            rows = [self._row(t, seq_len) for t in chunk]
            rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] \
                * (self.batch_size - len(rows))
            b = {k: np.stack([r[k] for r in rows]) for k in ("inputs", "segment_ids",
                                                              "positions")}
            s = self._fwd(self.params, b["inputs"], b["segment_ids"], b["positions"])
            out.append(np.asarray(jax.device_get(s))[:len(chunk)])
        return np.concatenate(out).astype(np.float32)

    __call__ = score
