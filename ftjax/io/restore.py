"""A training run's workdir read back for conversion and export: its resolved config and the
params of one checkpoint (scripts/convert_hf.py, scripts/export_peft.py).

Workdirs are `ftjax.workdir` paths (local or `gs://`); checkpoints are `ftjax.io.checkpoint`'s.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ftjax import workdir as workdir_lib
from ftjax.io.checkpoint import Checkpointer

__all__ = ["read_run_config", "restore_params"]


def read_run_config(workdir: str | os.PathLike[str]) -> Any:
    """The resolved run config (`config.json`) of a workdir, as an ml_collections ConfigDict."""
    import ml_collections
    if not workdir_lib.exists(workdir, "config.json"):
        raise FileNotFoundError(f"{os.fspath(workdir)!r} has no config.json; is it an ftjax "
                                "workdir?")
    return ml_collections.ConfigDict(workdir_lib.read_json(workdir, "config.json"))


def restore_params(workdir: str | os.PathLike[str], step: Optional[int] = None,
                   abstract: Any = None) -> tuple[Any, int]:
    """(host params, step): the params subtree of the TrainState checkpointed at `step`
    (default: the latest), read by partial restore (the optimizer state is not read).

    abstract: the params' shapes and dtypes (e.g. `models.param_shapes(cfg)` for a full
    fine-tuning run); default: the checkpoint's own metadata, which suits PEFT runs, whose
    checkpoints hold only the trained leaves (None for frozen ones).
    """
    import jax
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(workdir, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {ckpt.directory}; have {steps}")
        if abstract is None:
            meta = ocp.PyTreeCheckpointHandler().metadata(ckpt.directory / str(step) / "state")
            abstract = getattr(meta, "tree", meta)["params"]
        device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        item = {"params": jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=device), item)))
        state = ckpt.manager.restore(step, args=args)["state"]
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state["params"]), step
