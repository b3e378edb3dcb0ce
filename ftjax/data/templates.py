"""Canonical examples -> token ids and completion-only loss masks, with counted truncation.

Alignment (what `packing`/batching rely on): every function returns `tokens` int32[n] and
`loss_mask` float32[n] where `loss_mask[i] == 1` iff tokens[i] is a trained *target*: the
prediction of tokens[i] from tokens[:i] is in the loss. So a row is built as
`inputs = tokens[:-1]`, `targets = tokens[1:]`, `loss_mask = loss_mask[1:]`, and
`loss_mask[0]` is always 0 (nothing predicts a document's first token).

What is trained:
  - conversations (`{"messages"}`): each assistant message's content and its end-of-turn token
    (`chat.chat_token_mask`); system/user turns, role headers and the assistant header that
    prompts generation are not. The template is the tokenizer's own chat template when it has
    one, else the built-in that fits its special tokens (alpaca for `CharTokenizer`); `template`
    may name a tokenizer template, a built-in ("alpaca", "chatml", "llama3") or be Jinja.
  - plain text (`{"text"}`): every token after the first; the tokenizer's bos (HF: what its
    post-processor adds) before and eos after, so packed documents are delimited.
  - preference / unpaired: only the completion's assistant turns (assistant turns inside the
    prompt are context, not targets).

Truncation to `max_len` tokens, counted in `counters` ("truncated_examples",
"truncated_tokens"; "no_targets" counts examples left with nothing to train, which the caller
should drop and report). The sequence is split into the prompt (everything before the last
assistant turn's content; for preference/unpaired before the completion) and the completion:
  "right"   drop from the end: the completion gives way first, then the prompt
  "left"    drop from the start: the prompt gives way first, then the completion's start
  {"prompt": "left"|"right", "completion": "left"|"right"}   per field: the prompt gives way
            first (cut on its side) but keeps at least min(len(prompt), max_len // 2) tokens
            (a completion without its context teaches little); then the completion is cut on
            its side to fit. Missing keys default to prompt "left", completion "right".
  "error"   raise `DataError` instead of truncating.
A leading bos always survives (it is not counted as prompt). Preference pairs are cut
consistently: the prompt keeps the same tokens in chosen and rejected (the budget is set by
the longer completion). Classification truncates the text only; bos/eos are kept.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, MutableMapping, Optional, Sequence, Union

import numpy as np

from ftjax.data.chat import chat_token_mask
from ftjax.data.errors import DataError

__all__ = ["tokenize_sft", "tokenize_preference", "tokenize_unpaired",
           "tokenize_classification", "encode_document", "TRUNCATION_SIDES"]

TRUNCATION_SIDES = ("left", "right")
Truncation = Union[str, Mapping[str, str]]
Counters = Optional[MutableMapping[str, int]]


# --------------------------------------------------------------------------------------------
# Helpers


def _count(counters: Counters, key: str, n: int = 1) -> None:
    if counters is not None and n:
        counters[key] = counters.get(key, 0) + n


def _where(origin: str) -> str:
    return f"{origin}: " if origin else ""


def _is_hf(tok: Any) -> bool:
    return hasattr(tok, "backend") and hasattr(tok, "encode_with_offsets")


def _encode(tok: Any, text: str, origin: str) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=False) if _is_hf(tok) else tok.encode(text))
    except ValueError as e:
        raise DataError(f"{_where(origin)}{e}") from None


def _special_affixes(tok: Any) -> tuple[list[int], list[int]]:
    """Ids the tokenizer puts around a text: HF -> what its post-processor adds; else [bos]."""
    if _is_hf(tok):
        plain = tok.encode("a", add_special_tokens=False)
        full = tok.encode("a", add_special_tokens=True)
        for at in range(len(full) - len(plain) + 1):
            if full[at:at + len(plain)] == plain:
                return list(full[:at]), list(full[at + len(plain):])
        return [], []
    return ([] if tok.bos_id is None else [int(tok.bos_id)]), []


def _affixes_uncached(tok: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    prefix, suffix = _special_affixes(tok)
    eos = getattr(tok, "eos_id", None)
    tail = [] if eos is None or (suffix and suffix[-1] == eos) else [int(eos)]
    return tuple(prefix), tuple(suffix + tail)


_affixes_cached = functools.lru_cache(maxsize=8)(_affixes_uncached)


def _document_affixes(tok: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(leading ids, trailing ids ending in eos) of a document, found once per tokenizer
    rather than per example (an HF tokenizer encodes a probe text twice to find them)."""
    try:
        return _affixes_cached(tok)
    except TypeError:  # an unhashable duck-typed tokenizer
        return _affixes_uncached(tok)


def encode_document(tok: Any, text: str, *, origin: str = "") -> list[int]:
    """A plain-text document: the tokenizer's leading specials, the text, then eos."""
    prefix, suffix = _document_affixes(tok)
    return [*prefix, *_encode(tok, text, origin), *suffix]


def _check_policy(truncation: Truncation) -> tuple[str, str, str]:
    """-> (mode, prompt side, completion side), mode in {"right", "left", "fields", "error"}."""
    if isinstance(truncation, str):
        if truncation in TRUNCATION_SIDES:
            return truncation, truncation, truncation
        if truncation == "error":
            return "error", "", ""
    elif isinstance(truncation, Mapping):
        unknown = sorted(set(truncation) - {"prompt", "completion"})
        sides = {k: truncation.get(k, d) for k, d in (("prompt", "left"), ("completion", "right"))}
        bad = {k: v for k, v in sides.items() if v not in TRUNCATION_SIDES}
        if not unknown and not bad:
            return "fields", sides["prompt"], sides["completion"]
    raise DataError(f"truncation={truncation!r}; use 'right', 'left', 'error', or a per-field "
                    "dict such as {'prompt': 'left', 'completion': 'right'}")


def _check_max_len(max_len: Any) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
        raise DataError(f"max_len={max_len!r}; it must be an integer >= 2 (tokens per example)")
    return int(max_len)


def _cut(x: list, keep: int, side: str) -> list:
    """Keep `keep` items of x, dropping from `side`."""
    if keep >= len(x):
        return x
    return x[:keep] if side == "right" else x[len(x) - keep:]


def _fit(sides: Sequence[tuple[list, list, list, list]], bos: Optional[int], max_len: int,
         truncation: Truncation, origin: str, counters: Counters) -> list[tuple[list, list]]:
    """Truncates one or more (prompt ids, prompt mask, completion ids, completion mask) that
    share a prompt, consistently; returns (tokens, mask) per side and counts what was cut."""
    mode, p_side, c_side = _check_policy(truncation)
    total = max(len(p) + len(c) for p, _, c, _ in sides)
    if total <= max_len:
        return [(p + c, pm + cm) for p, pm, c, cm in sides]
    if mode == "error":
        raise DataError(f"{_where(origin)}example has {total} tokens, more than max_len="
                        f"{max_len} (truncation='error'); raise max_len, shorten the example, "
                        "or set truncation to 'left', 'right' or a per-field dict")
    out, dropped = [], 0
    l_ref = max(len(c) for _, _, c, _ in sides)
    for p, pm, c, cm in sides:
        head, head_m = [], []
        if bos is not None and p and p[0] == bos:
            head, head_m, p, pm = p[:1], pm[:1], p[1:], pm[1:]
        elif bos is not None and not p and c and c[0] == bos:
            head, head_m, c, cm = c[:1], cm[:1], c[1:], cm[1:]
        budget = max_len - len(head)
        n_p, n_c = len(p), len(c)
        if mode == "right":
            p_keep = min(n_p, budget)
        elif mode == "left":
            p_keep = min(n_p, max(budget - l_ref, 0))
        else:
            p_keep = min(n_p, max(budget - l_ref, min(n_p, budget // 2)))
        c_keep = min(n_c, budget - p_keep)
        tokens = head + _cut(p, p_keep, p_side) + _cut(c, c_keep, c_side)
        mask = head_m + _cut(pm, p_keep, p_side) + _cut(cm, c_keep, c_side)
        dropped += n_p + n_c - p_keep - c_keep
        out.append((tokens, mask))
    _count(counters, "truncated_examples")
    _count(counters, "truncated_tokens", dropped)
    return out


def _runs(mask: Sequence[int]) -> list[int]:
    """Start indices of the runs of 1s in a mask."""
    return [i for i, v in enumerate(mask) if v and (i == 0 or not mask[i - 1])]


def _conversation(tok: Any, messages: Sequence[Mapping], template: Optional[str],
                  origin: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{_where(origin)}'messages' must be a non-empty list of messages, got "
                        f"{type(messages).__name__}")
    try:
        ids, mask = chat_token_mask(tok, messages, template=template)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise DataError(f"{_where(origin)}cannot apply the chat template: {msg}") from None
    return [int(i) for i in ids], [int(m) for m in mask]


def _split_at_completion(tok: Any, prompt: Sequence[Mapping], completion: Sequence[Mapping],
                         template: Optional[str], origin: str) -> tuple[list, list, list, list]:
    """prompt + completion rendered; assistant turns of the prompt untrained; split where the
    completion's first assistant content starts."""
    ids, mask = _conversation(tok, list(prompt) + list(completion), template, origin)
    runs = _runs(mask)
    n_prompt = sum(m.get("role") == "assistant" for m in prompt)
    n_all = n_prompt + sum(m.get("role") == "assistant" for m in completion)
    if len(runs) != n_all:
        raise DataError(f"{_where(origin)}the chat template's assistant spans ({len(runs)}) do "
                        f"not match the assistant messages ({n_all}); cannot tell prompt from "
                        "completion. Use a built-in template (chatml, llama3, alpaca)")
    s = runs[n_prompt]
    prompt_mask = [0] * s
    return ids[:s], prompt_mask, ids[s:], mask[s:]


def _finish(tokens: list, mask: list, counters: Counters) -> dict[str, np.ndarray]:
    mask = list(mask)
    if mask:
        mask[0] = 0
    if not any(mask):
        _count(counters, "no_targets")
    return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.float32)}


# --------------------------------------------------------------------------------------------
# Public


def tokenize_sft(ex: Mapping[str, Any], tok: Any, *, template: Optional[str] = None,
                 max_len: int, truncation: Truncation = "right", counters: Counters = None,
                 origin: str = "") -> dict[str, np.ndarray]:
    """A canonical sft (`{"messages"}`) or text (`{"text"}`) example -> `{"tokens",
    "loss_mask"}` (alignment and truncation in the module docstring)."""
    max_len = _check_max_len(max_len)
    bos = getattr(tok, "bos_id", None)
    if "messages" in ex:
        ids, mask = _conversation(tok, ex["messages"], template, origin)
        runs = _runs(mask)
        s = runs[-1] if runs else len(ids)
        sides = [(ids[:s], mask[:s], ids[s:], mask[s:])]
    elif "text" in ex:
        if not isinstance(ex["text"], str):
            raise DataError(f"{_where(origin)}'text' must be a string, got "
                            f"{type(ex['text']).__name__}")
        ids = encode_document(tok, ex["text"], origin=origin)
        sides = [([], [], ids, [1] * len(ids))]
    else:
        raise DataError(f"{_where(origin)}tokenize_sft needs a canonical sft example "
                        f"({{'messages': [...]}}) or text ({{'text': ...}}); got fields "
                        f"{sorted(ex)}. Convert records with formats.to_canonical first")
    (tokens, mask), = _fit(sides, bos, max_len, truncation, origin, counters)
    return _finish(tokens, mask, counters)


def tokenize_preference(ex: Mapping[str, Any], tok: Any, *, template: Optional[str] = None,
                        max_len: int, truncation: Truncation = "right",
                        counters: Counters = None, origin: str = "") \
        -> dict[str, dict[str, np.ndarray]]:
    """`{"prompt", "chosen", "rejected"}` -> `{"chosen": {...}, "rejected": {...}}`, each
    `{"tokens", "loss_mask"}` over the shared prompt + that completion (completion trained)."""
    max_len = _check_max_len(max_len)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in ex]
    if missing:
        raise DataError(f"{_where(origin)}tokenize_preference needs canonical preference "
                        f"examples; missing {missing} (fields: {sorted(ex)})")
    sides = [_split_at_completion(tok, ex["prompt"], ex[k], template, origin)
             for k in ("chosen", "rejected")]
    fitted = _fit(sides, getattr(tok, "bos_id", None), max_len, truncation, origin, counters)
    out = {}
    no_targets = 0
    for key, (tokens, mask) in zip(("chosen", "rejected"), fitted):
        out[key] = _finish(tokens, mask, None)
        no_targets |= not out[key]["loss_mask"].any()
    _count(counters, "no_targets", int(no_targets))
    return out


def tokenize_unpaired(ex: Mapping[str, Any], tok: Any, *, template: Optional[str] = None,
                      max_len: int, truncation: Truncation = "right",
                      counters: Counters = None, origin: str = "") -> dict[str, Any]:
    """`{"prompt", "completion", "label"}` -> `{"tokens", "loss_mask", "label": bool}` with
    only the completion trained (KTO-style unpaired preference)."""
    max_len = _check_max_len(max_len)
    missing = [k for k in ("prompt", "completion", "label") if k not in ex]
    if missing:
        raise DataError(f"{_where(origin)}tokenize_unpaired needs canonical unpaired examples; "
                        f"missing {missing} (fields: {sorted(ex)})")
    sides = [_split_at_completion(tok, ex["prompt"], ex["completion"], template, origin)]
    (tokens, mask), = _fit(sides, getattr(tok, "bos_id", None), max_len, truncation, origin,
                           counters)
    return {**_finish(tokens, mask, counters), "label": bool(ex["label"])}


def tokenize_classification(ex: Mapping[str, Any], tok: Any, label_to_id: Mapping[str, int],
                            max_len: int, *, truncation: str = "right",
                            counters: Counters = None, origin: str = "") -> dict[str, Any]:
    """`{"text", "label"}` -> `{"tokens": int32[n], "label": int}`: the tokenizer's leading
    specials, the text (truncated on `truncation`'s side), eos; the classifier reads the last
    token."""
    max_len = _check_max_len(max_len)
    if truncation not in TRUNCATION_SIDES + ("error",):
        raise DataError(f"classification truncation={truncation!r}; use 'right', 'left' or "
                        "'error' (it applies to the text)")
    if "text" not in ex or "label" not in ex:
        raise DataError(f"{_where(origin)}tokenize_classification needs {{'text', 'label'}}; "
                        f"got fields {sorted(ex)}")
    label = ex["label"]
    if label not in label_to_id:
        raise DataError(f"{_where(origin)}label {label!r} is not among the classes "
                        f"{sorted(label_to_id)}; add it to the class list or fix the record")
    prefix, suffix = (list(a) for a in _document_affixes(tok))
    text = _encode(tok, ex["text"], origin)
    room = max_len - len(prefix) - len(suffix)
    if room < 1:
        raise DataError(f"max_len={max_len} leaves no room for text after the special tokens "
                        f"({len(prefix) + len(suffix)}); raise max_len")
    if len(text) > room:
        if truncation == "error":
            raise DataError(f"{_where(origin)}text has {len(text)} tokens, more than the "
                            f"{room} that fit in max_len={max_len}; raise max_len or set "
                            "truncation to 'left'/'right'")
        _count(counters, "truncated_examples")
        _count(counters, "truncated_tokens", len(text) - room)
        text = _cut(text, room, truncation)
    return {"tokens": np.asarray(prefix + text + suffix, np.int32),
            "label": int(label_to_id[label])}
