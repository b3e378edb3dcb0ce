"""Sparse upcycling: the quickstart base becomes a 4-expert top-2 MoE, fine-tuned on a new task.

    python -m ftjax.main --config configs/upcycle_sft.py --workdir /tmp/upcycle
    python -m ftjax.main --config configs/upcycle_sft.py:experts=8,dispatch=capacity ...
    python -m ftjax.main --config configs/upcycle_sft.py:experts=0 ...   # the dense baseline
    python -m ftjax.main --config configs/upcycle_sft.py:peft=lora ...   # LoRA on attn + experts

The shipped dense base (`experiments/quickstart_base/model.safetensors`) is loaded, each MLP is
copied into `experts` experts with a fresh router (`model.upcycle`, ftjax/models/upcycle.py),
and the whole MoE is fine-tuned with the sft trainer. The upcycled model starts with exactly the
base's eval loss (measured figures: docs/moe.md, "Sparse upcycling").
"""

import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model
from ftjax.models import upcycle
from ftjax.peft import method_defaults
from ftjax.peft.lora import EXPERT_TARGETS

# The attention projections and the stacked expert kernels (LoRA on experts).
LORA_TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel",) + EXPERT_TARGETS


def get_config(arg=None):
    arg = common.parse_arg(arg, experts=4, top_k=2, dispatch="dropless", noise=0.0,
                           task="dmy2iso", steps=150, peft="full", lr=0.0)
    c = common.base(trainer="sft")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE  # relative paths resolve against the repository root
    c.model.upcycle = upcycle.section(
        num_experts=arg.experts,     # 0 = train the dense base as it is (baseline)
        top_k=arg.top_k,
        noise_std=arg.noise,
        dispatch=arg.dispatch,
        capacity_factor=2.0,         # capacity: C = ceil(2 * T * k / E) slots per sequence
        aux_loss_coef=0.01,
    )
    lr = arg.lr or (1e-3 if arg.peft == "full" else 3e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(10, arg.steps),
                                   weight_decay=0.01)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=25, checkpoint_every=0, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(tasks=(arg.task,), n_per_task=2000, seed=0,
                                            test_frac=0.2, eval_examples=200,
                                            max_new_tokens=16))
    if arg.peft == "lora":
        c.peft = method_defaults("lora")
        c.peft.update(dict(
            targets=LORA_TARGETS,
            train_patterns=(r"layers/moe/router/kernel",),  # the new router trains in full
        ))
    elif arg.peft != "full":
        raise ValueError(f"peft={arg.peft!r}: choose full or lora")
    return c
