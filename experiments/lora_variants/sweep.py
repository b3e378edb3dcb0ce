"""LoRA rank x alpha x variant (plain, rsLoRA, LoRA+, PiSSA) on the quickstart task.

The shipped quickstart base fine-tuned with LoRA on the unseen `dmy2iso` task for 100 steps
(few enough that the variants can differ) at one learning rate, 3 seeds per cell; held-out
exact match and final held-out loss. rsLoRA scales by alpha/sqrt(r) instead of alpha/r,
LoRA+ trains B at 16x the learning rate of A, PiSSA starts A, B from the top-r SVD of W.

    python -m ftjax.sweep run experiments/lora_variants --procs 2
"""
import ml_collections

VARIANTS = {
    "lora": {},
    "rslora": {"peft.rslora": True},
    "loraplus": {"optimizer.param_groups": ((".*/b", 16.0),)},
    "pissa": {"peft.init": "pissa"},
}


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "lora_variants"
    c.base = "configs/quickstart.py:peft=lora,steps=100"
    c.metrics_file = "finetune/metrics.jsonl"
    c.overrides = ("train.progress=False", "train.tensorboard=False", "data.eval_examples=100",
                   "data.other_eval_examples=50", "optimizer.learning_rate=0.002")
    c.metrics = (("em", "exact_match_after"), ("eval_loss", "final_eval_loss"),
                 ("format_after", "other_tasks.format.after"))
    c.analysis = dict(
        title="LoRA rank x alpha x variant (quickstart task, 100 steps, lr 2e-3)",
        description=("Held-out exact match (100 prompts) and final held-out loss after 100 "
                     "LoRA steps on `dmy2iso`; forgetting as exact match on the pretraining "
                     "task `format` (50 prompts). 3 seeds per cell; learning rate fixed at "
                     "2e-3 for every cell (chosen before the sweep, not tuned per cell)."),
        group_by=("label.variant",), objective="eval_loss", direction="min",
        columns=("label.variant", "peft.rank", "peft.alpha"),
        fmt={"em": "pct", "format_after": "pct", "eval_loss": ".4f"},
        plots=(dict(axis="peft.rank", metric="eval_loss", series_by=("label.variant",),
                    file="eval_loss_vs_rank.png"),
               dict(axis="peft.alpha", metric="eval_loss", series_by=("label.variant",),
                    file="eval_loss_vs_alpha.png")),
        curves=dict(split="finetune", key="loss", label_by=("label.variant",)),
    )
    return c


def get_sweep(h):
    return h.product([h.variants("variant", VARIANTS), h.sweep("peft.rank", [4, 16]),
                      h.sweep("peft.alpha", [8.0, 32.0]), h.seeds([0, 1, 2])])
