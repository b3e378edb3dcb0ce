"""Prompt tuning (Lester et al. 2021) on the built-in synthetic suite: only n virtual-token
embeddings prepended to every sequence train.

    python -m ftjax.main --config configs/prompt_sft.py:num_virtual_tokens=20,init=text \
        --workdir workdirs/prompt

Generation must go through the method's apply_fn (`generate(..., apply_fn=method.apply_fn)`);
`ftjax.infer.generate.generate` on these params would ignore the prompt, so the trainer's
held-out exact-match (which calls it) is off here (data.eval_examples=0).
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("prompt_tuning")  # every setting, documented in ftjax/peft/prompt.py
    arg = common.parse_arg(arg, num_virtual_tokens=d.num_virtual_tokens, init=d.init,
                           init_text="Answer the task:", tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = d
    # init_text (init=text) is tokenized with the run's own tokenizer.
    c.peft.update(dict(num_virtual_tokens=arg.num_virtual_tokens, init=arg.init,
                       init_text=arg.init_text))
    c.optimizer.learning_rate = 3e-2  # prompt tuning wants large rates (Lester et al.: 0.3)
    # Real tokens sit at positions n.. after the prompt (learned position tables need room).
    c.model.max_position_embeddings = max(c.model.max_position_embeddings,
                                          c.train.seq_len + arg.num_virtual_tokens)
    c.data.eval_examples = 0
    return c
