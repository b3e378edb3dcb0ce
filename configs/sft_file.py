"""Supervised fine-tuning of the quickstart base on a data file (JSONL / JSON / CSV / Parquet /
text) or a TFDS dataset: the data stage end to end (docs/data.md).

    python -m ftjax.main --config configs/sft_file.py --workdir /tmp/sft_file
    python -m ftjax.main --config configs/sft_file.py:path=my.csv,format=instruction ...
    python -m ftjax.main --config configs/sft_file.py:path=experiments/data_samples/qa.parquet \\
        --config.data.field_map=instruction=question,output=answer --workdir /tmp/qa

Typed arguments: `path` (a file, glob, or a full spec such as `tfds:NAME:SPLIT`), `format`
(auto instruction chat sharegpt text), `steps`, `template` (`auto`, the default: the
tokenizer's own chat template when `model.init_from=hf:DIR`, else `plain` = the layout the
quickstart base was pretrained on, `[bos] prompt "\\n" answer [eos]`; or alpaca chatml llama3,
or "" for the tokenizer's default), `init` (`base` = the shipped quickstart base, `scratch` = random init), `peft` (full, lora,
dora, qlora, ...: the method with its default settings, each overridable as
`--config.peft.NAME=value`).
Every other knob is in `config.data` (see `configs/common.py:data_file`).
"""
import os

from configs import common
from configs.quickstart import SHIPPED_BASE, base_model, peft_section
from ftjax.data.chat import BUILTIN_TEMPLATES
from ftjax.data.sources import SOURCE_KINDS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = "experiments/data_samples/instruction.jsonl"

# The quickstart base's training layout as a chat template: [bos] user "\n" assistant [eos]
# (the built-in template "plain").
PLAIN_TEMPLATE = BUILTIN_TEMPLATES["plain"]


def repo_path(path: str) -> str:
    """`path` as given when it exists (or is a spec), else relative to the repository root."""
    kind, sep, rest = path.partition(":")
    if sep and kind in SOURCE_KINDS:
        if kind == "tfds" or os.path.exists(rest):
            return path
        return f"{kind}:{repo_path(rest)}"
    if os.path.exists(path) or os.path.isabs(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def get_config(arg=None):
    arg = common.parse_arg(arg, path=DEFAULT_PATH, format="auto", steps=150, template="auto",
                           init="base", eval_examples=200, peft="full")
    if arg.init not in ("base", "scratch"):
        raise ValueError(f"init={arg.init!r}: use base (the shipped quickstart base) or scratch")
    c = common.base(trainer="sft")
    c.model = base_model()
    c.model.init_from = repo_path(SHIPPED_BASE) if arg.init == "base" else ""
    # 10 warmup steps; fewer for a short try (`steps=5`): warmup must end before the decay.
    c.optimizer = common.optimizer("adamw", learning_rate=1e-3,
                                   warmup_steps=max(0, min(10, arg.steps - 1)),
                                   weight_decay=0.01)
    # Packed rows of 96 slots hold ~3 short examples each (positions restart per example, so
    # rows may exceed the base's 64 positions).
    c.train = common.train(steps=arg.steps, batch_size=16, seq_len=96, log_every=10,
                           eval_every=25, checkpoint_every=50, keep_checkpoints=1)
    c.data = common.data_file(repo_path(arg.path), arg.format,
                              template=arg.template,
                              eval_examples=arg.eval_examples,
                              eval_before=arg.init == "base")
    if arg.peft != "full":  # the method's settings with the quickstart's choices for it
        c.peft = peft_section(arg.peft, arg.steps)
    return c
