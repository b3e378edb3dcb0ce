"""Reward model (trainer "reward") from the quickstart base on synthetic preference pairs:
prompt -> the correct answer (chosen) vs a corrupted one (rejected: one letter/digit changed).

    python -m ftjax.main --config configs/reward_synthetic.py --workdir /tmp/rm
    python -m ftjax.main --config configs/reward_synthetic.py:tasks=add,peft=lora ...

The trained model is written to <workdir>/reward_model as a transformers
*ForSequenceClassification directory (one label); `configs/ppo_synthetic.py` uses it.
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from ftjax.trainers.reward import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="dmy2iso", steps=500, peft="lora", corruption="perturb",
                           lr=0.0, center=0.0)
    c = common.base(trainer="reward")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE  # relative paths resolve against the repository root
    lr = arg.lr or (5e-4 if arg.peft == "full" else 3e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(10, arg.steps), weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=50, checkpoint_every=0, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(
        source="",                  # "" = synthetic pairs; data.source=... for preference files
        tasks=tuple(arg.tasks.split("+")), n_per_task=2000, seed=0, test_frac=0.2,
        corruption=arg.corruption,  # perturb | truncate | mismatch
    ))
    c.reward = ml_collections.ConfigDict(dict(DEFAULTS["reward"],
                                              center_rewards_coefficient=arg.center))
    if arg.peft != "full":
        c.peft = peft_section(arg.peft, arg.steps)
    return c
