"""A training run's workdir read back for conversion and export: where its checkpoints are,
its resolved config, the params of one checkpoint and the metadata saved with it (the base
fingerprint, `ftjax.io.fingerprint`) (scripts/convert_hf.py, scripts/export_peft.py).

Workdirs are `ftjax.workdir` paths (local or `gs://`); checkpoints are `ftjax.io.checkpoint`'s.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ftjax import workdir as workdir_lib
from ftjax.io.checkpoint import Checkpointer

__all__ = ["find_run", "read_run_config", "restore_params", "read_checkpoint_data"]


def _has_checkpoints(d) -> bool:
    ckpts = d / "checkpoints"
    return ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())


def find_run(workdir: str | os.PathLike[str]) -> tuple[str, Optional[str]]:
    """(directory, note): the training run a workdir holds. That is the workdir itself when it
    has checkpoints; otherwise its one sub-run that has them (the quickstart and memory-tuning
    trainers fine-tune in `<workdir>/finetune`, which records its own config.json), and `note`
    says so. A workdir with neither is refused, naming what it lacks."""
    root = workdir_lib.path(workdir)
    if _has_checkpoints(root):
        return os.fspath(workdir), None
    subs = sorted(d for d in root.iterdir() if d.is_dir() and _has_checkpoints(d)) \
        if root.exists() else []
    if len(subs) == 1:
        sub = subs[0]
        if not (sub / "config.json").exists():
            raise FileNotFoundError(
                f"{os.fspath(sub)!r} holds checkpoints but no config.json of its own (a "
                "quickstart workdir from an ftjax that did not record it), so its base cannot "
                "be rebuilt; re-run the quickstart in a new --workdir")
        return os.fspath(sub), (f"{os.fspath(workdir)} has no checkpoints of its own; using "
                                f"the training run in {os.fspath(sub)}")
    if len(subs) > 1:
        raise FileNotFoundError(f"{os.fspath(workdir)!r} has no checkpoints of its own and "
                                f"several sub-runs that have: {[d.name for d in subs]}; pass "
                                "one of them as --workdir")
    raise FileNotFoundError(f"no checkpoints under {os.fspath(root / 'checkpoints')} (nor in a "
                            "sub-run such as finetune/); is it the workdir of a finished run?")


def read_checkpoint_data(workdir: str | os.PathLike[str], step: int) -> dict:
    """The JSON metadata saved with the checkpoint at `step` (the data iterator's state,
    `_trainable`, and `_base`: the base fingerprint, absent in older checkpoints)."""
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return ckpt.restore_data(step)
    finally:
        ckpt.close()


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
