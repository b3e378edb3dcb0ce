"""A training run's params read back from its workdir: the frozen base rebuilt as the run
built it, the run's PEFT transform re-applied with its key, and the trained leaves of one
checkpoint put in place (for export, conversion and evaluation).

Checkpoints of PEFT runs hold only the trained leaves; those of full fine-tuning hold every
leaf, and then nothing is rebuilt. When frozen leaves come from the rebuilt base, its
fingerprint must equal the one recorded with the checkpoint (`ftjax.io.fingerprint`), so a
base file replaced since training is refused instead of silently giving another model.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

import jax
import numpy as np

from ftjax import models
from ftjax.io.restore import read_checkpoint_data, read_run_config, restore_params
from ftjax.models.config import ModelConfig
from ftjax.peft import Method, get_method
from ftjax.peft.core import path_str
from ftjax.train.run import base_source, initial_params, model_config, tokenizer_for, \
    transform_key

__all__ = ["RestoredRun", "restore_run", "check_base", "flat_with_fields"]


@dataclasses.dataclass
class RestoredRun:
    """What `restore_run` read. params carry the method's structured weights (LoRAWeight,
    ...); initial is the transform's output before training, base the untransformed model
    (both None for a full fine-tuning run, whose checkpoint holds every leaf); used lists the
    leaves read from the checkpoint."""
    model_cfg: ModelConfig
    params: Any
    initial: Any
    base: Any
    run_cfg: Any
    step: int
    used: list[str]
    method: Method
    tokenizer: Any


def flat_with_fields(tree: Any) -> dict[str, Any]:
    """'layers/attn/q_proj/kernel/a' -> array: every array leaf, fields of structured weights
    included (the names orbax stores them under)."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_run(workdir: str, step: Optional[int] = None) -> RestoredRun:
    """The params of checkpoint `step` (default: the latest) of the run in `workdir`."""
    run_cfg = read_run_config(workdir)
    model_cfg = model_config(run_cfg.model)
    tok = tokenizer_for(run_cfg)
    method = get_method(run_cfg.get("peft"), apply_fn=models.apply, tokenizer=tok)
    saved, step = restore_params(workdir, step)
    trained_flat = {k: v for k, v in flat_with_fields(saved).items() if v is not None}
    if method.transform is None:
        shapes = flat_with_fields(models.param_shapes(model_cfg))
        if set(shapes) <= set(trained_flat):   # full fine-tuning: the checkpoint is the model
            params, _ = restore_params(workdir, step, models.param_shapes(model_cfg))
            return RestoredRun(model_cfg, params, None, None, run_cfg, step, sorted(shapes),
                               method, tok)
    base = jax.tree.map(np.asarray, initial_params(run_cfg, model_cfg)())
    key = transform_key(int(run_cfg.seed))
    initial = jax.jit(method.transform)(base, key) if method.transform else base
    leaves, treedef = jax.tree_util.tree_flatten_with_path(initial)
    used, new, problems = set(), [], []
    for p, x in leaves:
        k = path_str(p)
        if k in trained_flat:
            t = trained_flat[k]
            if tuple(t.shape) != tuple(x.shape):
                problems.append(f"{k}: checkpoint {list(t.shape)}, rebuilt {list(x.shape)}")
            used.add(k)
            new.append(t)
        else:
            new.append(x)
    unused = sorted(set(trained_flat) - used)
    if unused:
        problems.append(f"checkpoint leaves with no place in the rebuilt params: {unused}")
    if problems:
        raise ValueError(f"checkpoint step {step} of {workdir!r} does not match the params "
                         f"rebuilt from its config ({method.name}): " + "; ".join(problems))
    if len(used) < len(leaves):  # frozen leaves come from the rebuilt base: is it the same?
        check_base(workdir, step, run_cfg, base)
    params = jax.tree_util.tree_unflatten(treedef, new)
    return RestoredRun(model_cfg, params, initial, base, run_cfg, step, sorted(used), method,
                       tok)


def check_base(workdir: str, step: int, run_cfg: Any, base: Any) -> None:
    """Refuses when the rebuilt base differs from the one checkpoint `step` trained on (its
    recorded fingerprint); says so when the checkpoint predates fingerprints."""
    from ftjax.io import fingerprint
    saved = read_checkpoint_data(workdir, step).get("_base")
    if saved is None:
        print(f"warning: checkpoint step {step} of {workdir} records no base fingerprint (written "
              "by an older ftjax), so the rebuilt base cannot be checked against the one it "
              "trained on", file=sys.stderr)
        return
    fingerprint.check(saved, fingerprint.fingerprint(base),
                      f"the base rebuilt from {base_source(run_cfg)} for {workdir} step {step}")
