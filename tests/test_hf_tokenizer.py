"""HFTokenizer and chat templates match transformers on locally built tokenizers; generate script.

Three tokenizer directories are built here with the `tokenizers` library (no hub access):
  llama3  byte-level BPE, Llama-3 regex and special tokens, Meta's Llama 3.1 chat template,
          generation_config.json with two eos ids;
  chatml  byte-level BPE with Qwen2's pipeline (NFC, Qwen regex), `tokenizer_class:
          Qwen2Tokenizer`, a Qwen2.5-style ChatML template with tools;
  llama2  sentencepiece-style BPE (byte fallback) saved in the legacy Llama-2 layout, with
          `tokenizer_class: LlamaTokenizer`, `add_bos_token`, and the Llama-2 `[INST]` template.
transformers (v5) is the reference for every id, string and mask.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from ftjax.data.chat import (BUILTIN_TEMPLATES, ChatTemplateError, apply_chat_template,
                             chat_token_mask, default_template_name, render_chat)
from ftjax.data.hf_tokenizer import HFTokenizer
from ftjax.data.tokenizer import CharTokenizer, Tokenizer as TokenizerProtocol

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Templates (verbatim structure of the real ones)

LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# ---------------------------------------------------------------------------------------------
# Building tokenizers

WORDS = ("the quick brown fox jumps over a lazy dog hello world assistant user system helpful "
         "answer question math two plus three equals five café naïve résumé 東京 日本語 "
         "emoji 🙂 don't it's we're I'll tokenization 1234 567 (x) [y] {z} = + - * / . , ! ? "
         "Paris capital France sure here is").split()

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        if rng.random() < 0.3:
            s = s.capitalize() + "."
        if rng.random() < 0.2:
            s += "\n\n  " + rng.choice(WORDS)
        lines.append(s)
    return lines


def _byte_level(regex: str, specials: list[str], normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _write(d, tok: Tokenizer, config: dict, **extra_files) -> str:
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    for name, data in extra_files.items():
        with open(os.path.join(d, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
    return str(d)


def build_llama3(d, chat_template=LLAMA31_TEMPLATE) -> str:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level(LLAMA3_REGEX, specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    decoder = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                         "rstrip": False, "single_word": False, "special": True}
               for s in specials}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "added_tokens_decoder": decoder}
    if chat_template is not None:
        config["chat_template"] = chat_template
    gen = {"bos_token_id": bos, "eos_token_id": [tok.token_to_id("<|end_of_text|>"),
                                                 tok.token_to_id("<|eot_id|>")]}
    return _write(d, tok, config, generation_config=gen)


def build_chatml(d) -> str:
    tok = _byte_level(QWEN_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      normalizer=normalizers.NFC())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
              "errors": "replace", "split_special_tokens": False, "model_max_length": 32768,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "chat_template": QWEN25_TEMPLATE}
    return _write(d, tok, config)


def build_llama2(d) -> str:
    """Legacy Llama-2 layout: the normalizer prepends and replaces spaces; transformers'
    LlamaTokenizer (legacy=False) swaps that for a Metaspace pre-tokenizer."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=500, show_progress=False))
    trained = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False, "special": True}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "bos_token": bos, "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": None, "clean_up_tokenization_spaces": False,
              "chat_template": LLAMA2_TEMPLATE}
    return _write(d, tok, config, special_tokens_map={"bos_token": "<s>", "eos_token": "</s>",
                                                      "unk_token": "<unk>"})


BUILDERS = {"llama3": build_llama3, "chatml": build_chatml, "llama2": build_llama2}
EOT = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "llama2": "</s>"}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def pairs(tok_dirs):
    """name -> (ours, transformers')."""
    return {name: (HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d))
            for name, d in tok_dirs.items()}


def _hf_ids(out):
    """transformers v5 may return a BatchEncoding from apply_chat_template."""
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "café naïve résumé 東京 日本語 🙂 \u00e9 vs e\u0301",   # NFC-sensitive pair
    "numbers 1234567 and (x) [y] {z} = 42!",
    "special tokens in text: <|eot_id|><|im_start|>user <s>[INST] hi [/INST]</s>",
    "unseen chars: ǅ ∑ 🦀 Ω",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus three?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "  Paris is the capital of France. \n"}],
    [{"role": "user", "content": "café 🙂 日本語"},
     {"role": "assistant", "content": "Sure: here is\n\nthe answer."},
     {"role": "user", "content": "thanks"}],
]


# ---------------------------------------------------------------------------------------------
# Tokenizer parity


@pytest.mark.parametrize("name", list(BUILDERS))
def test_encode_matches_transformers(pairs, name):
    ours, theirs = pairs[name]
    assert isinstance(ours, TokenizerProtocol)
    for text in TEXTS:
        for special in (False, True):
            assert ours.encode(text, add_special_tokens=special) == \
                theirs(text, add_special_tokens=special)["input_ids"], (text, special)
    assert ours.encode("Hello world") == ours.encode("Hello world", add_special_tokens=False)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_special_tokens_match_transformers(pairs, name):
    ours, theirs = pairs[name]
    assert ours.bos_id == theirs.bos_token_id
    assert ours.eos_id == theirs.eos_token_id
    assert ours.unk_id == theirs.unk_token_id
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None
                           else theirs.eos_token_id)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert len(ours) == len(theirs)
    assert ours.vocab_size == max(theirs.get_vocab().values()) + 1
    assert ours.eos_ids[0] == ours.eos_id


def test_eos_ids_and_config_fields(pairs):
    llama3, _ = pairs["llama3"]
    assert llama3.eos_ids == (llama3.token_to_id("<|eot_id|>"),
                              llama3.token_to_id("<|end_of_text|>"))
    assert llama3.model_max_length == 131072
    assert pairs["chatml"][0].bos_id is None
    assert pairs["chatml"][0].model_max_length == 32768
    # decode stops at any eos id, not only the first one
    ids = llama3.encode("Hello world") + [llama3.token_to_id("<|end_of_text|>")] + \
        llama3.encode(" more")
    assert llama3.decode(ids) == "Hello world"
    assert llama3.decode(ids, stop_at_eos=False) == "Hello world more"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_decode_round_trip_and_parity(pairs, name):
    ours, theirs = pairs[name]
    for text in TEXTS:
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, stop_at_eos=False, skip_special_tokens=skip) == \
                theirs.decode(ids, skip_special_tokens=skip), (text, skip)
        if name != "llama2" and "\u0301" not in text:  # byte-level BPE is lossless
            assert ours.decode(ids, stop_at_eos=False, skip_special_tokens=False) == text
    plain = "Hello world, the quick brown fox."
    assert ours.decode(ours.encode(plain)) == plain
    with_specials = ours.encode(plain, add_special_tokens=True)
    assert ours.decode(with_specials) == plain  # bos skipped


def test_config_variants(tmp_path):
    """Named template lists, chat_template.jinja, AddedToken dicts, tokens missing from
    tokenizer.json, and split_special_tokens all load as transformers loads them."""
    d = build_llama3(tmp_path / "variants", chat_template=None)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = [{"name": "default", "template": BUILTIN_TEMPLATES["llama3"]},
                            {"name": "tool_use", "template": LLAMA31_TEMPLATE}]
    cfg["pad_token"] = {"__type": "AddedToken", "content": "<|pad|>", "lstrip": False,
                        "normalized": False, "rstrip": False, "single_word": False,
                        "special": True}
    cfg["added_tokens_decoder"]["9000"] = {"content": "<tool>", "lstrip": False,
                                           "normalized": False, "rstrip": False,
                                           "single_word": False, "special": False}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    ours, theirs = HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == BUILTIN_TEMPLATES["llama3"]
    assert set(ours.chat_templates) == {"default", "tool_use"}
    assert ours.get_chat_template(tools=[{}]) == LLAMA31_TEMPLATE
    text = "a <tool> b <|pad|> c"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.pad_id == theirs.pad_token_id and ours.pad_token == "<|pad|>"
    msgs = CONVERSATIONS[1]
    assert apply_chat_template(ours, msgs) == _hf_ids(theirs.apply_chat_template(msgs))

    with open(os.path.join(d, "chat_template.jinja"), "w") as f:  # the file wins over config
        f.write(BUILTIN_TEMPLATES["chatml"])
    os.remove(os.path.join(d, "generation_config.json"))
    cfg["split_special_tokens"] = True
    del cfg["chat_template"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    ours, theirs = HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == BUILTIN_TEMPLATES["chatml"] == theirs.chat_template
    assert ours.eos_ids == (ours.eos_id,)
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]

    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# Chat templates


@pytest.mark.parametrize("name", list(BUILDERS))
def test_chat_template_matches_transformers(pairs, name):
    ours, theirs = pairs[name]
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            text = apply_chat_template(ours, msgs, add_generation_prompt=gen, tokenize=False)
            assert text == theirs.apply_chat_template(msgs, add_generation_prompt=gen,
                                                      tokenize=False)
            ids = apply_chat_template(ours, msgs, add_generation_prompt=gen)
            assert ids == _hf_ids(theirs.apply_chat_template(msgs, add_generation_prompt=gen,
                                                             tokenize=True)), (msgs, gen)
    if name == "llama3":  # bos is written by the template, never added twice
        ids = apply_chat_template(ours, CONVERSATIONS[0])
        assert ids.count(ours.bos_id) == 1 and ids[0] == ours.bos_id


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_chat_template_tools_match_transformers(pairs, name):
    ours, theirs = pairs[name]
    tools = [{"type": "function", "function": {
        "name": "add", "description": "Adds <two> numbers & more",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                        "b": {"type": "number"}},
                       "required": ["a", "b"]}}}]
    msgs = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "add",
                                                  "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "content": "5"}]
    for gen in (False, True):
        kwargs = dict(tools=tools, add_generation_prompt=gen)
        assert apply_chat_template(ours, msgs, tokenize=False, **kwargs) == \
            theirs.apply_chat_template(msgs, tokenize=False, **kwargs)
        assert apply_chat_template(ours, msgs, **kwargs) == \
            _hf_ids(theirs.apply_chat_template(msgs, **kwargs))


def test_jinja_environment_matches_transformers(pairs):
    """namespace, dict, loop controls, tojson (non-ASCII, HTML characters, indent),
    strftime_now, reasoning aliases, None-valued keys and extra template variables."""
    ours, theirs = pairs["chatml"]
    tpl = ("{% set ns = namespace(n=0) %}{{ strftime_now('%Y') }}|{{ eos_token }}|"
           "{{ bos_token is defined }}|{{ custom }}|"
           "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
           "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{{ dict(a=m.role) | tojson(indent=2) }}"
           "{{ m.reasoning_content if m.reasoning_content is defined else '-' }}"
           "{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}"
           "{{ add_generation_prompt }}")
    msgs = [{"role": "system", "content": "s"},
            {"role": "user", "content": "<b>café</b> & \"q\"", "name": None},
            {"role": "assistant", "content": "x", "thinking": "hmm"},
            {"role": "user", "content": "never shown"}]
    for gen in (False, True):
        got = render_chat(ours, msgs, template=tpl, add_generation_prompt=gen, custom=[1, "a"])
        assert got == theirs.apply_chat_template(msgs, chat_template=tpl, tokenize=False,
                                                 add_generation_prompt=gen, custom=[1, "a"])
    with pytest.raises(Exception, match="underscore"):
        render_chat(ours, msgs, template="{% set ns = namespace(_x=1) %}")


def test_raise_exception_in_template(pairs):
    ours, theirs = pairs["llama2"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        apply_chat_template(ours, bad)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        theirs.apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="alternate"):
        chat_token_mask(ours, [{"role": "assistant", "content": "first"}])


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("name", list(BUILDERS))
def test_assistant_mask_covers_exactly_assistant_turns(pairs, name):
    ours, _ = pairs[name]
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            ids, mask = chat_token_mask(ours, msgs, add_generation_prompt=gen)
            assert ids == apply_chat_template(ours, msgs, add_generation_prompt=gen)
            assert len(mask) == len(ids) and set(mask) <= {0, 1}
            answers = [m["content"] for m in msgs if m["role"] == "assistant"]
            runs = _runs(ids, mask)
            assert len(runs) == len(answers)
            for run, answer in zip(runs, answers):
                got = ours.decode(run, stop_at_eos=False, skip_special_tokens=False)
                if name == "chatml":
                    assert got == answer + "<|im_end|>"
                elif name == "llama3":
                    assert got == answer.strip() + "<|eot_id|>"
                else:  # ' ' + content.strip() + ' ' + eos_token; the decoder strips one space
                    assert got.strip() == answer.strip() + " </s>"
            if gen:  # the generation prompt (if the template has one) is never a target
                n = len(apply_chat_template(ours, msgs, add_generation_prompt=False))
                assert ids[:n] == apply_chat_template(ours, msgs) and not any(mask[n:])
                assert len(ids) > n or name == "llama2"


def test_generation_tag_mask_matches_transformers(pairs):
    """Templates with {% generation %} blocks get transformers' assistant mask."""
    ours, theirs = pairs["chatml"]
    tpl = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
           "{% if message['role'] == 'assistant' %}{% generation %}"
           "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
           "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    for msgs in CONVERSATIONS[1:]:
        ids, mask = chat_token_mask(ours, msgs, template=tpl)
        out = theirs.apply_chat_template(msgs, chat_template=tpl, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        assert mask == list(out["assistant_masks"])
        # ... and the same mask as the prefix method on the equivalent plain template
        assert chat_token_mask(ours, msgs, template="chatml") == (ids, mask)


def test_mask_for_prefix_unstable_template(pairs):
    """A Qwen3-style template (an empty think block on the generation prompt and the last
    assistant turn only) renders prefixes differently; the mask is still exact."""
    ours, _ = pairs["chatml"]
    tpl = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
           "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}"
           "{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}"
           "{% endif %}")
    msgs = CONVERSATIONS[1]
    ids, mask = chat_token_mask(ours, msgs, template=tpl)
    assert ids == apply_chat_template(ours, msgs, template=tpl)
    got = [ours.decode(r, stop_at_eos=False, skip_special_tokens=False) for r in _runs(ids, mask)]
    assert got == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    rewrites = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot locate assistant message"):
        chat_token_mask(ours, [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "y"}],
                        template=rewrites + "{% if add_generation_prompt %}>{% endif %}")


def test_add_bos_flag_follows_post_processor(tmp_path, caplog):
    """transformers v5 ignores add_bos_token when tokenizer.json exists; so do we, loudly."""
    d = build_llama3(tmp_path / "flags", chat_template=None)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["add_bos_token"] = False
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with caplog.at_level("WARNING", logger="ftjax.data.hf_tokenizer"):
        ours = HFTokenizer.from_dir(d)
    assert "add_bos_token=False" in caplog.text
    theirs = transformers.AutoTokenizer.from_pretrained(d)
    assert ours.encode("hi", add_special_tokens=True) == theirs("hi")["input_ids"]
    assert ours.encode("hi", add_special_tokens=True)[0] == ours.bos_id


def test_builtin_templates_render_as_documented(pairs):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    chatml, theirs = pairs["chatml"]
    assert render_chat(chatml, msgs, template="chatml", add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n")
    llama3, theirs3 = pairs["llama3"]
    assert render_chat(llama3, msgs, template="llama3", add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    llama2, _ = pairs["llama2"]
    assert render_chat(llama2, msgs, template="alpaca", add_generation_prompt=True) == (
        "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Response:\n")
    assert render_chat(llama2, msgs[1:], template="alpaca").startswith(
        "<s>Below is an instruction that describes a task.")
    with pytest.raises(ChatTemplateError, match="alpaca template supports"):
        render_chat(llama2, [{"role": "tool", "content": "x"}], template="alpaca")
    # Built-ins tokenize exactly as transformers does with the same template string.
    for tok, hf, name in ((chatml, theirs, "chatml"), (llama3, theirs3, "llama3")):
        for gen in (False, True):
            assert apply_chat_template(tok, msgs, gen, template=name) == _hf_ids(
                hf.apply_chat_template(msgs, add_generation_prompt=gen,
                                       chat_template=BUILTIN_TEMPLATES[name]))


def test_fallback_template_when_tokenizer_has_none(tmp_path, pairs):
    d = build_llama3(tmp_path / "no_template", chat_template=None)
    tok = HFTokenizer.from_dir(d)
    assert tok.chat_template is None and default_template_name(tok) == "llama3"
    msgs = CONVERSATIONS[1]
    assert render_chat(tok, msgs) == render_chat(tok, msgs, template="llama3")
    assert default_template_name(pairs["chatml"][0]) == "chatml"
    assert default_template_name(pairs["llama2"][0]) == "alpaca"

    # CharTokenizer: the alpaca fallback, special tokens as "<bos>"/"<eos>" placeholders.
    char = CharTokenizer()
    assert default_template_name(char) == "alpaca"
    conv = [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
    ids, mask = chat_token_mask(char, conv)
    assert ids[0] == char.bos_id and ids == apply_chat_template(char, conv)
    assert [i for i, m in zip(ids, mask) if m] == [*char.encode("5"), char.eos_id,
                                                   *char.encode("2"), char.eos_id]
    text = render_chat(char, conv, add_generation_prompt=True)
    assert text.endswith("### Response:\n2<eos>\n\n### Response:\n")


# ---------------------------------------------------------------------------------------------
# scripts/generate.py


def _generate_script():
    spec = importlib.util.spec_from_file_location("ftjax_generate_script",
                                                  os.path.join(ROOT, "scripts", "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generate_script_params_file_char_tokenizer(tmp_path, capsys):
    import jax
    from ftjax import models
    from ftjax.infer.generate import generate_text
    from ftjax.io.params_file import save_params

    char = CharTokenizer()
    cfg = models.preset("llama", vocab_size=char.vocab_size, hidden_size=32,
                        intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        init_std=0.5)
    params = models.init(cfg, jax.random.PRNGKey(0))
    path = str(tmp_path / "tiny.safetensors")
    save_params(path, cfg, params)
    script = _generate_script()

    outs = script.main(["--model", path, "--prompt", "2+3=", "--prompt", "hello there",
                        "--max-new-tokens", "6", "--json"])
    want = generate_text(params, cfg, char, ["2+3=", "hello there"], max_new_tokens=6)
    assert outs == want
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["completion"] for r in lines] == want and lines[0]["prompt"] == "2+3="

    sampled = script.main(["--model", path, "--chat", "hi", "--max-new-tokens", "5",
                           "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9",
                           "--seed", "3"])
    again = script.main(["--model", path, "--chat", "hi", "--max-new-tokens", "5",
                         "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "3"])
    assert len(sampled) == 1 and sampled == again

    with pytest.raises(SystemExit):
        script.main(["--model", path])  # neither --prompt nor --chat


def test_generate_script_hf_directory(tmp_path, tok_dirs):
    """A tiny transformers Llama saved with save_pretrained + our tokenizer files: the script's
    greedy chat completion equals transformers' own generate on the same chat ids."""
    import torch
    import shutil

    src = tok_dirs["llama3"]
    tok = HFTokenizer.from_dir(src)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.5, bos_token_id=tok.bos_id, eos_token_id=list(tok.eos_ids),
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model_dir = tmp_path / "tiny_llama"
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), model_dir / name)

    script = _generate_script()
    msgs = [{"role": "user", "content": "What is two plus three?"}]
    outs = script.main(["--model", str(model_dir), "--chat", msgs[0]["content"],
                        "--max-new-tokens", "8"])
    prompt = apply_chat_template(tok, msgs, add_generation_prompt=True)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)
    new = ref[0, len(prompt):].tolist()
    assert outs == [tok.decode(new)]
