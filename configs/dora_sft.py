"""DoRA fine-tuning of the quickstart base on the unseen task `dmy2iso` (or, with
init_from=hf:DIR, of a real model; `base=False`: over a random model).

    python -m ftjax.main --config configs/dora_sft.py:rank=16 --workdir workdirs/dora

DoRA (ftjax/peft/dora.py) trains LoRA factors on the direction and a magnitude per output
column; defaults follow LoRA's (rank 8, alpha 16, every attention and MLP projection).
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("dora")  # every DoRA setting, documented in ftjax/peft/dora.py
    arg = common.parse_arg(arg, rank=d.rank, alpha=d.alpha, rslora=d.rslora, init=d.init,
                           base=True, tasks="dmy2iso", steps=150)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = d
    c.peft.update(dict(rank=arg.rank, alpha=arg.alpha, rslora=arg.rslora, init=arg.init))
    c.optimizer.learning_rate = 3e-3
    return c
