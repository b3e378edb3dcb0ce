"""KTO (trainer "kto") of the quickstart base on the user's unpaired feedback: a JSONL / JSON /
CSV / Parquet file (or TFDS dataset) of prompt / completion / label records (label: true =
desirable), read, cleaned and split by the data pipeline.

    python -m ftjax.main --config configs/kto_file.py --workdir /tmp/kto_file
    python -m ftjax.main --config configs/kto_file.py:path=feedback.jsonl,peft=full ...
"""
import ml_collections

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from configs.sft_file import repo_path
from ftjax.trainers.kto import DEFAULTS

DEFAULT_PATH = "experiments/data_samples/unpaired.jsonl"


def get_config(arg=None):
    arg = common.parse_arg(arg, path=DEFAULT_PATH, steps=100, peft="lora", beta=0.1,
                           template="auto", lr=0.0)
    c = common.base(trainer="kto")
    c.model = base_model()
    c.model.init_from = repo_path(SHIPPED_BASE)
    lr = arg.lr or (1e-4 if arg.peft == "full" else 2e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(10, arg.steps), weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=16, seq_len=48, log_every=10,
                           eval_every=50, checkpoint_every=50, keep_checkpoints=1)
    c.data = common.data_file(repo_path(arg.path), "unpaired", template=arg.template,
                              eval_examples=0, min_train_examples=200)
    c.kto = ml_collections.ConfigDict(dict(DEFAULTS["kto"], beta=arg.beta))
    c.peft = peft_section(arg.peft, arg.steps)
    return c
