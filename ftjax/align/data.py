"""Preference pairs in memory: built from the synthetic suite, batched in the preference layout.

`synthetic_pairs` turns synthetic examples into (prompt, chosen = the correct answer,
rejected = a corrupted answer). `PreferenceLoader` yields batches of both halves in the causal-LM
batch layout of `ftjax.data.batching` (`chosen_inputs`, ..., `rejected_positions`; row i of
chosen and rejected is one pair), the layout of the data pipeline's preference loader;
resumable like `SyntheticLoader`.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from ftjax.data import SyntheticLoader, make_splits
from ftjax.data.synthetic import DeterministicRng
from ftjax.data.tokenizer import Tokenizer
from ftjax.data.resumable import Resumable

CORRUPTIONS = ("perturb", "truncate", "mismatch")
_CLASSES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _perturb(answer: str, rng: DeterministicRng) -> str:
    """One character replaced by another of its class (digit, lower, upper), so the corrupted
    answer has the chosen one's length and format; other characters are never touched."""
    slots = [i for i, ch in enumerate(answer) if any(ch in c for c in _CLASSES)]
    if not slots:
        raise ValueError(f"answer {answer!r} has no letter or digit to perturb")
    i = rng.choice(slots)
    cls = next(c for c in _CLASSES if answer[i] in c)
    new = rng.choice([ch for ch in cls if ch != answer[i]])
    return answer[:i] + new + answer[i + 1:]


def corrupt(answer: str, kind: str, rng: DeterministicRng, others: Sequence[str] = ()) -> str:
    """A wrong answer for a preference pair (never equal to `answer`).

    perturb: one letter/digit changed within its class; truncate: the answer cut short by 1..n-1
    characters; mismatch: another example's answer (falls back to perturb when all are equal).
    """
    if kind == "perturb":
        return _perturb(answer, rng)
    if kind == "truncate":
        if len(answer) < 2:
            return _perturb(answer, rng)
        return answer[:rng.randint(1, len(answer) - 1)]
    if kind == "mismatch":
        pool = [o for o in others if o != answer]
        return rng.choice(pool) if pool else _perturb(answer, rng)
    raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")


def synthetic_pairs(tasks: Sequence[str], n_per_task: int, seed: int, test_frac: float = 0.2,
                    corruption: str = "perturb") -> tuple[list[dict], list[dict]]:
    """(train, test) preference pairs {"task", "prompt", "chosen", "rejected"} from the synthetic
    suite; the prompts follow `make_splits`, so no test prompt is ever trained on."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"data.corruption={corruption!r}: choose one of {CORRUPTIONS}")
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for task in tasks:
        splits = dict(zip(("train", "test"), make_splits(task, n_per_task, seed, test_frac)))
        for name, examples in splits.items():
            answers = [e["answer"] for e in examples]
            rng = DeterministicRng("preference", task, seed, name, corruption)
            for ex in examples:
                out[name].append({"task": task, "prompt": ex["prompt"], "chosen": ex["answer"],
                                  "rejected": corrupt(ex["answer"], corruption, rng, answers)})
    return out["train"], out["test"]


def check_pairs(pairs: Sequence[Mapping], where: str = "preference data") -> None:
    """Every pair needs prompt, chosen and rejected strings, with chosen != rejected."""
    for i, p in enumerate(pairs):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in p]
        if missing:
            raise ValueError(f"{where}: pair {i} lacks {missing} (has {sorted(p)})")
        if p["chosen"] == p["rejected"]:
            raise ValueError(f"{where}: pair {i} (prompt {str(p['prompt'])[:60]!r}) has identical "
                             "chosen and rejected answers; drop it or fix the data")


class PreferenceLoader(Resumable):
    """Deterministic, resumable batches of preference pairs (see the module doc).

    Built on two `SyntheticLoader`s with the same seed, so the chosen and rejected rows of a
    batch always come from the same pairs; all `SyntheticLoader` options apply.
    ref_logps: optional (chosen [n], rejected [n]) reference log-probs per pair index.
    """

    def __init__(self, pairs: Sequence[Mapping], tok: Tokenizer, batch_size: int, seq_len: int,
                 seed: int, **loader_kw) -> None:
        check_pairs(pairs)
        halves = {h: [{"task": p.get("task", "?"), "prompt": p["prompt"], "answer": p[h]}
                      for p in pairs] for h in ("chosen", "rejected")}
        self.halves = {h: SyntheticLoader(ex, tok, batch_size, seq_len, seed, **loader_kw)
                       for h, ex in halves.items()}
        self.num_examples = len(pairs)

    @property
    def batches_per_epoch(self) -> int:
        return self.halves["chosen"].batches_per_epoch

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at `step` (pure: does not move the iterator)."""
        batch = {}
        for h, ld in self.halves.items():
            batch.update({f"{h}_{k}": v for k, v in ld.batch_at(step).items()})
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = {}
        for h, ld in self.halves.items():
            batch.update({f"{h}_{k}": v for k, v in next(ld).items()})
        return batch

    def get_state(self) -> dict:
        return self.halves["chosen"].get_state()

    def set_state(self, state: Mapping) -> None:
        for ld in self.halves.values():
            ld.set_state(state)
