"""A small Mixtral-style sparse MoE trained from scratch on the built-in synthetic suite.

    python -m ftjax.main --config configs/moe_sft.py --workdir workdirs/moe
    python -m ftjax.main --config configs/moe_sft.py:dispatch=capacity,capacity_factor=1.0 ...
    python -m ftjax.main --config configs/moe_sft.py:peft=lora --workdir workdirs/moe_lora
    python -m ftjax.main --config configs/moe_sft.py:ep=4 --workdir workdirs/moe_ep  # 4 | devices

Typed arguments: dispatch (dropless | capacity), experts, top_k, shared (shared experts),
aux (load-balancing loss weight), peft (none | lora: LoRA on attention and on every expert's
gate/up/down kernels), ep (expert-parallel degree: mesh.expert=ep with the "ep" rules).
Routing metrics (per-layer expert load, dropped fraction, router entropy) land in
metrics.jsonl and TensorBoard under moe/...; see docs/moe.md.
"""

from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults
from ftjax.peft.lora import EXPERT_TARGETS

TARGETS = (r"layers/attn/(q|k|v|o)_proj/kernel",) + EXPERT_TARGETS


def get_config(arg=None):
    arg = common.parse_arg(arg, dispatch="dropless", capacity_factor=1.25, experts=8, top_k=2,
                           shared=0, aux=0.02, peft="none", ep=1, tasks="add+reverse",
                           steps=300)
    if arg.dispatch not in ("dropless", "capacity"):
        raise ValueError(f"moe_sft.py: dispatch={arg.dispatch!r}; choose dropless or capacity")
    if arg.peft not in ("none", "lora"):
        raise ValueError(f"moe_sft.py: peft={arg.peft!r}; choose none or lora")
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.model = common.model(
        "mixtral", vocab_size=99, hidden_size=128, intermediate_size=352, num_layers=4,
        num_heads=4, num_kv_heads=2, max_position_embeddings=128,
        num_experts=arg.experts, num_experts_per_tok=arg.top_k, expert_intermediate_size=128,
        num_shared_experts=arg.shared, moe_dispatch=arg.dispatch,
        capacity_factor=arg.capacity_factor, router_aux_loss_coef=arg.aux,
        router_z_loss_coef=1e-3)
    c.mesh.expert = 1  # so --config.mesh.expert=N works; "ep" rules shard experts over it
    if arg.ep > 1:
        c.mesh.expert = arg.ep
        c.sharding.rules = "ep"
    if arg.peft == "lora":
        c.peft = method_defaults("lora")
        c.peft.update(dict(
            targets=TARGETS,                    # attention + stacked experts [L, E, in, out]
            train_patterns=(r"layers/moe/router/kernel",),  # the router trains in full
        ))
        c.optimizer.learning_rate = 3e-3
    return c
