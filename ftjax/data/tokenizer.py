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

    def save_pretrained(self, path: str) -> list[str]:
        """Writes this tokenizer as Hugging Face tokenizer files (`tokenizer.json`,
        `tokenizer_config.json`, `special_tokens_map.json`) into the directory `path`.

        `tokenizer.json` is a `tokenizers` WordLevel model over the 99 ids above, a pre-tokenizer
        that splits every character, a decoder that concatenates, and `<pad>`/`<bos>`/`<eos>` as
        special tokens (ids 0/1/2); the post-processor prepends `<bos>` when special tokens are
        added (`tokenizer(text)`), as the synthetic layout starts every sequence with bos.
        `transformers.AutoTokenizer` and `HFTokenizer.from_dir` then encode text without
        special tokens to exactly `encode(text)`; a character outside the set is an error
        there too ("Missing [UNK] token"). Returns the file names written.
        """
        import json
        import os
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend
        specials = {"<pad>": self.pad_id, "<bos>": self.bos_id, "<eos>": self.eos_id}
        vocab = dict(specials)
        vocab.update({chr(c): c - _FIRST_PRINTABLE + _PRINTABLE_OFFSET
                      for c in range(_FIRST_PRINTABLE, _LAST_PRINTABLE + 1)})
        vocab["\n"] = _NEWLINE_ID
        backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))  # <unk>: not in vocab
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in specials])
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", self.bos_id)])
        os.makedirs(path, exist_ok=True)
        backend.save(os.path.join(path, "tokenizer.json"))
        named = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **named,
                  "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids",
                                                                              "attention_mask"],
                  "ftjax_tokenizer": "CharTokenizer"}
        for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", named)):
            with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
