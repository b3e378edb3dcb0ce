"""QLoRA fine-tuning: LoRA over the NF4 (or int8) quantized quickstart base, on the unseen task
`dmy2iso` (or, with init_from=hf:DIR, over a real model; `base=False`: over a random model).

    python -m ftjax.main --config configs/qlora_sft.py --workdir workdirs/qlora
    python -m ftjax.main --config configs/qlora_sft.py:quant=int8 --workdir workdirs/qlora8
    python -m ftjax.main --config configs/qlora_sft.py --workdir workdirs/qlora \\
        --config.model.init_from=hf:/path/to/llama --config.model.dtype=bfloat16

Defaults (ftjax/peft/qlora.py): NF4 in blocks of 64 with double quantization (4.127 bits per
weight), LoRA rank 8 / alpha 16 on every attention and MLP projection, all of which are
quantized; the merged export holds dequantized weights + the adapters (the trained function).
"""
from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft import method_defaults


def get_config(arg=None):
    d = method_defaults("qlora")  # every QLoRA setting, documented in ftjax/peft/qlora.py
    arg = common.parse_arg(arg, rank=d.rank, alpha=d.alpha, quant=d.quant,
                           double_quant=d.double_quant, base=True, tasks="dmy2iso",
                           steps=150)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps,
                                   init="base" if arg.base else "scratch"))
    c.peft = d
    c.peft.update(dict(rank=arg.rank, alpha=arg.alpha, quant=arg.quant,
                       double_quant=arg.double_quant))
    c.optimizer.learning_rate = 3e-3
    return c
