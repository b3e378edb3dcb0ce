"""QLoRA fine-tuning: LoRA over an NF4 (or int8) quantized frozen base.

    python -m ftjax.main --config configs/qlora_sft.py --workdir workdirs/qlora
    python -m ftjax.main --config configs/qlora_sft.py:quant=int8 --workdir workdirs/qlora8
    python -m ftjax.main --config configs/qlora_sft.py --workdir workdirs/qlora \
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
                           double_quant=d.double_quant, tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = d
    c.peft.update(dict(rank=arg.rank, alpha=arg.alpha, quant=arg.quant,
                       double_quant=arg.double_quant))
    c.optimizer.learning_rate = 3e-3
    return c
