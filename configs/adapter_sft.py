"""Bottleneck-adapter fine-tuning (Houlsby et al. 2019 serial; He et al. 2022 parallel) of the
quickstart base on the unseen task `dmy2iso` (`base=False`: over a random model).

    python -m ftjax.main --config configs/adapter_sft.py:bottleneck=32,mode=parallel \\
        --workdir workdirs/adapter

Adapters are nonlinear and cannot be merged, so `export.hf_dir` must stay empty.
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("adapter")  # every setting, documented in ftjax/peft/adapters.py
    # This config's bottleneck is 16 (the method's default is 64).
    arg = common.parse_arg(arg, bottleneck=16, mode=d.mode, activation=d.activation,
                           scale=d.scale, base=True, tasks="dmy2iso", steps=150)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = d
    c.peft.update(dict(bottleneck=arg.bottleneck, mode=arg.mode, activation=arg.activation,
                       scale=arg.scale))
    c.optimizer.learning_rate = 3e-3
    return c
