"""QLoRA fine-tuning: LoRA over an NF4 (or int8) quantized frozen base.

    python -m ftjax.main --config configs/qlora_sft.py --workdir workdirs/qlora
    python -m ftjax.main --config configs/qlora_sft.py:quant=int8 --workdir workdirs/qlora8
    python -m ftjax.main --config configs/qlora_sft.py --workdir workdirs/qlora \
        --config.model.init_from=hf:/path/to/llama --config.model.dtype=bfloat16

Defaults (ftjax/peft/qlora.py): NF4 in blocks of 64 with double quantization (4.127 bits per
weight), LoRA rank 8 / alpha 16 on every attention and MLP projection, all of which are
quantized; the merged export holds dequantized weights + the adapters (the trained function).
"""
import ml_collections

from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft.lora import DEFAULT_TARGETS


def get_config(arg=None):
    arg = common.parse_arg(arg, rank=8, alpha=16.0, quant="nf4", double_quant=True,
                           tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = ml_collections.ConfigDict(dict(
        method="qlora", rank=arg.rank, alpha=arg.alpha, rslora=False,
        init="default",                     # default | gaussian
        quant=arg.quant,                    # nf4 | int8 (per-output-channel absmax)
        block_size=64,                      # NF4 block along the `in` axis
        double_quant=arg.double_quant,      # 8-bit absmax over blocks of 256 (NF4 only)
        targets=tuple(DEFAULT_TARGETS),     # quantized + LoRA (regexes, full match)
        quantize_targets=(),                # extra weights quantized without an adapter
        rank_pattern={}, alpha_pattern={},  # {regex: value} per-path overrides
        train_patterns=(),                  # plain leaves that also train
    ))
    c.optimizer.learning_rate = 3e-3
    return c
