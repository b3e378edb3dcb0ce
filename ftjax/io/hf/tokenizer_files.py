"""The tokenizer files of a Hugging Face directory (copied next to exported weights)."""
from __future__ import annotations

import os
import shutil

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the tokenizer files (tokenizer.json, vocab.json, chat template, ...) that
    `src_dir` has into `dst_dir`; returns their names (none when src_dir has none)."""
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
