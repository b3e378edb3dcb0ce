"""Preference objectives: DPO's beta, and DPO vs ORPO vs SimPO vs KTO, on synthetic pairs.

The shipped quickstart base, LoRA (the configs' defaults: rank 8, lr 2e-3, 200 steps), on
`dmy2iso` preference data: chosen = the correct answer, rejected = one character changed
(KTO sees the same examples unpaired, half desirable). Measured on 400 held-out pairs:
`logps_acc`, the share where the policy itself gives the chosen answer the higher
log-likelihood (comparable across objectives, with or without a reference), and for the
DPO-family trainer the greedy exact match on held-out prompts. 3 seeds each.

    python -m ftjax.sweep run experiments/preference --procs 2
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.name = "preference"
    c.base = "configs/dpo_synthetic.py"
    c.overrides = ("train.progress=False", "train.tensorboard=False")
    c.metrics = (("logps_acc", "after.eval_logps_accuracy"), ("em", "after.exact_match"),
                 ("reward_acc", "after.eval_accuracy"),
                 ("logps_acc_before", "before.eval_logps_accuracy"))
    c.analysis = dict(
        title="Preference objectives on synthetic pairs (quickstart base, LoRA, 200 steps)",
        description=("`logps_acc`: held-out pairs where log p(chosen) > log p(rejected) under "
                     "the trained policy; `reward_acc`: the trainer's own reward accuracy "
                     "(implicit reward for DPO/KTO, log-odds for ORPO, length-normalised "
                     "log p for SimPO; not comparable across objectives); `em`: greedy exact "
                     "match on 100 held-out prompts (DPO-family trainer only). 3 seeds."),
        columns=("label.objective",), objective="logps_acc", direction="max",
        fmt={"logps_acc": "pct", "em": "pct", "reward_acc": "pct", "logps_acc_before": "pct"},
        plots=(dict(axis="label.objective", metric="logps_acc", file="logps_acc.png"),),
        curves=dict(split="train", key="loss"),
    )
    return c


def get_sweep(h):
    return h.product([
        h.variants("objective", {
            "dpo_beta0.05": {"arg.loss": "sigmoid", "arg.beta": 0.05},
            "dpo_beta0.1": {"arg.loss": "sigmoid", "arg.beta": 0.1},
            "dpo_beta0.5": {"arg.loss": "sigmoid", "arg.beta": 0.5},
            "orpo": {"arg.loss": "orpo", "arg.beta": 0.1},
            "simpo": {"arg.loss": "simpo", "arg.beta": 2.0},
            "kto": {"base": "configs/kto_synthetic.py", "arg.beta": 0.1},
        }),
        h.seeds([0, 1, 2])])
