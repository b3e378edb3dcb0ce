"""Data: tokenizers, the built-in synthetic task suite, and causal-LM batching.

Layering: nothing here imports `ftjax.models`.
"""

from ftjax.data.batching import (
    BATCH_KEYS,
    PromptBatch,
    SyntheticLoader,
    encode_example,
    prompt_batch,
)
from ftjax.data.synthetic import (
    HELDOUT_TASKS,
    PRETRAIN_TASKS,
    TASKS,
    Task,
    exact_match,
    fact_examples,
    fact_table,
    generate,
    make_splits,
    mixture,
    split_of,
)
from ftjax.data.tokenizer import CharTokenizer, Tokenizer
from ftjax.data.hf_tokenizer import HFTokenizer
from ftjax.data.chat import apply_chat_template, chat_token_mask, render_chat

__all__ = [
    "BATCH_KEYS", "PromptBatch", "SyntheticLoader", "encode_example", "prompt_batch",
    "HELDOUT_TASKS", "PRETRAIN_TASKS", "TASKS", "Task", "exact_match", "fact_examples",
    "fact_table", "generate", "make_splits", "mixture", "split_of",
    "CharTokenizer", "Tokenizer", "HFTokenizer", "apply_chat_template", "chat_token_mask",
    "render_chat",
]

# Data preparation: sources, formats, templates (TFDS is imported lazily by open_source).
from ftjax.data.errors import DataError
from ftjax.data.sources import RecordSource, open_source
from ftjax.data.formats import FORMATS, detect_format, to_canonical
from ftjax.data.templates import (tokenize_classification, tokenize_preference, tokenize_sft,
                                  tokenize_unpaired)

__all__ += ["DataError", "RecordSource", "open_source", "FORMATS", "detect_format",
            "to_canonical", "tokenize_classification", "tokenize_preference", "tokenize_sft",
            "tokenize_unpaired"]

# Packing and the Grain pipeline (Grain is imported lazily by make_loader).
from ftjax.data.packing import PackStats, pack, pad_rows
from ftjax.data.pipeline import Loader, Prepared, eval_batches, make_loader, prepare

__all__ += ["PackStats", "pack", "pad_rows", "Loader", "Prepared", "eval_batches",
            "make_loader", "prepare"]
