"""QLoRA: LoRA over an NF4, int8 or float32 base, on the quickstart task.

The same LoRA (rank 8, the quickstart's learning rate 1e-3, 150 steps) on the shipped
quickstart base stored three ways: float32 (plain LoRA), int8 (per-channel) and NF4 (64-value
blocks, double-quantized scales, as QLoRA). Held-out exact match and loss after fine-tuning,
forgetting on a pretraining task, step time and peak memory.

    python -m ftjax.sweep run experiments/qlora_quant --procs 2
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "qlora_quant"
    c.base = "configs/quickstart.py:peft=qlora"
    c.metrics_file = "finetune/metrics.jsonl"
    c.overrides = ("train.progress=False", "train.tensorboard=False", "data.eval_examples=200",
                   "data.other_eval_examples=100", "peft.rank=8")
    c.metrics = (("em", "exact_match_after"), ("eval_loss", "final_eval_loss"),
                 ("format_after", "other_tasks.format.after"),
                 ("step_s", "step_time_median_s"), ("peak_rss_mb", "peak_rss_mb"))
    c.analysis = dict(
        title="QLoRA base precision: NF4 vs int8 vs float32 (quickstart task)",
        description=("LoRA rank 8 for 150 steps over the quickstart base held as float32 "
                     "(method lora), int8 or NF4 (method qlora). Held-out exact match on 200 "
                     "prompts and held-out loss after fine-tuning; exact match on the "
                     "pretraining task `format` after (forgetting); median step time and peak "
                     "RSS of each run (two runs shared the 2-core CPU). 3 seeds."),
        columns=("label.base",),
        fmt={"em": "pct", "format_after": "pct", "eval_loss": ".4f", "step_s": ".3f",
             "peak_rss_mb": ".0f"},
        plots=(dict(axis="label.base", metric="eval_loss", file="eval_loss_by_base.png"),),
        curves=dict(split="finetune", key="loss"),
    )
    return c


def get_sweep(h):
    return h.product([
        h.variants("base", {"float32": {"peft.method": "lora"},
                            "int8": {"peft.quant": "int8"},
                            "nf4": {"peft.quant": "nf4"}}),
        h.seeds([0, 1, 2])])
