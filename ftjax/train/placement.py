"""Where a run's arrays live: the mesh, the sharding rules, and the shardings of params,
training state and batches for one (possibly transformed) params tree."""
from __future__ import annotations

from typing import Any, Sequence

import jax

from ftjax import models, sharding
from ftjax.models.config import ModelConfig
from ftjax.peft import core as peft_core


class Placement:
    """Mesh, rules and the shardings of params, state and batches for one model config."""

    def __init__(self, cfg: Any, model_cfg: ModelConfig, devices=None, abstract_params=None,
                 replicated_keys: Sequence[str] = ()):
        """abstract_params: the (possibly transformed, e.g. LoRA-wrapped) params tree as
        ShapeDtypeStructs; defaults to the model's own params.
        replicated_keys: top-level keys of `abstract_params` that the model does not have
        (a trainer's own params, e.g. a classification head); they are replicated."""
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        self.rules = sharding.get_rules(cfg.sharding.rules)
        base_axes = models.param_axes(model_cfg)
        self.base_params = sharding.param_shardings(base_axes, self.mesh, self.rules)
        if abstract_params is None:
            abstract_params = models.param_shapes(model_cfg)
        extra = {k: abstract_params[k] for k in replicated_keys}
        model_part = {k: v for k, v in abstract_params.items() if k not in extra}
        self.axes = peft_core.axes_like(model_part, base_axes)
        sharding.check_divisible(model_part, self.axes, self.mesh, self.rules)
        extra_axes = jax.tree.map(lambda x: (None,) * len(x.shape), extra)
        self.axes = {**self.axes, **extra_axes}
        self.params = sharding.param_shardings(self.axes, self.mesh, self.rules)
        self.batch = sharding.batch_sharding(self.mesh, self.rules)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def put_params(self, params: Any) -> Any:
        return jax.device_put(params, self.params)

    def put_batch(self, batch: dict) -> dict:
        return sharding.shard_host_batch(batch, self.batch)
