"""The checks that take seconds and need no data, run before a trainer builds anything.

`check(cfg)` fails in seconds on what would otherwise fail after the data stage has read,
cleaned and tokenized every file, or after training: the model config, the mesh and the
batch's divisibility over it, and the starting weights' headers (a truncated or corrupt
safetensors file, tensors that do not match the model config). Nothing is loaded and
nothing is written.
"""
from __future__ import annotations

from typing import Any

from ftjax import sharding
from ftjax.io.params_file import load_params
from ftjax.models import upcycle
from ftjax.models.config import ModelConfig
from ftjax.train import run as run_lib
from ftjax.train.placement import Placement


def model_configs(cfg: Any) -> tuple[ModelConfig, ModelConfig]:
    """(the starting weights' config, the trained model's config: upcycled when enabled), as
    `Run.build` derives them, without its messages."""
    dense = run_lib.model_config(cfg.model, dense=True, log=lambda _: None)
    return dense, upcycle.config_from_section(cfg.model.get("upcycle"), dense)


def check_weights(cfg: Any, dense: ModelConfig) -> None:
    """The headers of `model.init_from` (an ftjax params file or `hf:DIR`) against `dense`:
    readable, the file's full size, every tensor present with its shape. Reads no tensor.
    The quickstart trainers' `base.path` (a params file) is checked against its own config:
    whether it fits the model section is the trainer's to say."""
    base = cfg.get("base")
    base_path = (base.get("path", "") or "") if hasattr(base, "get") else ""
    if base_path and not base.get("force_pretrain", False):
        try:
            base_path = run_lib.resolve_path(base_path, "base.path")
        except FileNotFoundError:
            base_path = ""  # the trainer says how to get one
        if base_path and "://" not in base_path:
            load_params(base_path, check_only=True)
    src = cfg.model.get("init_from", "") or ""
    if not src:
        return
    if src.startswith("hf:"):
        from ftjax.io.hf import load_pretrained
        load_pretrained(src[len("hf:"):], dtype=dense.param_dtype, check_only=True)
        return
    path = run_lib.resolve_path(src)
    if "://" not in path:
        load_params(path, expected_cfg=dense, check_only=True)


def check(cfg: Any, devices=None) -> None:
    """Model config, mesh, batch divisibility and weight headers of a resolved config; raises
    a ValueError (or FileNotFoundError) that names the key or file and the fix."""
    dense, model_cfg = model_configs(cfg)
    placement = Placement(cfg, model_cfg, devices)  # the mesh; the params divide over it
    t = cfg.train
    sharding.check_batch_divisible(int(t.batch_size), placement.mesh, placement.rules,
                                   int(t.get("accum_steps", 1)))
    check_weights(cfg, dense)
