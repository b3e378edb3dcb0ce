"""Dense vs sparsely upcycled MoE: the quickstart base fine-tuned as it is, or as a 4-expert
top-2 MoE whose experts start as copies of its MLP (ftjax/models/upcycle.py).

Both fine-tune all weights on the unseen `dmy2iso` task for 40 steps (lr 1e-3: at 150 steps
both reach 100% and the comparison says nothing); held-out exact match on 200 prompts, final
held-out loss and wall time. 3 seeds.

    python -m ftjax.sweep run experiments/moe_upcycle --procs 2
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "moe_upcycle"
    c.base = "configs/upcycle_sft.py:steps=40"
    c.overrides = ("train.progress=False", "train.tensorboard=False", "train.eval_every=10")
    c.metrics = {"em": "exact_match", "eval_loss": "evals.-1.eval_loss",
                 "final_loss": "final_loss", "wall_s": "record.wall_s"}
    c.analysis = dict(
        title="Dense vs upcycled MoE (quickstart base, full fine-tuning, 40 steps)",
        description=("The dense base and its 4-expert top-2 upcycled MoE (dropless), same "
                     "data, steps and learning rate; held-out exact match on 200 prompts and "
                     "final held-out loss. 3 seeds."),
        columns=("label.model",),
        fmt={"em": "pct", "eval_loss": ".4f", "final_loss": ".4f", "wall_s": ".0f"},
        plots=(dict(axis="label.model", metric="eval_loss", file="eval_loss.png"),),
        curves=dict(split="train", key="loss", eval_split="train_eval", eval_key="eval_loss"),
    )
    return c


def get_sweep(h):
    return h.product([h.variants("model", {"dense": {"arg.experts": 0},
                                           "moe4_top2": {"arg.experts": 4}}),
                      h.seeds([0, 1, 2])])
