"""LoRA fine-tuning on the built-in synthetic suite (or, with init_from=hf:DIR, a real model).

    python -m ftjax.main --config configs/lora_sft.py:rank=16 --workdir workdirs/lora
    python -m ftjax.main --config configs/lora_sft.py --workdir workdirs/lora \
        --config.model.init_from=hf:/path/to/llama --config.export.hf_dir=workdirs/lora/merged
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults
from ftjax.train import param_groups


def get_config(arg=None):
    d = method_defaults("lora")  # every LoRA setting, documented in ftjax/peft/lora.py
    arg = common.parse_arg(arg, rank=d.rank, alpha=d.alpha, rslora=d.rslora, init=d.init,
                           tasks="add+reverse", steps=300, loraplus_ratio=0.0)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = d
    c.peft.update(dict(rank=arg.rank, alpha=arg.alpha, rslora=arg.rslora, init=arg.init))
    c.optimizer.learning_rate = 3e-3
    if arg.loraplus_ratio:  # LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A
        c.optimizer.param_groups = param_groups.loraplus(arg.loraplus_ratio)
    return c
