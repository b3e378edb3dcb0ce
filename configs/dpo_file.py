"""Preference fine-tuning (DPO family) of the quickstart base on the user's preference data:
a JSONL / JSON / CSV / Parquet file (or TFDS dataset) of prompt/chosen/rejected records, read,
cleaned and split by the data pipeline (`configs/common.py:data_file`, docs/data.md).

    python -m ftjax.main --config configs/dpo_file.py --workdir /tmp/dpo_file
    python -m ftjax.main --config configs/dpo_file.py:path=my_prefs.jsonl,loss=ipo,beta=0.5 ...
    python -m ftjax.main --config configs/dpo_file.py:path=prefs.csv --workdir ... \\
        --config.data.field_map=prompt=question,chosen=good,rejected=bad

Typed arguments: `path` (file, glob or full spec), `steps`, `peft` (lora, full, qlora, ...),
`loss` (one type or `a+b+c`), `weights` (`w1+w2+w3`), `beta`, `reference` (auto strip
precompute copy), `template` (`auto`: the tokenizer's own when starting from `hf:DIR`, else `plain` = the quickstart base's `[bos] prompt "\\n" answer [eos]`
layout, or alpaca chatml llama3, or "" for the tokenizer's default). See docs/alignment.md.
"""
from configs import common
from configs.dpo_synthetic import dpo_section
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from configs.sft_file import repo_path

DEFAULT_PATH = "experiments/data_samples/preference.jsonl"


def get_config(arg=None):
    arg = common.parse_arg(arg, path=DEFAULT_PATH, steps=100, peft="lora", loss="sigmoid",
                           weights="", beta=0.1, reference="auto", template="auto", lr=0.0)
    c = common.base(trainer="dpo")
    c.model = base_model()
    c.model.init_from = repo_path(SHIPPED_BASE)
    lr = arg.lr or (1e-4 if arg.peft == "full" else 2e-3)
    c.optimizer = common.optimizer("adamw", learning_rate=lr,
                                   warmup_steps=common.warmup(10, arg.steps),
                                   weight_decay=0.0)
    c.train = common.train(steps=arg.steps, batch_size=16, seq_len=48, log_every=10,
                           eval_every=25, checkpoint_every=50, keep_checkpoints=1)
    c.data = common.data_file(repo_path(arg.path), "preference",
                              template=arg.template,
                              eval_examples=0, min_train_examples=200)
    c.dpo = dpo_section(arg.loss, arg.weights, arg.beta, arg.reference)
    c.peft = peft_section(arg.peft, arg.steps)
    return c
