"""RLHF with PPO (trainer "ppo") on the synthetic `dmy2iso` prompts against a reward model from
the "reward" trainer: the third of three commands (README, "RLHF"):

    python -m ftjax.main --config configs/sft_synthetic.py:init=base,tasks=dmy2iso,steps=150 \\
        --workdir /tmp/rlhf/sft --config.export.hf_dir=/tmp/rlhf/sft_hf
    python -m ftjax.main --config configs/reward_synthetic.py --workdir /tmp/rlhf/rm \\
        --config.model.init_from=hf:/tmp/rlhf/sft_hf
    python -m ftjax.main --config configs/ppo_synthetic.py --workdir /tmp/rlhf/ppo \\
        --config.model.init_from=hf:/tmp/rlhf/sft_hf --config.ppo.reward_model=/tmp/rlhf/rm/reward_model
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from ftjax.trainers.ppo import DEFAULTS


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="dmy2iso", steps=200, peft="lora", kl=0.2, lr=0.0,
                           epochs=4, rm="")
    c = common.base(trainer="ppo")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE
    lr = arg.lr or (3e-5 if arg.peft == "full" else 5e-4)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(4, arg.steps), weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=64, seq_len=48, log_every=8,
                           eval_every=0, checkpoint_every=20 * arg.epochs, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(tasks=tuple(arg.tasks.split("+")), n_per_task=2000,
                                            seed=0, test_frac=0.2, eval_examples=200,
                                            max_new_tokens=16))
    c.ppo = ml_collections.ConfigDict(dict(DEFAULTS["ppo"], kl_coef=arg.kl,
                                           num_ppo_epochs=arg.epochs, reward_model=arg.rm))
    c.peft = peft_section(arg.peft, arg.steps)
    return c
