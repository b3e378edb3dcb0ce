"""RLOO (trainer "rloo") of the quickstart base on `add`: 16 prompts x 4 samples per step,
reward = exact match + 0.2 x format - 0.05 x KL.

    python -m ftjax.main --config configs/rloo_synthetic.py --workdir /tmp/rloo
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from ftjax.trainers.rloo import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="add", steps=200, peft="full", beta=0.05, lr=0.0, mu=1)
    c = common.base(trainer="rloo")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE
    lr = arg.lr or (3e-4 if arg.peft == "full" else 1e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(5, arg.steps), weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=64, seq_len=48, log_every=10,
                           eval_every=0, checkpoint_every=20 * arg.mu, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(tasks=tuple(arg.tasks.split("+")), n_per_task=8000,
                                            seed=0, test_frac=0.2, eval_examples=200,
                                            max_new_tokens=16))
    c.rloo = ml_collections.ConfigDict(dict(DEFAULTS["rloo"], beta=arg.beta,
                                            num_iterations=arg.mu))
    if arg.peft != "full":
        c.peft = peft_section(arg.peft, arg.steps)
    return c
