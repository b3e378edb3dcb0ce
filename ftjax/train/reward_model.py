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

from ftjax.data.batching import SEPARATOR, bos_prefix
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

    def _ids(self, text: Text) -> list[int]:
        """The token ids the score reads: `[bos] string`, or for a (prompt, completion) pair
        `[bos] prompt SEPARATOR completion [eos]`, the trainer's rows (`data.batching`)."""
        tok = self.tokenizer
        if isinstance(text, str):
            return bos_prefix(tok) + list(tok.encode(text))
        prompt, completion = text
        return (bos_prefix(tok) + list(tok.encode(prompt + SEPARATOR))
                + list(tok.encode(completion)) + [tok.eos_id])

    def score(self, texts: Sequence[Text]) -> np.ndarray:
        """[N] float32 rewards of strings or (prompt, completion) pairs."""
        texts = list(texts)
        if not texts:
            return np.zeros((0,), np.float32)
        for i, t in enumerate(texts):
            if not (isinstance(t, str) or (isinstance(t, (tuple, list)) and len(t) == 2)):
                raise TypeError(f"RewardModel.score: text {i} is {type(t).__name__}; pass strings "
                                "or (prompt, completion) pairs")
        ids = [self._ids(t) for t in texts]
        limit = self.cfg.max_position_embeddings
        too_long = [i for i, x in enumerate(ids) if len(x) > limit]
        if too_long:
            raise ValueError(f"RewardModel.score: texts {too_long[:5]} have "
                             f"{max(len(ids[i]) for i in too_long)} tokens, more than the "
                             f"model's {limit} positions; shorten them")
        seq_len = min(limit, -(-max(len(x) for x in ids) // self.bucket) * self.bucket)
        out = []
        for lo in range(0, len(ids), self.batch_size):
            chunk = ids[lo:lo + self.batch_size]
            b = {"inputs": np.full((self.batch_size, seq_len), self.tokenizer.pad_id, np.int32),
                 "segment_ids": np.zeros((self.batch_size, seq_len), np.int32),
                 "positions": np.zeros((self.batch_size, seq_len), np.int32)}
            for i, x in enumerate(chunk):    # right-padded; rows past the chunk stay empty
                b["inputs"][i, :len(x)] = x
                b["segment_ids"][i, :len(x)] = 1
                b["positions"][i, :len(x)] = np.arange(len(x))
            s = self._fwd(self.params, b["inputs"], b["segment_ids"], b["positions"])
            out.append(np.asarray(jax.device_get(s))[:len(chunk)])
        return np.concatenate(out).astype(np.float32)

    __call__ = score
