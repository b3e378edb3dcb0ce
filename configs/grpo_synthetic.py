"""GRPO (trainer "grpo") of the quickstart base on `add` with verifiable rewards: 16 prompts x 8
samples per step, reward = exact match + 0.2 x format, 400 steps over 6,400 training prompts.

    python -m ftjax.main --config configs/grpo_synthetic.py --workdir /tmp/grpo
    python -m ftjax.main --config configs/grpo_synthetic.py:loss=dr_grpo,scale=none ...  # Dr. GRPO
    python -m ftjax.main --config configs/grpo_synthetic.py:beta=0.04,mu=2 ...
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from ftjax.trainers.grpo import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="add", steps=400, peft="full", loss="dapo", scale="group",
                           beta=0.0, mu=1, lr=0.0, temperature=1.0, prompts=16, group=8)
    c = common.base(trainer="grpo")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE
    lr = arg.lr or (3e-4 if arg.peft == "full" else 1e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(5, arg.steps), weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=arg.prompts * arg.group, seq_len=48,
                           log_every=10,
                           eval_every=0, checkpoint_every=20 * arg.mu, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(tasks=tuple(arg.tasks.split("+")), n_per_task=8000,
                                            seed=0, test_frac=0.2, eval_examples=200,
                                            max_new_tokens=16))
    c.grpo = ml_collections.ConfigDict(dict(DEFAULTS["grpo"], loss_type=arg.loss,
                                            scale_rewards=arg.scale, beta=arg.beta,
                                            num_iterations=arg.mu,
                                            temperature=arg.temperature,
                                            prompts_per_step=arg.prompts, group_size=arg.group))
    if arg.peft != "full":
        c.peft = peft_section(arg.peft, arg.steps)
    return c
