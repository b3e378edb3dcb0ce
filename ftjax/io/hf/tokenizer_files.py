"""The tokenizer files of a Hugging Face directory (copied next to exported weights), and its
chat template (`chat_template.jinja`)."""
from __future__ import annotations

import json
import os
import shutil

__all__ = ["TOKENIZER_FILES", "CHAT_TEMPLATE_FILE", "copy_tokenizer_files", "write_chat_template"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the tokenizer files (tokenizer.json, vocab.json, chat template, ...) that
    `src_dir` has into `dst_dir`; returns their names (none when src_dir has none)."""
    copied = []
    os.makedirs(dst_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def write_chat_template(dst_dir: str, source: str) -> list[str]:
    """Makes the Jinja `source` the directory's only chat template: writes
    `chat_template.jinja` (which transformers v5 and `HFTokenizer` read first) and removes the
    other places a template could come from (`chat_template.json`, the `chat_template` key of
    `tokenizer_config.json`), so no reader finds another one. Returns the file written."""
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(dst_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(source)
    legacy = os.path.join(dst_dir, "chat_template.json")
    if os.path.isfile(legacy):
        os.remove(legacy)
    cfg_file = os.path.join(dst_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            config = json.load(f)
        if "chat_template" in config:
            del config["chat_template"]
            with open(cfg_file, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
                f.write("\n")
    return [CHAT_TEMPLATE_FILE]
