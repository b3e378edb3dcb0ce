"""Prompt tuning (Lester et al. 2021) on the built-in synthetic suite: only n virtual-token
embeddings prepended to every sequence train.

    python -m ftjax.main --config configs/prompt_sft.py:num_virtual_tokens=20,init=text \
        --workdir workdirs/prompt

Generation must go through the method's apply_fn (ftjax.peft.prompt.prompt_generate);
`ftjax.infer.generate.generate` on these params would ignore the prompt, so the trainer's
held-out exact-match (which calls it) is off here (data.eval_examples=0).
"""
import ml_collections

from configs import common
from configs.sft_synthetic import get_config as sft_config


def get_config(arg=None):
    arg = common.parse_arg(arg, num_virtual_tokens=20, init="random",
                           init_text="Answer the task:", tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = ml_collections.ConfigDict(dict(
        method="prompt_tuning",
        num_virtual_tokens=arg.num_virtual_tokens,  # n: trainable rows n * hidden_size
        init=arg.init,                # random (N(0, std of the embedding table)) | text | vocab
        init_std=0.0,                 # random: the std (0 = std of the embedding table)
        init_text=arg.init_text,      # text: tokenized with the run's tokenizer ...
        tokenizer_dir="",             # ... ("" = built-in CharTokenizer, else an HF directory)
        init_token_ids=(),            # text: explicit ids instead of init_text
        segments=1,                   # documents per packed row that see the prompt
        train_patterns=(),
    ))
    c.optimizer.learning_rate = 3e-2  # prompt tuning wants large rates (Lester et al.: 0.3)
    # Real tokens sit at positions n.. after the prompt (learned position tables need room).
    c.model.max_position_embeddings = max(c.model.max_position_embeddings,
                                          c.train.seq_len + arg.num_virtual_tokens)
    c.data.eval_examples = 0
    return c
