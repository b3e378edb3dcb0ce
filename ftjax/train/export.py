"""Complete exports of a run: weights and config, the tokenizer the run trained with, the chat
template its examples were rendered in, and a check that a rebuilt base is the one it trained
on. Used by `Run.export_hf` (`export.hf_dir`), scripts/export_peft.py and
scripts/convert_hf.py, so every exported directory loads with transformers'
`AutoTokenizer` / `AutoModelForCausalLM` and with scripts/generate.py, whose `--chat` then
renders prompts exactly as the run's training examples were laid out.

Tokenizer files: copied from the `model.init_from=hf:DIR` directory when the run used its
tokenizer, else the built-in character tokenizer's (`CharTokenizer.save_pretrained`).
Chat template (`chat_template.jinja`, the only one in the directory): "plain" (`[bos] prompt
"\\n" answer [eos]`) for the built-in synthetic tasks, whatever tokenizer; for the user's data
(`data.source` / `data.sources`) the resolved `data.template` (a built-in name, Jinja source,
or "" = the tokenizer's own, else the built-in that fits it).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ftjax.data.chat import BUILTIN_TEMPLATES, default_template_name, resolve_template
from ftjax.data.hf_tokenizer import HFTokenizer
from ftjax.data.tokenizer import CharTokenizer
from ftjax.train.run import uses_files

__all__ = ["trained_template", "write_tokenizer", "special_token_ids", "save_model",
           "template_metadata", "recorded_template"]


def trained_template(cfg: Any, tok: Any) -> tuple[str, str]:
    """(name, Jinja source) of the chat layout the run trained on (see module docstring).
    The name is a built-in's, a template name of the tokenizer, "tokenizer" (its default
    template) or "custom" (Jinja source in the config)."""
    if not uses_files(cfg):
        return "plain", BUILTIN_TEMPLATES["plain"]
    given = cfg.data.get("template", "") or None
    source = resolve_template(tok, given)
    if given is None:
        own = getattr(tok, "chat_template", None)
        return ("tokenizer" if own is not None else default_template_name(tok)), source
    if given in (getattr(tok, "chat_templates", None) or {}) or given in BUILTIN_TEMPLATES:
        return given, source
    return "custom", source


def template_metadata(cfg: Any, tok: Any) -> dict:
    """`{"name", "source"}` of the trained template, as stored in ftjax params files."""
    name, source = trained_template(cfg, tok)
    return {"name": name, "source": source}


def recorded_template(params_path: str) -> tuple[str, str, bool]:
    """(name, Jinja source, recorded) of the chat template an ftjax params file was trained
    with: its `chat_template` metadata (`template_metadata`), else "plain", the layout of ftjax's
    character-tokenizer models (the quickstart base among them), with recorded=False."""
    from ftjax.io.files import read_metadata
    rec = read_metadata(params_path).get("chat_template")
    if isinstance(rec, dict) and rec.get("source"):
        return str(rec.get("name")), rec["source"], True
    return "plain", BUILTIN_TEMPLATES["plain"], False


def write_tokenizer(out: str, tok: Any, template: str,
                    tokenizer_dir: Optional[str] = None) -> list[str]:
    """Tokenizer files (from `tokenizer_dir`, else the run's tokenizer: its HF directory or the
    CharTokenizer's) and `template` (Jinja source) as the directory's chat template."""
    from ftjax.io.hf import copy_tokenizer_files, write_chat_template
    if tokenizer_dir:
        files = copy_tokenizer_files(tokenizer_dir, out)
        if "tokenizer.json" not in files:
            raise FileNotFoundError(f"--tokenizer {tokenizer_dir!r} has no tokenizer.json; name "
                                    "a Hugging Face tokenizer directory")
    elif isinstance(tok, HFTokenizer):
        files = copy_tokenizer_files(tok.name_or_path, out)
    elif isinstance(tok, CharTokenizer):
        files = tok.save_pretrained(out)
    else:
        raise TypeError(f"cannot write tokenizer files for {tok!r}: pass a tokenizer directory")
    return [f for f in files if f != "chat_template.jinja"] + write_chat_template(out, template)


def special_token_ids(tok: Any) -> dict:
    """config.json's `bos/eos/pad_token_id` (eos a list when the tokenizer has several)."""
    eos = list(getattr(tok, "eos_ids", ()) or ([] if tok.eos_id is None else [tok.eos_id]))
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
            "pad_token_id": tok.pad_id}


def save_model(out: str, model_cfg: Any, params: Any, tok: Any, template: str, *,
               tokenizer_dir: Optional[str] = None, **save_kw: Any) -> list[str]:
    """A complete Hugging Face directory: `hf.save_pretrained` (structured weights merged by
    materializing) with the tokenizer's special ids in config.json, the tokenizer files and
    the chat template. Returns the files written."""
    from ftjax.io.hf import save_pretrained
    files = save_pretrained(os.fspath(out), model_cfg, params,
                            extra_config=special_token_ids(tok), **save_kw)
    return files + write_tokenizer(os.fspath(out), tok, template, tokenizer_dir)


def save_reward_model(out: str, model_cfg: Any, params: Any, tok: Any, template: str, *,
                      tokenizer_dir: Optional[str] = None, **save_kw: Any) -> list[str]:
    """A complete transformers `*ForSequenceClassification` directory (one label) for a reward
    model: merged backbone plus `score` (`io.hf.seqcls`), the tokenizer's special ids in
    config.json (pad_token_id is how transformers finds the last token), tokenizer files and
    the chat template."""
    from ftjax.io.hf.seqcls import save_reward_model as save
    ids = special_token_ids(tok)
    if ids["pad_token_id"] is None:
        raise ValueError("a reward model needs a tokenizer with a pad token: transformers finds "
                         "each row's last token by config.pad_token_id")
    files = save(os.fspath(out), model_cfg, params, pad_token_id=int(ids["pad_token_id"]),
                 extra_config=ids, **save_kw)
    return files + write_tokenizer(os.fspath(out), tok, template, tokenizer_dir)
