"""Prompt/answer examples -> fixed-shape causal-LM batches, a resumable loader, prompt batches.

Batch layout (the train step relies on it), all numpy, `T = seq_len`:

    inputs       int32   [B, T]  seq[:T]      where seq = [bos] prompt "\\n" answer [eos] pad...
    targets      int32   [B, T]  seq[1:T+1]
    loss_mask    float32 [B, T]  1 where the target is an answer token or eos (completion-only)
    segment_ids  int32   [B, T]  1 on real input tokens, 0 on padding
    positions    int32   [B, T]  0..n-1 on real input tokens, 0 on padding

An example fits when its sequence has at most `T + 1` tokens (the last one is only a target).
"""

from __future__ import annotations

from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from ftjax.data.synthetic import DeterministicRng
from ftjax.data.tokenizer import Tokenizer
from ftjax.data.resumable import Resumable

__all__ = ["BATCH_KEYS", "encode_example", "SyntheticLoader", "PromptBatch", "prompt_batch"]

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
SEPARATOR = "\n"  # between prompt and answer; generation starts after it


def bos_prefix(tok: Tokenizer) -> list[int]:
    """[bos] for tokenizers that have one; [] for those without (e.g. Qwen's)."""
    return [] if tok.bos_id is None else [tok.bos_id]


def _describe(ex: Mapping) -> str:
    return f"(task={ex.get('task', '?')!r}, prompt={str(ex.get('prompt'))[:60]!r})"


def encode_example(tok: Tokenizer, ex: Mapping, seq_len: int) -> dict[str, np.ndarray]:
    """One `{"prompt", "answer"}` example -> one row of the batch layout, plus `tokens`.

    `tokens` is the padded full sequence `[bos] prompt "\\n" answer [eos]` of length `seq_len + 1`;
    the other keys are `[seq_len]` rows as in `BATCH_KEYS`. Raises ValueError if it does not fit.
    """
    try:
        prompt_ids = bos_prefix(tok) + tok.encode(ex["prompt"] + SEPARATOR)
        answer_ids = tok.encode(ex["answer"]) + [tok.eos_id]
    except KeyError as e:
        raise ValueError(f"example {_describe(ex)} has no field {e}; need 'prompt' and 'answer'") from None
    except ValueError as e:
        raise ValueError(f"example {_describe(ex)}: {e}") from None
    seq = prompt_ids + answer_ids
    if len(seq) > seq_len + 1:
        raise ValueError(
            f"example {_describe(ex)} needs {len(seq)} tokens ({len(seq) - 1} inputs) but "
            f"seq_len={seq_len}; raise seq_len to at least {len(seq) - 1} or shorten the example."
        )
    n = len(seq)
    tokens = np.full(seq_len + 1, tok.pad_id, np.int32)
    tokens[:n] = seq
    token_is_answer = np.zeros(seq_len + 1, np.float32)
    token_is_answer[len(prompt_ids):n] = 1.0
    n_inputs = min(n, seq_len)  # real tokens among inputs = seq[:T]
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n_inputs] = 1
    positions = np.zeros(seq_len, np.int32)
    positions[:n_inputs] = np.arange(n_inputs, dtype=np.int32)
    return {
        "tokens": tokens,
        "inputs": tokens[:-1].copy(),
        "targets": tokens[1:].copy(),
        "loss_mask": token_is_answer[1:].copy(),
        "segment_ids": segment_ids,
        "positions": positions,
    }


def _empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows (pad id 0 everywhere, nothing counted in the loss)."""
    return {k: np.zeros((n, seq_len), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}


class SyntheticLoader(Resumable):
    """Deterministic, resumable iterator of fixed-shape batches over an in-memory example list.

    Step `s` maps to epoch `s // batches_per_epoch` and position `s % batches_per_epoch`; the
    global batch at a step depends only on (seed, epoch, position), each epoch being a fresh
    permutation keyed by (seed, epoch). Process `p` of `P` yields rows `[p*B/P, (p+1)*B/P)` of
    it, so any process count sees the same global batches. With `drop_remainder=False` the last
    batch of an epoch is filled up with all-padding rows (zero `loss_mask`, zero `segment_ids`).
    `num_epochs=None` iterates forever.
    """

    def __init__(self, examples: Sequence[Mapping], tok: Tokenizer, batch_size: int, seq_len: int,
                 seed: int, *, shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1, drop_remainder: bool = True,
                 num_epochs: int | None = None) -> None:
        if batch_size <= 0 or process_count <= 0:
            raise ValueError(f"batch_size ({batch_size}) and process_count ({process_count}) must be positive")
        if batch_size % process_count:
            lo = batch_size // process_count * process_count
            raise ValueError(
                f"batch_size {batch_size} is not divisible by process_count {process_count}; "
                f"use a multiple of {process_count} (e.g. {lo or process_count} or {lo + process_count})."
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        n = len(examples)
        if n == 0 or (drop_remainder and n < batch_size):
            raise ValueError(
                f"dataset has {n} examples, fewer than one batch of batch_size {batch_size}; "
                "use more examples or a smaller batch_size."
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self.num_examples = n
        self.local_batch_size = batch_size // process_count
        self.batches_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        # Encode everything up front: bad examples fail at construction, not mid-run.
        rows = [encode_example(tok, ex, seq_len) for ex in examples]
        self._rows = {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}
        self._step = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    # -- random access ---------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = self.num_examples
            order = DeterministicRng("loader", self.seed, epoch).permutation(n) if self.shuffle else range(n)
            self._perm = np.asarray(order, np.int64)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch at `step` (may be shorter than B at an epoch end)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        return self._epoch_order(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch at `step` (pure: does not move the iterator)."""
        idx = self.global_indices(step)
        lo = self.process_index * self.local_batch_size
        idx = idx[lo:lo + self.local_batch_size]
        batch = {k: v[idx] for k, v in self._rows.items()}
        missing = self.local_batch_size - len(idx)
        if missing:
            pad = _empty_rows(missing, self.seq_len)
            batch = {k: np.concatenate([batch[k], pad[k]]) for k in BATCH_KEYS}
        return batch

    # -- iteration and state ---------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self._step >= self.num_epochs * self.batches_per_epoch:
            raise StopIteration
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    @property
    def epoch(self) -> int:
        return self._step // self.batches_per_epoch

    def get_state(self) -> dict:
        """JSON-serialisable position; the fields besides `step` guard against a changed setup."""
        return {"step": self._step, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": self.num_examples}

    def set_state(self, state: Mapping) -> None:
        """Resume so that the next batch is the one an uninterrupted iterator would yield."""
        if "step" not in state:
            raise ValueError(f"loader state {dict(state)} has no 'step'")
        for key in ("seed", "batch_size", "num_examples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this loader has "
                    f"{key}={getattr(self, key)}; resume with the same data and settings."
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"loader state has negative step {step}")
        self._step = step


class PromptBatch(NamedTuple):
    """Left-padded prompts for generation: real tokens end at column T-1 in every row."""

    tokens: np.ndarray  # int32 [B, T]  pad ... [bos] prompt "\n"
    lengths: np.ndarray  # int32 [B]     number of real tokens per row
    segment_ids: np.ndarray  # int32 [B, T]  1 on real tokens, 0 on padding
    positions: np.ndarray  # int32 [B, T]  0..len-1 on real tokens, 0 on padding


def prompt_batch(tok: Tokenizer, prompts: Sequence[str], seq_len: int) -> PromptBatch:
    """Encode `[bos] prompt "\\n"` per row, LEFT-padded with pad to `seq_len` columns."""
    b = len(prompts)
    tokens = np.full((b, seq_len), tok.pad_id, np.int32)
    segment_ids = np.zeros((b, seq_len), np.int32)
    positions = np.zeros((b, seq_len), np.int32)
    lengths = np.zeros((b,), np.int32)
    for i, prompt in enumerate(prompts):
        try:
            ids = bos_prefix(tok) + tok.encode(prompt + SEPARATOR)
        except ValueError as e:
            raise ValueError(f"prompt {i} ({prompt[:60]!r}): {e}") from None
        n = len(ids)
        if n > seq_len:
            raise ValueError(
                f"prompt {i} ({prompt[:60]!r}) needs {n} tokens but seq_len={seq_len}; "
                "raise seq_len or shorten the prompt."
            )
        tokens[i, seq_len - n:] = ids
        segment_ids[i, seq_len - n:] = 1
        positions[i, seq_len - n:] = np.arange(n, dtype=np.int32)
        lengths[i] = n
    return PromptBatch(tokens, lengths, segment_ids, positions)
