"""LoRA fine-tuning on the built-in synthetic suite (or, with init_from=hf:DIR, a real model).

    python -m ftjax.main --config configs/lora_sft.py:rank=16 --workdir workdirs/lora
    python -m ftjax.main --config configs/lora_sft.py --workdir workdirs/lora \
        --config.model.init_from=hf:/path/to/llama --config.export.hf_dir=workdirs/lora/merged
"""
import ml_collections

from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft.lora import DEFAULT_TARGETS
from ftjax.train import param_groups


def get_config(arg=None):
    arg = common.parse_arg(arg, rank=8, alpha=16.0, rslora=False, init="default",
                           tasks="add+reverse", steps=300, loraplus_ratio=0.0)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = ml_collections.ConfigDict(dict(
        method="lora", rank=arg.rank, alpha=arg.alpha, rslora=arg.rslora, init=arg.init,
        dropout=0.0,                        # LoRA dropout on the adapter input (training only)
        targets=tuple(DEFAULT_TARGETS),     # regexes over param paths (full match)
        rank_pattern={}, alpha_pattern={},  # {regex: value} per-path overrides
        train_patterns=(),                  # plain leaves that also train (e.g. "lm_head/.*")
    ))
    c.optimizer.learning_rate = 3e-3
    if arg.loraplus_ratio:  # LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A
        c.optimizer.param_groups = param_groups.loraplus(arg.loraplus_ratio)
    return c
