"""Rejection-sampling fine-tuning (trainer "rft") of the quickstart base on `add`, the
pretraining task it gets wrong most often (83% held-out exact match): each step it samples 4
answers (temperature 0.7) to 32 training prompts, keeps a correct one per prompt, and trains
on those.

    python -m ftjax.main --config configs/rft_synthetic.py --workdir /tmp/rft
    python -m ftjax.main --config configs/rft_synthetic.py:tasks=add+sort,steps=100 ...
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model
from ftjax.trainers.rft import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="add", steps=100, peft="full", temperature=0.7)
    c = common.base(trainer="rft")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE  # relative paths resolve against the ftjax root
    c.optimizer = common.optimizer("adamw", learning_rate=3e-4,
                                   warmup_steps=common.warmup(5, arg.steps),
                                   weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=20, checkpoint_every=20, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(tasks=tuple(arg.tasks.split("+")), n_per_task=2000,
                                            seed=0, test_frac=0.2, eval_examples=200,
                                            max_new_tokens=16))
    c.rft = ml_collections.ConfigDict(dict(DEFAULTS["rft"], temperature=arg.temperature))
    if arg.peft != "full":
        from configs.quickstart import peft_section
        c.peft = peft_section(arg.peft, arg.steps)
    return c
