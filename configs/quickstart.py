"""The quickstart: fine-tune a small pretrained base on a synthetic task it has never seen.

    python -m ftjax.main --config configs/quickstart.py --workdir /tmp/qs
    python -m ftjax.main --config configs/quickstart.py:task=double,steps=300 --workdir /tmp/qs
    python -m ftjax.main --config configs/quickstart.py:pretrain --workdir /tmp/qs  # base in-run

The base model (`model` section) is read from `base.path` (default: the shipped
`experiments/quickstart_base/model.safetensors`; relative paths resolve against the repository
root when they do not exist under the current directory). With `base.path` empty or
`base.force_pretrain=True` it is pretrained in the run on `base.tasks` (as
`experiments/quickstart_base/pretrain.py` did; ~20 min on 2 CPU cores at the default size) and
cached in `<workdir>/base_<hash>/`. `train` and `optimizer` configure the fine-tuning phase,
`base.train` and `base.optimizer` the pretraining phase.
"""
import math

import ml_collections

from configs import common
from configs.common import warmup
from ftjax.data import PRETRAIN_TASKS
from ftjax.peft import method_defaults

SHIPPED_BASE = "experiments/quickstart_base/model.safetensors"


def base_model():
    """The quickstart base architecture: a ~0.76M-parameter Llama over the char vocab (99)."""
    return common.model("llama", vocab_size=99, hidden_size=128, intermediate_size=352,
                        num_layers=4, num_heads=4, num_kv_heads=2, max_position_embeddings=64)


def base_section(steps: int = 8000, path: str = SHIPPED_BASE) -> ml_collections.ConfigDict:
    """Where the base comes from, and how it is pretrained when it has to be."""
    return ml_collections.ConfigDict(dict(
        path=path,                  # safetensors file of the base; "" = pretrain in the run
        force_pretrain=False,       # pretrain (or reuse the workdir cache) even if path is set
        tasks=tuple(PRETRAIN_TASKS),
        n_per_task=25000,           # training examples per task (test prompts excluded)
        test_frac=0.2,              # split_of bucket excluded from pretraining
        seed=0,
        eval_examples=200,          # per-task exact match of the base after pretraining
        optimizer=common.optimizer("adamw", learning_rate=2e-3,
                                   warmup_steps=warmup(100, steps),
                                   weight_decay=0.01),
        train=common.train(steps=steps, batch_size=32, seq_len=48, log_every=50,
                           eval_every=500, checkpoint_every=500, keep_checkpoints=1),
    ))


# Settings where the quickstart departs from a method's defaults (ftjax/peft/<method>.py), as
# each method's own configs/<method>_sft.py does; any other method runs with its defaults.
PEFT_OVERRIDES = {
    "adapter": dict(bottleneck=16),
    "prefix_tuning": dict(num_virtual_tokens=10),
    "prompt_tuning": dict(init_text="Answer the task:"),
    "hft": lambda steps: dict(steps_per_round=math.ceil(steps / 3), train_patterns=(".*",)),
}


def peft_section(name: str, steps: int) -> ml_collections.ConfigDict:
    """Every field of a method's `peft` section (so each can be overridden on the CLI): the
    method's defaults (`ftjax.peft.method_defaults`) and the quickstart's overrides."""
    section = method_defaults(name)  # an unknown name is refused with the known ones
    over = PEFT_OVERRIDES.get(name, {})
    section.update(over(steps) if callable(over) else over)
    return section


def get_config(arg=None):
    arg = common.parse_arg(arg, task="dmy2iso", steps=150, eval_examples=200, pretrain=False,
                           base_steps=8000, peft="full")
    c = common.base(trainer="quickstart")
    c.model = base_model()
    # Full fine-tuning of the base on `data.task`.
    c.optimizer = common.optimizer("adamw", learning_rate=1e-3,
                                   warmup_steps=common.warmup(10, arg.steps),
                                   weight_decay=0.01)
    c.train = common.train(steps=arg.steps, batch_size=32, seq_len=48, log_every=10,
                           eval_every=25, checkpoint_every=0, keep_checkpoints=1)
    c.data = ml_collections.ConfigDict(dict(
        task=arg.task,              # the fine-tuning task (a HELDOUT_TASKS one is unseen)
        n_examples=2000,            # distinct prompts, split train/test by test_frac
        test_frac=0.2,
        val_frac=0.0,               # > 0: this share of the train prompts is a validation split
        score_test=True,            # False: score only the validation split (sweeps' select stage)
        seed=0,
        eval_examples=arg.eval_examples,  # held-out exact match before/after (and eval loss)
        other_tasks=("format", "reverse"),  # pretraining tasks re-scored to check forgetting
        other_eval_examples=100,
        replay_frac=0.2,            # share of pretraining-mixture examples mixed in (rehearsal)
        max_new_tokens=16,
        eval_batch_size=64,
        num_samples=5,              # sample generations printed and kept in summary.json
    ))
    c.base = base_section(arg.base_steps, "" if arg.pretrain else SHIPPED_BASE)
    c.peft = peft_section(arg.peft, arg.steps)  # fine-tuning method (default: full)
    return c
