"""Prefix tuning (Li & Liang 2021) of the quickstart base on the unseen task `dmy2iso`: per-layer
trainable key/value prefixes of n slots (optionally through PEFT's prefix_projection MLP).

    python -m ftjax.main --config configs/prefix_sft.py --workdir workdirs/prefix
    python -m ftjax.main --config configs/prefix_sft.py:num_virtual_tokens=20,projection=True ...

The defaults are the setting of the learning check (`experiments/peft_methods/`: 10 slots,
learning rate 0.03, 1000 steps); `base=False` starts from a random model instead. Generation
goes through the method's apply_fn (the trainer's held-out exact match does this). Prefix params
cannot be merged (export.hf_dir must stay empty).
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("prefix_tuning")  # every setting, documented in ftjax/peft/prompt.py
    # This config uses 10 slots (the method's default is 20).
    arg = common.parse_arg(arg, num_virtual_tokens=10, projection=d.projection,
                           projection_hidden=d.projection_hidden, base=True, tasks="dmy2iso",
                           steps=1000)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = d
    c.peft.update(dict(num_virtual_tokens=arg.num_virtual_tokens, projection=arg.projection,
                       projection_hidden=arg.projection_hidden))
    c.optimizer.learning_rate = 3e-2
    return c
