"""Memory tuning: memory experts teach the quickstart base the whole fictional fact table.

    python -m ftjax.main --config configs/memory_tuning.py --workdir workdirs/memory
    python -m ftjax.main --config configs/memory_tuning.py:num_experts=512,top_k=2 --workdir ...
    python -m ftjax.main --config configs/memory_tuning.py:method=lora --workdir ...  # ablation

The shipped quickstart base (`configs.quickstart`) is frozen; a bank of `num_experts` rank-
`rank` memory experts on the MLP down-projection of `layers`, `top_k` of them routed per token
(`ftjax/peft/memory.py`), trains on all 192 facts of `fact_table()` plus a replay share of the
other pretraining tasks. The trainer (`ftjax/trainers/memory_tuning.py`) reports exact recall of
every fact and the held-out loss of the other tasks before and after (`summary.json`).
See docs/memory_experts.md and experiments/memory_tuning/results.md.
"""
import ml_collections

from configs import common
from configs import quickstart as qs
from ftjax.peft import memory
from ftjax.peft.lora import DEFAULT_TARGETS as LORA_TARGETS


def peft_section(arg) -> ml_collections.ConfigDict:
    """The memory-experts section, or LoRA / full fine-tuning for the ablation."""
    if arg.method == "memory":
        return ml_collections.ConfigDict(dict(
            method="memory", num_experts=arg.num_experts, top_k=arg.top_k, rank=arg.rank,
            alpha=arg.alpha,
            targets=tuple(memory.DEFAULT_TARGETS),  # regexes over param paths (full match)
            layers=tuple(int(i) for i in arg.layers.split("+")) if arg.layers else (),
            null_expert=arg.null_expert,   # a learned "no memory" logit in the gate softmax
            router_std=1.0,                # router init N(0, router_std^2 / in)
            train_patterns=()))
    if arg.method == "lora":
        return ml_collections.ConfigDict(dict(
            method="lora", rank=arg.lora_rank, alpha=2.0 * arg.lora_rank, rslora=False,
            init="default", dropout=0.0, targets=tuple(LORA_TARGETS), rank_pattern={},
            alpha_pattern={}, train_patterns=()))
    if arg.method == "full":
        return common.base().peft
    raise ValueError(f"method={arg.method!r}: choose memory, lora or full")


def get_config(arg=None):
    arg = common.parse_arg(arg, method="memory", steps=300, num_experts=256, top_k=4, rank=4,
                           alpha=8.0, layers="1+2+3", null_expert=True, lr=1e-2,
                           replay_frac=0.5, lora_rank=64)
    c = common.base(trainer="memory_tuning")
    c.model = qs.base_model()
    c.base = qs.base_section()  # the shipped base; base.path= (empty) pretrains one in the run
    c.optimizer = common.optimizer("adamw", learning_rate=arg.lr,
                                   warmup_steps=common.warmup(10, arg.steps),
                                   weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=100, checkpoint_every=0, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(
        seed=0,
        replay_frac=arg.replay_frac,      # share of the training data from replay_tasks
        replay_tasks=("add", "reverse", "sort", "format"),
        other_tasks=("add", "reverse", "sort", "format"),  # held-out loss before/after
        other_loss_examples=128,          # test prompts per other task for the loss
        other_eval_examples=64,           # of those, scored by exact match too (0: none)
        max_new_tokens=16,
        eval_batch_size=64,
    ))
    c.peft = peft_section(arg)
    return c
