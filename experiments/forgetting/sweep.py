"""Forgetting on sequential tasks: full fine-tuning vs LoRA vs Half Fine-Tuning vs replay.

Task sequence: the quickstart base learned five pretraining tasks; it is then fine-tuned on
the unseen `dmy2iso` for 300 steps. Forgetting is the drop in exact match on two of the
earlier tasks (`format`, `reverse`) from before to after. The survey claims HFT (half of
each block's parameters frozen per round) limits forgetting; rehearsal (20% of each batch
replayed from the earlier tasks) is the classic baseline. 3 seeds each, one learning rate per
method (the quickstart's).

    python -m ftjax.sweep run experiments/forgetting --procs 2
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "forgetting"
    c.base = "configs/quickstart.py:steps=300"
    c.metrics_file = "finetune/metrics.jsonl"
    c.overrides = ("train.progress=False", "train.tensorboard=False", "data.eval_examples=100",
                   "data.other_eval_examples=100")
    c.metrics = (("new_task_em", "exact_match_after"),
                 ("format_before", "other_tasks.format.before"),
                 ("format_after", "other_tasks.format.after"),
                 ("reverse_before", "other_tasks.reverse.before"),
                 ("reverse_after", "other_tasks.reverse.after"))
    c.analysis = dict(
        title="Forgetting after 300 steps on a new task: full vs LoRA vs HFT vs replay",
        description=("Exact match on the new task `dmy2iso` (100 held-out prompts) and on two "
                     "earlier tasks (100 held-out prompts each) before and after fine-tuning; "
                     "the drop is forgetting. 3 seeds each."),
        columns=("label.method",),
        fmt={k: "pct" for k in ("new_task_em", "format_before", "format_after",
                                "reverse_before", "reverse_after")},
        plots=(dict(axis="label.method", metric="format_after", file="format_after.png"),
               dict(axis="label.method", metric="reverse_after", file="reverse_after.png")),
        curves=dict(split="finetune", key="loss"),
    )
    return c


def get_sweep(h):
    return h.product([
        h.variants("method", {
            "full": {"arg.peft": "full", "data.replay_frac": 0.0},
            "lora": {"arg.peft": "lora", "data.replay_frac": 0.0},
            "hft": {"arg.peft": "hft", "data.replay_frac": 0.0},
            "full+replay": {"arg.peft": "full", "data.replay_frac": 0.2},
        }),
        h.seeds([0, 1, 2])])
