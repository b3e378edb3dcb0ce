"""Preference fine-tuning (DPO family) of the quickstart base on synthetic preference pairs.

Pairs are built in memory from the synthetic suite: prompt -> the correct answer (chosen) vs a
corrupted one (rejected; `corruption`: perturb = one letter/digit changed, truncate, mismatch).

    python -m ftjax.main --config configs/dpo_synthetic.py --workdir /tmp/dpo
    python -m ftjax.main --config configs/dpo_synthetic.py:loss=ipo,beta=0.5 --workdir ...
    python -m ftjax.main --config configs/dpo_synthetic.py:loss=sigmoid+bco_pair+sft,weights=0.8+0.2+1.0 ...
    python -m ftjax.main --config configs/dpo_synthetic.py:loss=orpo,peft=full ...   # no reference
    python -m ftjax.main --config configs/dpo_synthetic.py:peft=full --workdir ...  # reference precomputed

See docs/alignment.md for the loss types and the reference modes.
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section


def dpo_section(loss: str = "sigmoid", weights: str = "", beta: float = 0.1,
                reference: str = "auto") -> ml_collections.ConfigDict:
    """The preference objective: its defaults (`ftjax/align/objective.py:DEFAULTS`) with the
    typed arguments; every field can be overridden on the command line."""
    from ftjax.align.objective import DEFAULTS
    return ml_collections.ConfigDict(dict(
        DEFAULTS, loss_type=tuple(loss.split("+")),
        loss_weights=tuple(float(w) for w in weights.split("+")) if weights else (),
        beta=beta, reference=reference))


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="dmy2iso", steps=200, peft="lora", loss="sigmoid",
                           weights="", beta=0.1, reference="auto", corruption="perturb", lr=0.0)
    c = common.base(trainer="dpo")
    c.model = base_model()
    c.model.init_from = SHIPPED_BASE  # relative paths resolve against the repository root
    lr = arg.lr or (1e-4 if arg.peft == "full" else 2e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(10, arg.steps),
                                   weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=50, checkpoint_every=0, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(
        source="",                  # "" = synthetic pairs; see configs/dpo_file.py
        tasks=tuple(arg.tasks.split("+")),
        n_per_task=2000,            # distinct prompts per task, split by test_frac
        seed=0,
        test_frac=0.2,
        corruption=arg.corruption,  # perturb | truncate | mismatch
        eval_examples=100,          # greedy exact match on validation prompts before/after
        max_new_tokens=16,
    ))
    c.dpo = dpo_section(arg.loss, arg.weights, arg.beta, arg.reference)
    c.peft = peft_section(arg.peft, arg.steps)
    return c
