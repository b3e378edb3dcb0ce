"""Tokenizers: the interface the data pipeline relies on, and a fixed character tokenizer.

`CharTokenizer` needs no files and no network, so tests and the quickstart run anywhere. Its
layout is fixed forever (ids are baked into checkpoints):

    id 0        <pad>
    id 1        <bos>
    id 2        <eos>
    ids 3..97   printable ASCII 32..126 (" " .. "~"), id = ord(c) - 29
    id 98       "\\n"
    vocab_size  99

A Hugging Face `tokenizers` wrapper only has to implement the `Tokenizer` protocol below.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

__all__ = ["Tokenizer", "CharTokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What data, eval and inference code may assume about a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without bos/eos."""
        ...

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Ids -> text, dropping special tokens (and everything after eos if `stop_at_eos`)."""
        ...


_FIRST_PRINTABLE = 32  # " "
_LAST_PRINTABLE = 126  # "~"
_PRINTABLE_OFFSET = 3  # id of " "
_NEWLINE_ID = _PRINTABLE_OFFSET + (_LAST_PRINTABLE - _FIRST_PRINTABLE + 1)  # 98


class CharTokenizer:
    """Deterministic character tokenizer over printable ASCII plus newline (vocab 99)."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    newline_id: int = _NEWLINE_ID
    vocab_size: int = _NEWLINE_ID + 1

    def encode(self, text: str) -> list[int]:
        """Map each character to its id; raise ValueError on characters outside the set."""
        ids = []
        for pos, ch in enumerate(text):
            code = ord(ch)
            if _FIRST_PRINTABLE <= code <= _LAST_PRINTABLE:
                ids.append(code - _FIRST_PRINTABLE + _PRINTABLE_OFFSET)
            elif ch == "\n":
                ids.append(_NEWLINE_ID)
            else:
                raise ValueError(
                    f"CharTokenizer cannot encode character {ch!r} (U+{code:04X}) at position "
                    f"{pos} of {text[:60]!r}: only printable ASCII (32..126) and '\\n' are "
                    "supported; clean the text or use a subword tokenizer."
                )
        return ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Map ids back to text, skipping pad/bos (and eos); stop at the first eos if asked."""
        chars = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                if stop_at_eos:
                    break
                continue
            if i in (self.pad_id, self.bos_id):
                continue
            if i == _NEWLINE_ID:
                chars.append("\n")
            elif _PRINTABLE_OFFSET <= i < _NEWLINE_ID:
                chars.append(chr(i - _PRINTABLE_OFFSET + _FIRST_PRINTABLE))
            else:
                raise ValueError(
                    f"CharTokenizer cannot decode id {i}: valid ids are 0..{self.vocab_size - 1}."
                )
        return "".join(chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
