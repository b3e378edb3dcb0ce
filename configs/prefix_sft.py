"""Prefix tuning (Li & Liang 2021) on the built-in synthetic suite: per-layer trainable key/value
prefixes of n slots (optionally through PEFT's prefix_projection MLP).

    python -m ftjax.main --config configs/prefix_sft.py:num_virtual_tokens=10,projection=True \
        --workdir workdirs/prefix

Generation must go through the method's apply_fn (`ftjax.infer.generate.generate(...,
apply_fn=method.apply_fn)`); the trainer's held-out exact-match calls the plain generator, so it is
off here (data.eval_examples=0). Prefix params cannot be merged (export.hf_dir must stay empty).
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("prefix_tuning")  # every setting, documented in ftjax/peft/prompt.py
    # This config uses 10 slots (the method's default is 20).
    arg = common.parse_arg(arg, num_virtual_tokens=10, projection=d.projection,
                           projection_hidden=d.projection_hidden, tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = d
    c.peft.update(dict(num_virtual_tokens=arg.num_virtual_tokens, projection=arg.projection,
                       projection_hidden=arg.projection_hidden))
    c.optimizer.learning_rate = 1e-2
    c.data.eval_examples = 0
    return c
