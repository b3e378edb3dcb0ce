"""Prefix tuning (Li & Liang 2021) on the built-in synthetic suite: per-layer trainable key/value
prefixes of n slots (optionally through PEFT's prefix_projection MLP).

    python -m ftjax.main --config configs/prefix_sft.py:num_virtual_tokens=10,projection=True \
        --workdir workdirs/prefix

Generation must go through the method's apply_fn (ftjax.peft.prompt.prompt_generate with
apply_fn=prefix_apply); the trainer's held-out exact-match calls the plain generator, so it is
off here (data.eval_examples=0). Prefix params cannot be merged (export.hf_dir must stay empty).
"""
import ml_collections

from configs import common
from configs.sft_synthetic import get_config as sft_config


def get_config(arg=None):
    arg = common.parse_arg(arg, num_virtual_tokens=10, projection=False, projection_hidden=0,
                           tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = ml_collections.ConfigDict(dict(
        method="prefix_tuning",
        num_virtual_tokens=arg.num_virtual_tokens,  # n slots; trains n * L * 2 * kv_dim
        projection=arg.projection,                  # MLP re-parameterisation (PEFT)
        projection_hidden=arg.projection_hidden,    # h (0 = token_dim)
        token_dim=0,                                # d of the MLP input (0 = kv_dim, as PEFT)
        init_std=1.0,                               # N(0, init_std), PEFT's nn.Embedding init
        segments=1,                                 # documents per packed row that see it
        train_patterns=(),
    ))
    c.optimizer.learning_rate = 1e-2
    c.data.eval_examples = 0
    return c
