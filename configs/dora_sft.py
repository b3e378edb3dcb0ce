"""DoRA fine-tuning on the built-in synthetic suite (or, with init_from=hf:DIR, a real model).

    python -m ftjax.main --config configs/dora_sft.py:rank=16 --workdir workdirs/dora

DoRA (ftjax/peft/dora.py) trains LoRA factors on the direction and a magnitude per output
column; defaults follow LoRA's (rank 8, alpha 16, every attention and MLP projection).
"""
import ml_collections

from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft.lora import DEFAULT_TARGETS


def get_config(arg=None):
    arg = common.parse_arg(arg, rank=8, alpha=16.0, rslora=False, init="default",
                           tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = ml_collections.ConfigDict(dict(
        method="dora", rank=arg.rank, alpha=arg.alpha, rslora=arg.rslora,
        init=arg.init,                      # default | gaussian | pissa
        targets=tuple(DEFAULT_TARGETS),     # regexes over param paths (full match)
        rank_pattern={}, alpha_pattern={},  # {regex: value} per-path overrides
        train_patterns=(),                  # plain leaves that also train (e.g. "lm_head/.*")
    ))
    c.optimizer.learning_rate = 3e-3
    return c
