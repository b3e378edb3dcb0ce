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
