"""Orbax checkpoints of the whole training state plus the data iterator's position.

A checkpoint holds `state` (params, optimizer state, step, RNG) and `data` (the JSON state of
the data iterator), written atomically by orbax's `CheckpointManager` and kept by its
retention policy. Restoring places every array with the sharding the run asks for, so a run
can resume on a different mesh.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ftjax import workdir as workdir_lib


class Checkpointer:
    """Saves and restores {state, data} under `<workdir>/checkpoints/<step>`."""

    def __init__(self, workdir: str | os.PathLike[str], *, max_to_keep: Optional[int] = 3,
                 keep_period: Optional[int] = None, async_save: bool = True):
        # An epath.Path: a `gs://` workdir reaches orbax (and its tensorstore driver) as a URL,
        # so every process writes its shards into the same bucket.
        self.directory = workdir_lib.path(workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period,
                                               create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Optional[dict] = None, *,
             force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `abstract_state`.

        abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (e.g. from
        `jax.eval_shape` plus the run's shardings).
        """
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], dict(out["data"] or {})

    def restore_data(self, step: int) -> dict:
        """Only the JSON `data` item of a checkpoint (cheap: no arrays are read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return dict(out["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
