"""Formats -> canonical examples (remapping, ShareGPT, errors that name field/origin) and
templates -> tokens + completion-only masks (parity with transformers' assistant masks,
row alignment, truncation counted exactly)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from ftjax.data.chat import BUILTIN_TEMPLATES, apply_chat_template, chat_token_mask
from ftjax.data.errors import DataError
from ftjax.data.formats import FORMATS, detect_format, to_canonical
from ftjax.data.templates import (encode_document, tokenize_classification, tokenize_preference,
                                  tokenize_sft, tokenize_unpaired)
from ftjax.data.tokenizer import CharTokenizer

CHAR = CharTokenizer()


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


# ---------------------------------------------------------------------------------------------
# Formats


def test_instruction_alpaca_with_empty_and_nonempty_input():
    assert to_canonical({"instruction": "Add.", "input": "", "output": "5"}, "instruction") == \
        {"messages": [U("Add."), A("5")]}
    assert to_canonical({"instruction": "Add.", "input": "2 3", "output": "5",
                         "system": "Be brief."}, "instruction") == \
        {"messages": [S("Be brief."), U("Add.\n\n2 3"), A("5")]}
    assert to_canonical({"instruction": "Add.", "output": "5"}, "instruction") == \
        {"messages": [U("Add."), A("5")]}


def test_field_map_remaps_fields():
    fm = {"instruction": "question", "output": "answer"}
    assert to_canonical({"question": "Q", "answer": "X", "id": 3}, "instruction", fm) == \
        {"messages": [U("Q"), A("X")]}
    # Records already renamed by sources.open_source(field_map=...) work with the same map.
    assert to_canonical({"instruction": "Q", "output": "X"}, "instruction", fm) == \
        {"messages": [U("Q"), A("X")]}
    assert to_canonical({"sentence": "great", "sentiment": 1}, "classification",
                        {"text": "sentence", "label": "sentiment"}) == \
        {"text": "great", "label": "1"}
    chat = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    assert to_canonical(chat, "chat", {"messages": "dialog", "role": "speaker",
                                       "content": "text"}) == {"messages": [U("hi"), A("yo")]}


def test_chat_and_sharegpt_roles():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a", "weight": 0}]
    assert to_canonical({"messages": msgs}, "chat") == {"messages": [S("s"), U("u"), A("a")]}
    conv = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"},
                              {"from": "gpt", "value": "a"}, {"from": "human", "value": "u2"},
                              {"from": "gpt", "value": "a2"}]}
    assert to_canonical(conv, "sharegpt") == \
        {"messages": [S("s"), U("u"), A("a"), U("u2"), A("a2")]}
    with_system = {"system": "sys", "conversations": [{"from": "human", "value": "u"},
                                                      {"from": "gpt", "value": "a"}]}
    assert to_canonical(with_system, "sharegpt") == {"messages": [S("sys"), U("u"), A("a")]}
    # A message list stored as JSON text (e.g. a CSV cell) is accepted.
    assert to_canonical({"messages": json.dumps([U("u"), A("a")])}, "chat") == \
        {"messages": [U("u"), A("a")]}


def test_preference_forms():
    assert to_canonical({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference") == \
        {"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]}
    both = {"chosen": [S("s"), U("Q"), A("good")], "rejected": [S("s"), U("Q"), A("bad")]}
    assert to_canonical(both, "preference") == \
        {"prompt": [S("s"), U("Q")], "chosen": [A("good")], "rejected": [A("bad")]}
    msgs = {"prompt": [U("Q")], "chosen": [A("g")], "rejected": [A("b")]}
    assert to_canonical(msgs, "preference") == msgs


def test_unpaired_classification_text():
    for label, want in ((True, True), (0, False), ("yes", True), ("False", False)):
        assert to_canonical({"prompt": "Q", "completion": "c", "label": label}, "unpaired") == \
            {"prompt": [U("Q")], "completion": [A("c")], "label": want}
    assert to_canonical({"text": "t", "label": 2.0}, "classification") == \
        {"text": "t", "label": "2"}
    assert to_canonical({"text": "t", "label": " pos "}, "classification")["label"] == "pos"
    assert to_canonical({"text": "doc", "meta": 1}, "text") == {"text": "doc"}


def test_detect_format():
    cases = {
        "instruction": {"instruction": "i", "input": "", "output": "o"},
        "chat": {"messages": []},
        "sharegpt": {"conversations": []},
        "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "unpaired": {"prompt": "p", "completion": "c", "label": True},
        "classification": {"text": "t", "label": "x"},
        "text": {"text": "t"},
    }
    assert set(cases) == set(FORMATS)
    for fmt, record in cases.items():
        assert detect_format(record) == fmt
    assert detect_format({"question": "q", "answer": "a"},
                         {"instruction": "question", "output": "answer"}) == "instruction"
    with pytest.raises(DataError, match=r"cannot detect the data format from fields "
                                        r"\['a', 'b'\]"):
        detect_format({"a": 1, "b": 2})


@pytest.mark.parametrize("record,fmt,fm,pattern", [
    ({"instruction": "q", "answer": "a"}, "instruction", None,
     r"^f\.jsonl:7: instruction record has no field 'output' \(fields present: "
     r"\['answer', 'instruction'\]\); if it has another name, map it: field_map="),
    ({"question": "q"}, "instruction", {"instruction": "question", "output": "answer"},
     r"^f\.jsonl:7: .*no field 'answer' \(mapped from 'output'\) \(fields present: "
     r"\['question'\]\)"),
    ({"messages": "hi there"}, "chat", None,
     r"^f\.jsonl:7: chat field 'messages' must be a list of messages; its text is not a JSON"),
    ({"messages": {"role": "user"}}, "chat", None,
     r"^f\.jsonl:7: chat field 'messages' must be a list of messages, got dict"),
    ({"messages": [U("u"), {"role": "narrator", "content": "x"}]}, "chat", None,
     r"message 1 has unknown role 'narrator'; known roles"),
    ({"messages": [U("u"), {"role": "assistant", "content": 5}]}, "chat", None,
     r"message 1 \(assistant\) content must be a string, got int"),
    ({"messages": [U("u"), {"role": "assistant"}]}, "chat", None,
     r"message 1 has no 'content' key \(keys: \['role'\]\)"),
    ({"messages": [U("u"), A("  ")]}, "chat", None, r"message 1 is an empty assistant message"),
    ({"messages": [U("u")]}, "chat", None, r"has no assistant message, so nothing would be"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "ai", "value": "a"}]},
     "sharegpt", None, r"'conversations' message 1 has unknown role 'ai'"),
    ({"chosen": "c", "rejected": "r"}, "preference", None,
     r"preference record has no field 'prompt' and chosen/rejected share no leading"),
    ({"prompt": "p", "completion": "c", "label": "maybe"}, "unpaired", None,
     r"field 'label' must be a boolean .* got 'maybe'"),
    ({"text": "t", "label": None}, "classification", None,
     r"no field 'label' \(fields present: \['label', 'text'\]\)"),
    ({"text": ["a"]}, "text", None, r"field 'text' must be a string, got list"),
    ({"text": "   "}, "text", None, r"field 'text' is empty"),
    ({"text": "t"}, "text", {"body": "content"}, r"field_map keys \['body'\] are not fields of "
                                                 r"the text format"),
    ({"text": "t"}, "tabular", None, r"unknown data format 'tabular'"),
])
def test_errors_name_field_fields_present_and_origin(record, fmt, fm, pattern):
    with pytest.raises(DataError, match=pattern):
        to_canonical(record, fmt, fm, "f.jsonl:7")


# ---------------------------------------------------------------------------------------------
# Tiny Hugging Face tokenizers built offline


CHATML_GEN = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
              "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
              "{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [U("What is two plus three?"), A("five")],
    [S("You are a helpful assistant."), U("hello world"), A("Sure, here is the answer."),
     U("and the capital of France?"), A("Paris")],
    [U("the quick brown fox"), A("jumps over"), U("a lazy dog"), A("tokenization 1234 !")],
]


def _build(d, *, chat_template, bos: bool) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog hello world helpful assistant answer "
             "what is two plus three five Paris capital France sure here and of , . ? ! 1234 "
             "tokenization you are").split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "model_max_length": 4096}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        config["bos_token"] = "<s>"
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if chat_template is not None:
        config["chat_template"] = chat_template
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(d)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    import transformers
    from ftjax.data.hf_tokenizer import HFTokenizer

    root = tmp_path_factory.mktemp("tiny_tok")
    out = {}
    for name, kw in (("gen", dict(chat_template=CHATML_GEN, bos=False)),
                     ("plain", dict(chat_template=None, bos=True))):
        d = _build(root / name, **kw)
        out[name] = (HFTokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d))
    return out


def _hf_assistant_mask(theirs, messages, template):
    out = theirs.apply_chat_template(messages, chat_template=template, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_sft_masks_match_transformers_generation_template(hf):
    """The tokenizer's own {% generation %} template: tokens and masks are transformers'."""
    ours, theirs = hf["gen"]
    for msgs in CONVERSATIONS:
        out = tokenize_sft({"messages": msgs}, ours, max_len=4096)
        ids, mask = _hf_assistant_mask(theirs, msgs, CHATML_GEN)
        assert out["tokens"].tolist() == ids
        assert mask[0] == 0 and out["loss_mask"].tolist() == [float(m) for m in mask]
        assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == np.float32


def test_sft_default_builtin_template_matches_transformers(hf):
    """No template on the tokenizer: its <|im_start|> tokens pick the built-in ChatML; the
    prefix-rendering mask equals transformers' on the equivalent {% generation %} template."""
    ours, theirs = hf["plain"]
    assert ours.chat_template is None
    for msgs in CONVERSATIONS:
        out = tokenize_sft({"messages": msgs}, ours, max_len=4096)
        ids, mask = _hf_assistant_mask(theirs, msgs, CHATML_GEN)
        assert theirs.apply_chat_template(msgs, chat_template=BUILTIN_TEMPLATES["chatml"],
                                          tokenize=False) == \
            theirs.apply_chat_template(msgs, chat_template=CHATML_GEN, tokenize=False)
        assert out["tokens"].tolist() == ids
        assert out["loss_mask"].tolist() == [float(m) for m in mask]
        # ... and equals chat_token_mask with the first position forced to 0.
        cids, cmask = chat_token_mask(ours, msgs)
        assert cids == ids and cmask[1:] == mask[1:]


def test_generation_prompt_is_not_trained(hf):
    ours, _ = hf["gen"]
    msgs = CONVERSATIONS[1]
    out = tokenize_sft({"messages": msgs}, ours, max_len=4096)
    # Everything up to and including the last generation prompt is context except earlier
    # assistant turns; the header "<|im_start|>assistant\n" itself is never a target.
    with_prompt = apply_chat_template(ours, msgs[:-1], add_generation_prompt=True)
    assert out["tokens"][:len(with_prompt)].tolist() == with_prompt
    header = ours.encode("<|im_start|>assistant\n")
    prefix = apply_chat_template(ours, msgs[:-1])
    assert with_prompt[len(prefix):] == header
    assert not out["loss_mask"][len(prefix):len(with_prompt)].any()
    trained = out["tokens"][len(with_prompt):][out["loss_mask"][len(with_prompt):] > 0]
    assert ours.decode(trained, stop_at_eos=False, skip_special_tokens=False) == "Paris<|im_end|>"


def test_plain_text_uses_tokenizer_bos_and_eos(hf):
    ours, theirs = hf["plain"]
    text = "the quick brown fox jumps over a lazy dog"
    out = tokenize_sft({"text": text}, ours, max_len=4096)
    want = theirs(text)["input_ids"] + [theirs.eos_token_id]
    assert want[0] == theirs.convert_tokens_to_ids("<s>")
    assert out["tokens"].tolist() == want == encode_document(ours, text)
    assert out["loss_mask"].tolist() == [0.0] + [1.0] * (len(want) - 1)
    char = tokenize_sft({"text": "hi"}, CHAR, max_len=16)
    assert char["tokens"].tolist() == [CHAR.bos_id] + CHAR.encode("hi") + [CHAR.eos_id]


# ---------------------------------------------------------------------------------------------
# CharTokenizer: default template text, row alignment


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n")


def _row(out):
    """What packing does with one example: inputs/targets/loss_mask of the shifted row."""
    t, m = out["tokens"], out["loss_mask"]
    return t[:-1], t[1:], m[1:]


def test_char_tokenizer_default_template_is_readable_alpaca():
    ex = {"messages": [U("Add 2 and 3"), A("5"), U("Times 4?"), A("20")]}
    out = tokenize_sft(ex, CHAR, max_len=1024)
    text = ("<bos>" + ALPACA_PREAMBLE + "### Instruction:\nAdd 2 and 3\n\n### Response:\n5<eos>"
            "\n\n### Instruction:\nTimes 4?\n\n### Response:\n20<eos>\n\n")
    pieces = text.replace("<bos>", "\x00").replace("<eos>", "\x01")
    want = [CHAR.bos_id if c == "\x00" else CHAR.eos_id if c == "\x01" else CHAR.encode(c)[0]
            for c in pieces]
    assert out["tokens"].tolist() == want
    inputs, targets, mask = _row(out)
    # The trained targets are exactly each answer and its <eos>, predicted from what precedes.
    trained = targets[mask > 0].tolist()
    assert trained == CHAR.encode("5") + [CHAR.eos_id] + CHAR.encode("20") + [CHAR.eos_id]
    first = int(np.argmax(mask))
    assert CHAR.decode(inputs[:first + 1]).endswith("### Response:\n")
    assert targets[first] == CHAR.encode("5")[0]


def test_text_errors_and_bad_options():
    with pytest.raises(DataError, match=r"^f:3: CharTokenizer cannot encode character"):
        tokenize_sft({"text": "caf\u00e9"}, CHAR, max_len=64, origin="f:3")
    with pytest.raises(DataError, match=r"truncation='middle'; use 'right', 'left', 'error'"):
        tokenize_sft({"text": "x" * 10}, CHAR, max_len=4, truncation="middle")
    with pytest.raises(DataError, match=r"truncation=\{'answer': 'left'\}"):
        tokenize_sft({"text": "x" * 10}, CHAR, max_len=4, truncation={"answer": "left"})
    with pytest.raises(DataError, match="max_len=1"):
        tokenize_sft({"text": "x"}, CHAR, max_len=1)
    with pytest.raises(DataError, match=r"needs a canonical sft example .* got fields "
                                        r"\['instruction'\]"):
        tokenize_sft({"instruction": "x"}, CHAR, max_len=64)
    with pytest.raises(DataError, match=r"^g:1: cannot apply the chat template: .*alpaca "
                                        r"template supports system \(first\)"):
        tokenize_sft({"messages": [U("u"), S("late system"), A("a")]}, CHAR, max_len=512,
                     origin="g:1")


# ---------------------------------------------------------------------------------------------
# Truncation, counted exactly


def _full(ex, tok=CHAR):
    out = tokenize_sft(ex, tok, max_len=10_000)
    return out["tokens"].tolist(), out["loss_mask"].tolist()


def test_truncation_right_and_left_counts_exactly():
    ex = {"messages": [U("Q" * 30), A("A" * 20)]}
    full, fmask = _full(ex)
    n = len(full)
    c = {}
    right = tokenize_sft(ex, CHAR, max_len=n - 7, truncation="right", counters=c)
    assert right["tokens"].tolist() == full[:n - 7]
    assert right["loss_mask"].tolist() == fmask[:n - 7]
    assert c == {"truncated_examples": 1, "truncated_tokens": 7}
    left = tokenize_sft(ex, CHAR, max_len=n - 7, truncation="left", counters=c)
    # A leading bos survives; the rest keeps its last max_len - 1 tokens.
    assert left["tokens"].tolist() == [CHAR.bos_id] + full[-(n - 8):]
    assert left["loss_mask"].tolist() == [0.0] + fmask[-(n - 8):]
    assert c == {"truncated_examples": 2, "truncated_tokens": 14}
    fits = tokenize_sft(ex, CHAR, max_len=n, truncation="left", counters=c)
    assert fits["tokens"].tolist() == full and c["truncated_examples"] == 2
    with pytest.raises(DataError, match=rf"example has {n} tokens, more than max_len={n - 1}"):
        tokenize_sft(ex, CHAR, max_len=n - 1, truncation="error")


def test_per_field_truncation_keeps_completion_and_cuts_prompt_left():
    ex = {"messages": [U("Q" * 30), A("A" * 20)]}
    full, fmask = _full(ex)
    n = len(full)
    s = fmask.index(1.0)  # first completion token
    completion = full[s:]
    c = {}
    out = tokenize_sft(ex, CHAR, max_len=n - 25, truncation={"prompt": "left",
                                                              "completion": "right"}, counters=c)
    t = out["tokens"].tolist()
    assert len(t) == n - 25 and t[0] == CHAR.bos_id
    assert t[-len(completion):] == completion  # completion intact
    assert t[1:-len(completion)] == full[1 + 25:s]  # prompt lost its first 25 tokens after bos
    assert c == {"truncated_examples": 1, "truncated_tokens": 25}
    # A completion longer than the room left: the prompt keeps max_len // 2 tokens (context),
    # the completion is cut on its side.
    long = {"messages": [U("Q" * 30), A("A" * 200)]}
    lfull, lmask = _full(long)
    ls = lmask.index(1.0)
    out = tokenize_sft(long, CHAR, max_len=100, truncation={"prompt": "left",
                                                            "completion": "right"}, counters=c)
    t = out["tokens"].tolist()
    budget = 100 - 1
    assert len(t) == 100 and t[1:1 + budget // 2] == lfull[ls - budget // 2:ls]
    assert t[1 + budget // 2:] == lfull[ls:ls + budget - budget // 2]
    assert c["truncated_tokens"] == 25 + len(lfull) - 100


def test_truncation_to_no_targets_is_counted():
    c = {}
    out = tokenize_sft({"messages": [U("Q" * 300), A("yes")]}, CHAR, max_len=64, counters=c)
    assert not out["loss_mask"].any()
    assert c["no_targets"] == 1 and c["truncated_examples"] == 1


# ---------------------------------------------------------------------------------------------
# Preference, unpaired, classification


def test_preference_shares_prompt_and_truncates_consistently():
    ex = to_canonical({"prompt": "P" * 40, "chosen": "good answer", "rejected": "bad " * 10},
                      "preference")
    full = tokenize_preference(ex, CHAR, max_len=10_000)
    for key, answer in (("chosen", "good answer"), ("rejected", "bad " * 10)):
        t, m = full[key]["tokens"], full[key]["loss_mask"]
        assert t[m > 0].tolist() == CHAR.encode(answer) + [CHAR.eos_id]
    s_c = int(np.argmax(full["chosen"]["loss_mask"]))
    s_r = int(np.argmax(full["rejected"]["loss_mask"]))
    assert s_c == s_r
    assert full["chosen"]["tokens"][:s_c].tolist() == full["rejected"]["tokens"][:s_r].tolist()

    c = {}
    longest = max(len(full[k]["tokens"]) for k in full)
    max_len = longest - 30
    cut = tokenize_preference(ex, CHAR, max_len=max_len, truncation="left", counters=c)
    prompts = []
    for key in ("chosen", "rejected"):
        t, m = cut[key]["tokens"].tolist(), cut[key]["loss_mask"]
        assert len(t) <= max_len
        s = int(np.argmax(m))
        prompts.append(t[:s])
        # completions are untouched: the prompt gave way for the longer one
        assert m.sum() == full[key]["loss_mask"].sum()
    assert prompts[0] == prompts[1] and prompts[0][0] == CHAR.bos_id
    dropped = sum(len(full[k]["tokens"]) - len(cut[k]["tokens"]) for k in full)
    assert c == {"truncated_examples": 1, "truncated_tokens": dropped} and dropped == 60


def test_unpaired_trains_completion_only_even_after_assistant_prompt_turns():
    ex = to_canonical({"prompt": [U("hi"), A("hello"), U("bye?")], "completion": "bye",
                       "label": "false"}, "unpaired")
    out = tokenize_unpaired(ex, CHAR, max_len=1024)
    assert out["label"] is False
    assert out["tokens"][out["loss_mask"] > 0].tolist() == CHAR.encode("bye") + [CHAR.eos_id]
    sft = tokenize_sft({"messages": ex["prompt"] + ex["completion"]}, CHAR, max_len=1024)
    assert sft["tokens"].tolist() == out["tokens"].tolist()
    assert sft["loss_mask"].sum() == out["loss_mask"].sum() + len("hello") + 1


def test_classification_tokens_labels_and_truncation():
    labels = {"neg": 0, "pos": 1}
    out = tokenize_classification({"text": "fine", "label": "pos"}, CHAR, labels, 32)
    assert out == {"tokens": out["tokens"], "label": 1}
    assert out["tokens"].tolist() == [CHAR.bos_id] + CHAR.encode("fine") + [CHAR.eos_id]
    c = {}
    right = tokenize_classification({"text": "abcdefghij", "label": "neg"}, CHAR, labels, 6,
                                    counters=c)
    assert right["tokens"].tolist() == [CHAR.bos_id] + CHAR.encode("abcd") + [CHAR.eos_id]
    left = tokenize_classification({"text": "abcdefghij", "label": "neg"}, CHAR, labels, 6,
                                   truncation="left", counters=c)
    assert left["tokens"].tolist() == [CHAR.bos_id] + CHAR.encode("ghij") + [CHAR.eos_id]
    assert c == {"truncated_examples": 2, "truncated_tokens": 12}
    with pytest.raises(DataError, match=r"^x:2: label 'meh' is not among the classes "
                                        r"\['neg', 'pos'\]"):
        tokenize_classification({"text": "t", "label": "meh"}, CHAR, labels, 8, origin="x:2")
