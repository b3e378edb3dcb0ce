"""Prompt tuning (Lester et al. 2021) of the quickstart base on the unseen task `dmy2iso`: only
n virtual-token embeddings prepended to every sequence train.

    python -m ftjax.main --config configs/prompt_sft.py --workdir workdirs/prompt
    python -m ftjax.main --config configs/prompt_sft.py:num_virtual_tokens=20,init=text ...

The defaults are the setting of the learning check (`experiments/peft_methods/`: 50 virtual
tokens initialised from vocabulary embeddings, learning rate 0.3, 1000 steps); with few trainable
numbers prompt tuning needs many steps. `base=False` starts from a random model instead.
Generation goes through the method's apply_fn (the trainer's held-out exact match does this).
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("prompt_tuning")  # every setting, documented in ftjax/peft/prompt.py
    arg = common.parse_arg(arg,
                           init_text="Answer the task:", base=True, tasks="dmy2iso",
                           steps=1000, num_virtual_tokens=50, init="vocab")
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = d
    # init_text (init=text) is tokenized with the run's own tokenizer.
    c.peft.update(dict(num_virtual_tokens=arg.num_virtual_tokens, init=arg.init,
                       init_text=arg.init_text))
    c.optimizer.learning_rate = 0.3  # prompt tuning wants large rates (Lester et al.: 0.3)
    if c.model.position == "learned":  # real tokens sit at positions n.. after the prompt
        c.model.max_position_embeddings = max(c.model.max_position_embeddings,
                                              c.train.seq_len + arg.num_virtual_tokens)
    return c
