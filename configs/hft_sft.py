"""Half Fine-Tuning (HFT, Hui et al. 2024) of the quickstart base on the unseen task `dmy2iso`:
full fine-tuning in which half of every block's matrices is frozen in each round, re-drawn every
round (`base=False`: over a random model).

    python -m ftjax.main --config configs/hft_sft.py:rounds=3 --workdir workdirs/hft
    python -m ftjax.main --config configs/hft_sft.py:granularity=layer --workdir ...

`rounds` sets peft.steps_per_round = ceil(steps / rounds) (rounds=1: one draw for the run, as
for one stage of the paper's multi-stage use; change peft.seed for the next stage). If you
override --config.train.steps, override --config.peft.steps_per_round with it.
"""
import math

from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    arg = common.parse_arg(arg, rounds=3, granularity="category", seed=0, base=True,
                           tasks="dmy2iso", steps=150)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = method_defaults("hft")  # every HFT setting, documented in ftjax/peft/hft.py
    c.peft.update(dict(
        seed=arg.seed,                              # the draw of each round is f(round, seed)
        steps_per_round=math.ceil(arg.steps / max(arg.rounds, 1)),  # 0 = one draw for the run
        granularity=arg.granularity,                # category | layer | model
        train_patterns=(".*",),                     # outside the categories everything trains
    ))
    c.optimizer.param_groups = ()                   # e.g. ((r"embed/.*", None),) to also freeze
    return c
