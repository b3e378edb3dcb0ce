"""LoRA fine-tuning of the quickstart base on a task it has never seen (or of a real model).

    python -m ftjax.main --config configs/lora_sft.py --workdir workdirs/lora
    python -m ftjax.main --config configs/lora_sft.py:rank=16,tasks=dmy2iso+swap --workdir ...
    python -m ftjax.main --config configs/lora_sft.py --workdir workdirs/lora \\
        --config.model.init_from=hf:/path/to/llama --config.export.hf_dir=workdirs/lora/merged

By default LoRA adapts the shipped quickstart base (`experiments/quickstart_base/`) to the
held-out task `dmy2iso` (`18/05/1971` -> `1971-05-18`), which the base scores 0% on; the run
ends with held-out exact match before -> after. `base=False` trains LoRA over a randomly
initialised model instead (a plumbing check, not a learning one). Typed arguments: rank, alpha,
rslora, init (LoRA's init: default, gaussian, pissa), base, tasks, steps, loraplus_ratio.
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults
from ftjax.train import param_groups


def get_config(arg=None):
    d = method_defaults("lora")  # every LoRA setting, documented in ftjax/peft/lora.py
    arg = common.parse_arg(arg, rank=d.rank, alpha=d.alpha, rslora=d.rslora, init=d.init,
                           base=True, tasks="dmy2iso", steps=150, loraplus_ratio=0.0)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = d
    c.peft.update(dict(rank=arg.rank, alpha=arg.alpha, rslora=arg.rslora, init=arg.init))
    c.optimizer.learning_rate = 3e-3
    if arg.loraplus_ratio:  # LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A
        c.optimizer.param_groups = param_groups.loraplus(arg.loraplus_ratio)
    return c
