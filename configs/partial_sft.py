"""Partial fine-tuning by param groups (which params train, and how fast; big_vision style) of
the quickstart base on the unseen task `dmy2iso` (`base=False`: over a random model).

    python -m ftjax.main --config configs/partial_sft.py:part=head --workdir workdirs/head
    python -m ftjax.main --config configs/partial_sft.py:part=norms --workdir workdirs/norms
    python -m ftjax.main --config configs/partial_sft.py:part=last,n=2 --workdir workdirs/last2
    python -m ftjax.main --config configs/partial_sft.py:part=loraplus,ratio=16 --workdir ...

`optimizer.param_groups` is a tuple of (regex, spec) over param paths; the first full match
wins and unmatched params keep multiplier 1. spec: None = frozen, a number = learning-rate
multiplier, dict(layers=(start, stop), lr=m) = only those slices of the stacked [L, ...]
layer params train (see ftjax/train/param_groups.py). Fork this file for your own split.
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.train import param_groups

PARTS = ("head", "norms", "last", "loraplus")


def get_config(arg=None):
    arg = common.parse_arg(arg, part="last", n=2, ratio=16.0, base=True, tasks="dmy2iso",
                           steps=150)
    if arg.part not in PARTS:
        raise ValueError(f"partial_sft: part={arg.part!r}; choose one of {PARTS}")
    if arg.part == "loraplus":
        # LoRA+ (Hayou et al. 2024): LoRA whose B factors train at `ratio` x the learning rate.
        from configs.lora_sft import get_config as lora_config
        c = lora_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps, base=arg.base))
        c.optimizer.param_groups = param_groups.loraplus(arg.ratio)
        return c
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft.train_patterns = (".*",)
    if arg.part == "head":       # a new task head on a frozen body
        groups = ((r"lm_head/.*", 1.0), (r".*", None))
    elif arg.part == "norms":    # norm scales only (a few thousand params)
        groups = ((r".*norm/.*", 1.0), (r".*", None))
    else:                        # the top n blocks, the final norm and the head
        groups = (param_groups.last_layers(arg.n)
                  + ((r"final_norm/.*", 1.0), (r"lm_head/.*", 1.0), (r".*", None)))
    c.optimizer.param_groups = groups
    c.optimizer.learning_rate = 3e-3
    return c
