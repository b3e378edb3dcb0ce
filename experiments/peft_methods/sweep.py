"""Every PEFT method on the quickstart task, under the honest protocol.

Each method fine-tunes the shipped quickstart base on the unseen `dmy2iso` task. Stage
`select`: every method with each of its candidate learning rates, seed 0, scored on a
validation split carved from the training prompts (`data.val_frac=0.1`); the test split is not
scored (`data.score_test=False`). Stage `final`: each method's learning rate with the best
validation exact match, seeds 0, 1, 2, scored once on the held-out test prompts and on two
pretraining tasks (forgetting). Methods with few trainable parameters get more steps (their
step count is part of the method, not tuned).

    python -m ftjax.sweep run experiments/peft_methods --procs 2
"""
import ml_collections

# method -> (steps, candidate learning rates)
METHODS = {
    "full": (150, (1e-3, 3e-3)),
    "lora": (150, (3e-3, 1e-2)),
    "dora": (150, (3e-3, 1e-2)),
    "qlora": (150, (3e-3, 1e-2)),
    "adapter": (150, (3e-3, 1e-2)),
    "hft": (150, (1e-3, 3e-3)),
    "ia3": (400, (2e-2, 5e-2)),
    "vera": (300, (2e-2, 5e-2)),
    "prompt_tuning": (400, (1e-1, 3e-1)),
    "prefix_tuning": (400, (1e-2, 3e-2)),
}
# Fields beyond a method's defaults: prompt tuning learns nothing here with 20 random virtual
# tokens; 50 tokens initialised from vocabulary embeddings do.
EXTRA = {"prompt_tuning": {"peft.num_virtual_tokens": 50, "peft.init": "vocab"}}


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "peft_methods"
    c.base = "configs/quickstart.py"
    c.metrics_file = "finetune/metrics.jsonl"
    c.overrides = ("train.progress=False", "train.tensorboard=False", "data.val_frac=0.1",
                   "data.score_test=False", "data.eval_examples=100",
                   "data.other_eval_examples=100")
    c.metrics = (("test_em", "exact_match_after"), ("val_em", "val_exact_match_after"),
                 ("val_loss", "final_eval_loss"),  # the in-training eval split: validation
                 ("format_after", "other_tasks.format.after"),
                 ("reverse_after", "other_tasks.reverse.after"),
                 ("trainable", "trainable_params"), ("step_s", "step_time_median_s"),
                 ("wall_s", "record.wall_s"))
    c.select = dict(objective="val_em", direction="max", group_by=("arg.peft",),
                    seeds=(0, 1, 2), overrides=("data.score_test=True",),
                    tiebreak="val_loss", tiebreak_direction="min")
    c.analysis = dict(
        title="PEFT methods on the quickstart task (learning rate chosen on validation)",
        description=("Quickstart base fine-tuned on the unseen `dmy2iso` task; test exact match "
                     "on 200 held-out prompts, forgetting as exact match on two pretraining "
                     "tasks (100 prompts each) after fine-tuning. 2-core CPU; step times are "
                     "wall-clock medians with two runs sharing the machine."),
        fmt={"val_loss": ".4f", "val_em": "pct", "test_em": "pct", "format_after": "pct", "reverse_after": "pct",
             "trainable": ".0f", "step_s": ".3f", "wall_s": ".0f"},
        plots=(dict(axis="arg.peft", metric="test_em", series_by=(), file="test_em_by_method.png"),),
        curves=dict(split="finetune", key="loss", label_by=("arg.peft",)),
    )
    return c


def get_sweep(h):
    return h.chain([
        h.product([h.fixed("arg.peft", method), h.fixed("arg.steps", steps),
                   *[h.fixed(k, v) for k, v in EXTRA.get(method, {}).items()],
                   h.sweep("optimizer.learning_rate", lrs), h.seeds([0])])
        for method, (steps, lrs) in METHODS.items()])
