"""Chat templates: conversations -> text -> ids, rendered exactly as transformers renders them.

A conversation is a list of `{"role": ..., "content": ...}` dicts. `render_chat` runs the
tokenizer's Jinja chat template in the environment transformers builds (sandboxed,
`trim_blocks`/`lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, transformers'
`tojson`, `dict`, `namespace`, and the `{% generation %}` tag) with `messages`,
`add_generation_prompt`, `tools`, `documents` and the named special tokens (`bos_token`,
`eos_token`, ...). `apply_chat_template` tokenizes the result WITHOUT adding special tokens
again (templates write bos themselves), as transformers does.

`chat_token_mask` returns the ids and an assistant-only loss mask: 1 on the tokens of each
assistant message's content and its end-of-turn token, 0 on everything else (system and user
turns, role headers, the generation prompt). Templates with `{% generation %}` blocks get
transformers' spans; otherwise each assistant turn is located by rendering conversation prefixes
(the text before it, with the generation prompt, and the text through it), which is exact for
any template whose rendering of a prefix is a prefix of the full rendering (ChatML, Llama 2/3,
Mistral, Alpaca, ...). For templates that render prefixes differently (Qwen3-style think blocks
on the generation prompt only, reasoning dropped from past turns) each assistant content is
searched in the full text after the previous message instead; the end-of-turn token is the
first control token after the content. A content the template rewrites raises a clear error.

Built-in templates, used when the tokenizer has none (`template=None`; picked by the tokenizer's
tokens: Llama-3 header tokens -> "llama3", `<|im_start|>` -> "chatml", else "alpaca"), or by name:

    chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n ... [<|im_start|>assistant\\n]
    llama3  {bos}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|> ...
            [<|start_header_id|>assistant<|end_header_id|>\\n\\n]  (Meta's Llama 3 template)
    alpaca  {bos}{system, else the Alpaca preamble}\\n\\n
            ### Instruction:\\n{user}\\n\\n  ### Response:\\n{assistant}{eos}\\n\\n ...
            [### Response:\\n]

Tokenizers without string special tokens (`CharTokenizer`) see `bos_token="<bos>"`,
`eos_token="<eos>"`, `pad_token="<pad>"`; those strings in the rendered text become the ids.
"""
from __future__ import annotations

import functools
import json
import re
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "BUILTIN_TEMPLATES", "apply_chat_template", "chat_token_mask", "default_template_name",
    "render_chat", "render_template", "resolve_template", "ChatTemplateError",
]

Message = Mapping[str, Any]

BUILTIN_TEMPLATES: dict[str, str] = {
    # The layout the quickstart base was pretrained on: [bos] user "\n" assistant [eos].
    "plain": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ m['content'] + '\n' }}{% elif m['role'] == 'assistant' %}"
        "{{ m['content'] + eos_token }}{% elif m['role'] == 'system' %}"
        "{{ raise_exception('the plain template has no system turn') }}"
        "{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Meta's Llama 3 (8B Instruct) template, verbatim.
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token if bos_token is defined else '' }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\n\n' }}{% set loop_messages = messages[1:] %}"
        "{% else %}"
        "{{ 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n' }}{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\n' + message['content'] + (eos_token if eos_token is defined else '')"
        " + '\n\n' }}"
        "{% else %}"
        "{{ raise_exception('The alpaca template supports system (first), user and assistant "
        "roles, got ' + message['role']) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}

# Placeholders for tokenizers whose special tokens have ids but no strings (CharTokenizer).
_PLACEHOLDERS = (("bos_token", "<bos>", "bos_id"), ("eos_token", "<eos>", "eos_id"),
                 ("pad_token", "<pad>", "pad_id"))


class ChatTemplateError(ValueError):
    """A chat template failed to render (including `raise_exception` calls in the template)."""


# --------------------------------------------------------------------------------------------
# The Jinja environment (mirrors transformers.utils.chat_template_utils)

_TRACKER: ContextVar = ContextVar("ftjax_chat_generation_tracker", default=None)


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of what it renders."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [],
                                      body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller) -> str:
        rv = caller()
        tracking = _TRACKER.get()
        if tracking is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(rv)))
        return rv


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: Jinja's built-in tojson escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") \
            from e


def _has_generation_tags(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _plain(value: Any) -> Any:
    """Rebuilds template inputs from plain JSON types (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: Sequence[Message]) -> list[dict]:
    """Drops None-valued keys, converts to plain data, aliases reasoning fields (transformers)."""
    if isinstance(messages, Mapping) or isinstance(messages, str):
        raise TypeError("messages must be a list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_template(template: str, messages: Sequence[Message], *,
                    add_generation_prompt: bool = False, tools: Optional[list] = None,
                    documents: Optional[list] = None, spans: Optional[list] = None,
                    **kwargs: Any) -> str:
    """Renders a Jinja chat template as transformers does. Extra `kwargs` (special tokens, ...)
    are template variables. If `spans` is a list, `{% generation %}` spans are appended to it."""
    if tools is not None:
        if not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON-schema dicts (callables are not converted here; "
                            "use transformers.utils.get_json_schema)")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
    compiled = _compile(template)
    variables = dict(messages=_normalize_messages(messages), tools=_plain(tools),
                     documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                     **_plain(kwargs))
    try:
        if spans is None:
            return compiled.render(**variables)
        blocks: list[str] = []
        token = _TRACKER.set((blocks, spans))
        try:
            for block in compiled.generate(**variables):
                blocks.append(block)
        finally:
            _TRACKER.reset(token)
        return "".join(blocks)
    except jinja2.exceptions.TemplateError as e:
        if isinstance(e, jinja2.exceptions.SecurityError):
            raise
        raise ChatTemplateError(f"chat template error: {e}") from e


# --------------------------------------------------------------------------------------------
# Tokenizer glue (works with HFTokenizer and with plain `Tokenizer`s such as CharTokenizer)


def _is_hf(tok: Any) -> bool:
    return hasattr(tok, "backend") and hasattr(tok, "encode_with_offsets")


def _special_strings(tok: Any) -> dict[str, str]:
    """Template variables for the special tokens (`bos_token`, `eos_token`, ...)."""
    if hasattr(tok, "special_tokens_map"):
        return dict(tok.special_tokens_map)
    out = {}
    for key, text, attr in _PLACEHOLDERS:
        if getattr(tok, attr, None) is not None:
            out[key] = text
    return out


def _placeholder_ids(tok: Any) -> dict[str, int]:
    return {text: int(getattr(tok, attr)) for _, text, attr in _PLACEHOLDERS
            if getattr(tok, attr, None) is not None}


def _token_strings(tok: Any) -> list[str]:
    """Strings the tokenizer turns into single control tokens (for end-of-turn detection)."""
    if _is_hf(tok):
        return [t.content for t in tok.added_tokens.values() if t.content.strip()]
    return list(_placeholder_ids(tok))


def default_template_name(tok: Any) -> str:
    """The built-in template that fits a tokenizer's special tokens (see module docstring)."""
    has = (lambda s: tok.token_to_id(s) is not None) if hasattr(tok, "token_to_id") \
        else (lambda s: False)
    if has("<|start_header_id|>") and has("<|end_header_id|>") and has("<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>") and has("<|im_end|>"):
        return "chatml"
    return "alpaca"


def resolve_template(tok: Any, template: Optional[str] = None, *, tools: Any = None) -> str:
    """The Jinja source to use: a template name of the tokenizer, a built-in name, raw Jinja,
    or (None) the tokenizer's default template, else the fitting built-in."""
    if template is None:
        own = tok.get_chat_template(None, tools=tools, missing_ok=False) \
            if hasattr(tok, "get_chat_template") else None
        return own if own is not None else BUILTIN_TEMPLATES[default_template_name(tok)]
    if getattr(tok, "chat_templates", None) and template in tok.chat_templates:
        return tok.chat_templates[template]
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise KeyError(f"unknown chat template {template!r}: not a template of the tokenizer "
                   f"({sorted(getattr(tok, 'chat_templates', {}) or {})}), not a built-in "
                   f"({sorted(BUILTIN_TEMPLATES)}), and not Jinja source")


def render_chat(tok: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                template: Optional[str] = None, tools: Optional[list] = None,
                documents: Optional[list] = None, **kwargs: Any) -> str:
    """The conversation as text, through the tokenizer's (or a named/built-in) chat template."""
    if not messages:
        raise ValueError("cannot render an empty conversation; give at least one message")
    source = resolve_template(tok, template, tools=tools)
    variables = {**_special_strings(tok), **kwargs}
    return render_template(source, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools, documents=documents, **variables)


def _encode_pieces(tok: Any, text: str, cuts: Sequence[int] = ()) \
        -> tuple[list[int], list[tuple[int, int]]]:
    """Generic tokenizers: split `text` at placeholder strings and at `cuts`, encode each piece
    on its own; every token gets its piece's span (exact per token for character tokenizers)."""
    specials = _placeholder_ids(tok)
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    bounds = sorted({0, len(text), *[c for c in cuts if 0 < c < len(text)]})
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []

    def add_text(lo: int, hi: int) -> None:
        for a, b in zip(bounds, bounds[1:]):
            a, b = max(a, lo), min(b, hi)
            if a >= b:
                continue
            piece = tok.encode(text[a:b])
            if len(piece) == b - a:  # one token per character
                offsets.extend((a + k, a + k + 1) for k in range(len(piece)))
            else:
                offsets.extend((a, b) for _ in piece)
            ids.extend(piece)

    pos = 0
    if pattern:
        for m in re.finditer(pattern, text):
            add_text(pos, m.start())
            ids.append(specials[m.group(0)])
            offsets.append((m.start(), m.end()))
            pos = m.end()
    add_text(pos, len(text))
    return ids, offsets


def _encode_text(tok: Any, text: str) -> list[int]:
    if _is_hf(tok):
        return tok.encode(text, add_special_tokens=False)
    return _encode_pieces(tok, text)[0]


def apply_chat_template(tok: Any, messages: Sequence[Message], add_generation_prompt: bool = False,
                        tokenize: bool = True, *, template: Optional[str] = None,
                        tools: Optional[list] = None, documents: Optional[list] = None,
                        **kwargs: Any):
    """Renders the conversation; returns ids (no special tokens added on top) or the string."""
    text = render_chat(tok, messages, add_generation_prompt=add_generation_prompt,
                       template=template, tools=tools, documents=documents, **kwargs)
    return _encode_text(tok, text) if tokenize else text


# --------------------------------------------------------------------------------------------
# Assistant-only loss masks


def _find_content(text: str, content: Any, lo: int, hi: int) -> tuple[int, int]:
    """(start, end) of `content` in text[lo:hi], as written or as the template trimmed it
    (`| trim`, `.strip()`); (-1, -1) if absent."""
    if not isinstance(content, str) or not content.strip():
        return -1, -1
    for c in (content, content.strip()):
        at = text.find(c, lo, hi)
        if at >= 0:
            return at, at + len(c)
    return -1, -1


def _prefix_spans(tok: Any, source: str, messages: list[dict], full: str, variables: dict) \
        -> list[tuple[int, int]]:
    """Character spans of each assistant turn's content plus its end-of-turn token.

    Each turn is located between the renderings of the conversation before it (with the
    generation prompt) and through it. If the template renders those prefixes differently from
    the full conversation (e.g. it drops reasoning from past turns, or adds a think block only
    to the generation prompt), the content is searched in the full text after the previous turn.
    """
    controls = _token_strings(tok)
    spans: list[tuple[int, int]] = []
    cursor = 0  # end of the last located message
    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") != "assistant":
            a, b = _find_content(full, content, cursor, len(full))
            if a >= 0:
                cursor = b
            continue
        try:
            before = render_template(source, messages[:i], add_generation_prompt=True,
                                     **variables) if i else ""
            through = render_template(source, messages[:i + 1], add_generation_prompt=False,
                                      **variables)
            stable = (full.startswith(through) and through.startswith(before)
                      and len(before) >= cursor)
        except ChatTemplateError:
            stable = False
        lo, hi = (len(before), len(through)) if stable else (cursor, len(full))
        start, content_end = _find_content(full, content, lo, hi)
        if start < 0:
            if not stable:
                raise ChatTemplateError(
                    f"cannot locate assistant message {i} in the rendered conversation: the "
                    "template renders conversation prefixes differently from the whole and "
                    "changes the message's content. Use a template with {% generation %} "
                    "blocks, or a built-in template (chatml, llama3, alpaca)")
            # Content rewritten by the template: the whole turn, minus surrounding whitespace.
            seg = full[lo:hi]
            span = (lo + len(seg) - len(seg.lstrip()), lo + len(seg.rstrip()))
        else:
            # The end-of-turn token: the first control token after the content, in this turn.
            tail = full[content_end:hi]
            hits = [(tail.find(c), -len(c), c) for c in controls if c in tail]
            end = content_end
            if hits:
                at, _, c = min(hits)
                end = content_end + at + len(c)
            span = (start, end)
        spans.append(span)
        cursor = span[1]
    return spans


def chat_token_mask(tok: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                    template: Optional[str] = None, tools: Optional[list] = None,
                    documents: Optional[list] = None, **kwargs: Any) \
        -> tuple[list[int], list[int]]:
    """(ids, mask): the tokenized conversation and 1 on assistant content + end-of-turn tokens.

    A token counts when it overlaps an assistant span (so a token that fuses a header space with
    the first content character counts). For HFTokenizer the ids equal `apply_chat_template`.
    """
    if not messages:
        raise ValueError("cannot mask an empty conversation; give at least one message")
    source = resolve_template(tok, template, tools=tools)
    variables = {**_special_strings(tok), **kwargs, "tools": tools, "documents": documents}
    normalized = _normalize_messages(messages)
    if _has_generation_tags(source):
        spans: list[tuple[int, int]] = []
        full = render_template(source, normalized, add_generation_prompt=add_generation_prompt,
                               spans=spans, **variables)
    else:
        full = render_template(source, normalized, add_generation_prompt=add_generation_prompt,
                               **variables)
        spans = _prefix_spans(tok, source, normalized, full, variables)

    if _is_hf(tok):
        ids, offsets = tok.encode_with_offsets(full)
    else:
        ids, offsets = _encode_pieces(tok, full, [c for s in spans for c in s])
    mask = [0] * len(ids)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0] and b > a:
            mask[t] = 1
    return ids, mask
