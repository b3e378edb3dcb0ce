"""Bottleneck-adapter fine-tuning (Houlsby et al. 2019 serial; He et al. 2022 parallel) on the
built-in synthetic suite.

    python -m ftjax.main --config configs/adapter_sft.py:bottleneck=32,mode=parallel \
        --workdir workdirs/adapter

Adapters are nonlinear and cannot be merged, so `export.hf_dir` must stay empty.
"""
import ml_collections

from configs import common
from configs.sft_synthetic import get_config as sft_config
from ftjax.peft.adapters import DEFAULT_TARGETS


def get_config(arg=None):
    arg = common.parse_arg(arg, bottleneck=16, mode="serial", activation="relu", scale=1.0,
                           tasks="add+reverse", steps=300)
    c = sft_config(common.pack_arg(tasks=arg.tasks, steps=arg.steps))
    c.peft = ml_collections.ConfigDict(dict(
        method="adapter",
        bottleneck=arg.bottleneck,      # r: adapter width (down: d -> r, up: r -> out)
        mode=arg.mode,                  # serial: y + s*f(y) (Houlsby); parallel: y + s*f(x) (He)
        activation=arg.activation,      # relu gelu gelu_tanh silu tanh identity
        scale=arg.scale,                # s, the adapter output's multiplier (He et al. use 4)
        targets=tuple(DEFAULT_TARGETS), # after attention (o_proj) and after the MLP (down_proj)
        fold_bias=True,                 # serial: read W x + b when the projection has a bias
        train_patterns=(),              # plain leaves that also train (e.g. ".*norm/scale")
    ))
    c.optimizer.learning_rate = 3e-3
    return c
