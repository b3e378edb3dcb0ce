"""Supervised fine-tuning of a small Llama-style model on tasks of the built-in synthetic suite.

    python -m ftjax.main --config configs/sft_synthetic.py --workdir /tmp/sft
    python -m ftjax.main --config configs/sft_synthetic.py:tasks=reverse+sort,steps=500 ...
    python -m ftjax.main --config configs/sft_synthetic.py:init=base,tasks=dmy2iso ...

Typed arguments: `tasks` (names of `ftjax.data.synthetic` joined by `+`), `steps`, `family`
(the architecture of a model trained from scratch), `init` (`scratch` = a randomly initialised
model, `base` = the shipped quickstart base, `experiments/quickstart_base/`, whose
architecture is then fixed by the file). The PEFT method configs (`configs/lora_sft.py`, ...)
build on this one with `init=base` and the unseen task `dmy2iso` as their defaults.
"""
from configs import common

INITS = ("scratch", "base")


def get_config(arg=None):
    arg = common.parse_arg(arg, tasks="add+reverse", steps=300, family="llama", init="scratch")
    if arg.init not in INITS:
        raise ValueError(f"init={arg.init!r}: use scratch (a randomly initialised model) or "
                         "base (the shipped quickstart base)")
    c = common.base(trainer="sft")
    if arg.init == "base":
        from configs.quickstart import SHIPPED_BASE, base_model
        if arg.family != "llama":
            raise ValueError(f"family={arg.family!r} with init=base: the quickstart base is a "
                             "llama model; use init=scratch for another family")
        c.model = base_model()
        c.model.init_from = SHIPPED_BASE  # relative paths resolve against the ftjax root
    else:
        c.model = common.model(arg.family, vocab_size=99, hidden_size=128,
                               intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2,
                               max_position_embeddings=128)
    c.optimizer = common.optimizer("adamw", learning_rate=1e-3,
                                   warmup_steps=common.warmup(20, arg.steps),
                                   weight_decay=0.01)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=100, checkpoint_every=100)
    # The synthetic tasks; the user's data instead with --config.data.source=jsonl:FILE (every
    # knob of configs/common.py:data_file is here too, unused while `source` is empty).
    c.data = common.data_file()
    c.data.update(dict(tasks=tuple(arg.tasks.split("+")), n_per_task=2000, seed=0,
                       test_frac=0.2, eval_examples=200, max_new_tokens=16,
                       eval_before=arg.init == "base"))
    return c
