"""Hugging Face tokenizer directories (`tokenizer.json` + `tokenizer_config.json`) as a `Tokenizer`.

`HFTokenizer.from_dir(path)` builds the `tokenizers` pipeline from `tokenizer.json` and applies the
settings transformers (v5) reads from the side files, so `encode(text, add_special_tokens=...)`
gives the ids `transformers.AutoTokenizer.from_pretrained(path)(text, add_special_tokens=...)`
gives for the same files:

- special tokens (`bos/eos/unk/pad/sep/cls/mask_token`, `additional_special_tokens` /
  `extra_special_tokens`, model-specific `*_token` keys) as strings or AddedToken dicts, and
  `added_tokens_decoder`, are added to the tokenizer when `tokenizer.json` lacks them;
- bos/eos insertion comes from the `tokenizer.json` post-processor. transformers v5 ignores
  `add_bos_token`/`add_eos_token` when a `tokenizer.json` exists (it pops them), and so do we,
  with a warning when they disagree with the post-processor;
- `tokenizer_class: LlamaTokenizer` on a non-byte-level file rebuilds the Metaspace pipeline the
  way transformers' `LlamaTokenizer` does (`add_prefix_space`, `legacy`);
- the chat template comes from `chat_template.jinja`, `additional_chat_templates/*.jinja` or the
  config's `chat_template` (a string, or a list of named templates; "default" is used);
- eos ids are gathered from the config, `special_tokens_map.json` and `generation_config.json`
  (or `config.json`), where eos may be a list.

Nothing here imports transformers: it is only the reference the tests compare against.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Optional, Sequence

from tokenizers import AddedToken, Tokenizer as _BackendTokenizer
from tokenizers import decoders, pre_tokenizers

__all__ = ["HFTokenizer", "SPECIAL_TOKEN_KEYS"]

log = logging.getLogger(__name__)

# The named special tokens transformers knows (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _content(value: Any, where: str) -> Optional[str]:
    """A special-token value (a string, an AddedToken dict, or None) -> its string."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or an AddedToken dict with 'content', "
                     f"got {value!r}")


def _added_token(value: Any, where: str, *, special: bool) -> AddedToken:
    """A config token (string or AddedToken dict) -> tokenizers.AddedToken.

    Plain strings become `AddedToken(s, special=True, normalized=False)` as transformers'
    `_post_init` makes them.
    """
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=not special)
    content = _content(value, where)
    kwargs = {k: bool(value[k]) for k in _ADDED_TOKEN_FIELDS if k in value}
    if special:
        kwargs["special"] = True
    return AddedToken(content, **kwargs)


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return []


class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat templates of an HF directory.

    Implements the `ftjax.data.tokenizer.Tokenizer` protocol. `bos_id` is None for tokenizers
    without a bos token (Qwen); `pad_id` falls back to `eos_id` when there is no pad token.
    """

    def __init__(self, backend: _BackendTokenizer, *, special_tokens: dict[str, str],
                 extra_special_tokens: Sequence[str] = (), extra_eos_ids: Sequence[int] = (),
                 chat_templates: Optional[dict[str, str]] = None,
                 model_max_length: Optional[int] = None, clean_up_tokenization_spaces: bool = False,
                 name_or_path: str = ""):
        self.backend = backend
        self.name_or_path = name_or_path
        self._special = {k: v for k, v in special_tokens.items() if v is not None}
        self.extra_special_tokens = tuple(extra_special_tokens)
        self.chat_templates = dict(chat_templates or {})
        self.model_max_length = model_max_length
        # transformers skips this clean-up for BPE models (it would corrupt their output).
        self.clean_up_tokenization_spaces = (
            bool(clean_up_tokenization_spaces) and type(backend.model).__name__ != "BPE")
        for key, tok in self._special.items():
            if backend.token_to_id(tok) is None:
                raise ValueError(f"{name_or_path or 'tokenizer'}: {key} {tok!r} is not in the "
                                 "vocabulary")
        eos = [] if self.eos_id is None else [self.eos_id]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos + list(extra_eos_ids)))
        # A copy without post-processor: its offsets are raw character spans of the input (a
        # ByteLevel post-processor would trim whitespace out of them). Ids are identical.
        self._offsets_backend: Optional[_BackendTokenizer] = None

    # ----------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_dir(cls, path: str) -> "HFTokenizer":
        """Loads `path/tokenizer.json` and the side files transformers reads (see module doc)."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            hint = (" (it has a sentencepiece tokenizer.model only: convert it once with "
                    "transformers, `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`, "
                    "which writes tokenizer.json)"
                    if os.path.isfile(os.path.join(path, "tokenizer.model")) else "")
            raise FileNotFoundError(f"no tokenizer.json in {path!r}{hint}")
        with open(tok_file, encoding="utf-8") as f:
            tok_json_text = f.read()
        try:
            backend = _BackendTokenizer.from_str(tok_json_text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tok_file!r} could not be parsed by the tokenizers library: {e}") \
                from e
        # transformers calls the tokenizer without padding/truncation unless asked.
        backend.no_padding()
        backend.no_truncation()

        cfg_file = os.path.join(path, "tokenizer_config.json")
        config = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
        where = cfg_file if config else tok_file

        # special_tokens_map.json is legacy: transformers reads it only when the config has no
        # added_tokens_decoder, and then it overrides the config's entries.
        stm_file = os.path.join(path, "special_tokens_map.json")
        stm = _read_json(stm_file) if os.path.isfile(stm_file) else {}
        if stm and "added_tokens_decoder" not in config:
            config = {**config, **stm}

        if (config.get("tokenizer_class") or "").removesuffix("Fast") == "LlamaTokenizer" \
                and '"ByteLevel"' not in tok_json_text and "auto_map" not in config:
            _llama_pipeline(backend, config)

        special, extra, to_add = _collect_special_tokens(config, where)
        # Tokens from added_tokens_decoder (with their flags) and special tokens missing from
        # tokenizer.json are added, as transformers does on load. Existing ones are kept as-is.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for token in to_add:
            if token.content in present:
                continue
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
            present.add(token.content)
        if config.get("split_special_tokens"):
            backend.encode_special_tokens = True

        _check_bos_eos_flags(backend, config, special, where)

        extra_eos: list[int] = []
        stm_eos = _content(stm.get("eos_token"), stm_file) if stm else None
        if stm_eos is not None and backend.token_to_id(stm_eos) is not None:
            extra_eos.append(backend.token_to_id(stm_eos))
        gen_file = os.path.join(path, "generation_config.json")
        model_cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(gen_file):
            extra_eos += _eos_list(_read_json(gen_file).get("eos_token_id"))
        elif os.path.isfile(model_cfg_file):
            extra_eos += _eos_list(_read_json(model_cfg_file).get("eos_token_id"))

        max_len = config.get("model_max_length")
        # transformers writes 1e30 ("VERY_LARGE_INTEGER") when a model has no limit.
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e18 else None
        return cls(backend, special_tokens=special, extra_special_tokens=extra,
                   extra_eos_ids=extra_eos, chat_templates=_read_chat_templates(path, config),
                   model_max_length=max_len,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces",
                                                                False)),
                   name_or_path=path)

    # ----------------------------------------------------------------------------------------
    # Special tokens

    def _id(self, key: str) -> Optional[int]:
        tok = self._special.get(key)
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token(self) -> Optional[str]:
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> Optional[str]:
        return self._special.get("eos_token")

    @property
    def pad_token(self) -> Optional[str]:
        return self._special.get("pad_token")

    @property
    def unk_token(self) -> Optional[str]:
        return self._special.get("unk_token")

    @property
    def bos_id(self) -> Optional[int]:  # type: ignore[override]
        return self._id("bos_token")

    @property
    def eos_id(self) -> Optional[int]:  # type: ignore[override]
        return self._id("eos_token")

    @property
    def unk_id(self) -> Optional[int]:
        return self._id("unk_token")

    @property
    def pad_id(self) -> int:  # type: ignore[override]
        """The pad token's id, else eos's (padding is always masked out, so any id works)."""
        pad = self._id("pad_token")
        if pad is not None:
            return pad
        if self.eos_id is not None:
            return self.eos_id
        raise ValueError(f"{self.name_or_path or 'tokenizer'} has neither a pad nor an eos token; "
                         "set pad_token in tokenizer_config.json")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens -> strings (what chat templates see as `bos_token` etc.)."""
        return dict(self._special)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(list(self._special.values()) + list(self.extra_special_tokens)))

    @property
    def added_tokens(self) -> dict[int, AddedToken]:
        """Id -> AddedToken for every added token (special or not)."""
        return dict(self.backend.get_added_tokens_decoder())

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        """Rows an embedding table needs: the largest id (base vocab or added token) plus one.

        (transformers' `vocab_size` counts only the base vocabulary; this is `len(tokenizer)`
        when ids are contiguous.)
        """
        added = self.backend.get_added_tokens_decoder()
        return max([self.backend.get_vocab_size(with_added_tokens=False) - 1, *added]) + 1

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        return self.backend.id_to_token(int(idx))

    # ----------------------------------------------------------------------------------------
    # Chat templates

    @property
    def chat_template(self) -> Optional[str]:
        """The default chat template: the only one, or the one named "default"; else None."""
        return self.get_chat_template(None, missing_ok=True)

    def get_chat_template(self, name: Optional[str] = None, *, tools: Any = None,
                          missing_ok: bool = False) -> Optional[str]:
        """The template called `name`; with no name, "tool_use" when tools are given, then
        "default" (or the only template). Unknown names raise; no template -> None."""
        templates = self.chat_templates
        if name is not None:
            if name not in templates:
                raise KeyError(f"{self.name_or_path or 'tokenizer'} has no chat template named "
                               f"{name!r}; it has {sorted(templates)}")
            return templates[name]
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        if len(templates) == 1:
            return next(iter(templates.values()))
        if templates and not missing_ok:
            raise ValueError(f"{self.name_or_path or 'tokenizer'} has several chat templates "
                             f"{sorted(templates)} and none is called 'default'; pass a name")
        return None

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids; with `add_special_tokens` the post-processor adds bos/eos as configured."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) \
            -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts),
                                                         add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (no special tokens added) and each token's (start, end) character span in `text`."""
        if self._offsets_backend is None:
            self._offsets_backend = _BackendTokenizer.from_str(self.backend.to_str())
            self._offsets_backend.post_processor = None
            self._offsets_backend.no_padding()
            self._offsets_backend.no_truncation()
        enc = self._offsets_backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True, *,
               skip_special_tokens: bool = True) -> str:
        """Ids -> text. Stops at the first of `eos_ids` when `stop_at_eos` (protocol default);
        `skip_special_tokens` drops special tokens as transformers' `decode` does."""
        ids = [int(i) for i in ids]
        if stop_at_eos and self.eos_ids:
            stops = set(self.eos_ids)
            for n, i in enumerate(ids):
                if i in stops:
                    ids = ids[:n]
                    break
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r}, eos_ids={self.eos_ids}, "
                f"pad={self.pad_token!r}, chat_templates={sorted(self.chat_templates)})")


# --------------------------------------------------------------------------------------------
# Helpers for from_dir


def _collect_special_tokens(config: dict, where: str) \
        -> tuple[dict[str, Optional[str]], list[str], list[AddedToken]]:
    """(named special token strings, extra special token strings, AddedTokens to ensure)."""
    to_add: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ValueError(f"{where}: added_tokens_decoder must map ids to AddedToken dicts")
    by_id = []
    for idx, tok in decoder.items():
        try:
            by_id.append((int(idx), tok))
        except ValueError as e:
            raise ValueError(f"{where}: added_tokens_decoder key {idx!r} is not an id") from e
    for _, tok in sorted(by_id, key=lambda kv: kv[0]):
        if not isinstance(tok, dict) or "content" not in tok:
            raise ValueError(f"{where}: added_tokens_decoder entries must be AddedToken dicts, "
                             f"got {tok!r}")
        to_add.append(_added_token(tok, where, special=False))

    special: dict[str, Optional[str]] = {}
    for key, value in config.items():
        named = key in SPECIAL_TOKEN_KEYS
        model_specific = (key.endswith("_token") and not named
                          and isinstance(value, (str, dict)) and key != "chat_template")
        if not (named or model_specific):
            continue
        if isinstance(value, dict) and "content" not in value:
            continue
        special[key] = _content(value, f"{where}: {key}")
        if special[key] is not None:
            to_add.append(_added_token(value, f"{where}: {key}", special=True))

    extra_cfg = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra: list[str] = []
    if isinstance(extra_cfg, dict):  # named extra tokens behave like model-specific *_token keys
        for key, value in extra_cfg.items():
            special[key] = _content(value, f"{where}: extra_special_tokens.{key}")
            to_add.append(_added_token(value, where, special=True))
    else:
        for value in extra_cfg:
            extra.append(_content(value, f"{where}: additional_special_tokens"))
            to_add.append(_added_token(value, where, special=True))
    return special, extra, to_add


def _llama_pipeline(backend: _BackendTokenizer, config: dict) -> None:
    """What transformers v5's LlamaTokenizer does to a sentencepiece-style BPE file: no
    normalizer, a Metaspace pre-tokenizer ('first' unless `legacy`), a byte-fallback decoder."""
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    if add_prefix_space:
        scheme = "always" if config.get("legacy", False) else "first"
    else:
        scheme = "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme,
                                                     split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _check_bos_eos_flags(backend: _BackendTokenizer, config: dict, special: dict,
                         where: str) -> None:
    """Warns when add_bos_token/add_eos_token disagree with what the post-processor does.

    transformers v5 drops those flags when tokenizer.json exists (the post-processor decides);
    a mismatch usually means a hand-edited config, and silently differing from transformers
    would be worse than following it.
    """
    probe = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    for flag, key, has in (("add_bos_token", "bos_token", lambda t: probe[:1] == [t]),
                           ("add_eos_token", "eos_token", lambda t: probe[-1:] == [t])):
        if flag not in config or special.get(key) is None:
            continue
        tid = backend.token_to_id(special[key])
        adds = len(probe) > len(plain) and has(tid)
        if bool(config[flag]) != adds:
            log.warning("%s: %s=%s but tokenizer.json's post-processor %s %s; following the "
                        "post-processor, as transformers v5 does", where, flag, config[flag],
                        "adds" if adds else "does not add", special[key])


def _read_chat_templates(path: str, config: dict) -> dict[str, str]:
    """Templates from chat_template.jinja / additional_chat_templates/ (these win) or config."""
    templates: dict[str, str] = {}
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    templates[name[:-len(".jinja")]] = f.read()
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t
                                       for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{os.path.join(path, 'tokenizer_config.json')}: chat_template must be a "
                     "string or a list of {'name', 'template'} dicts")


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (for WordPiece/Unigram models that ask for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
