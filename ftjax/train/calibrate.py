"""Calibration and recovery for pruning (`ftjax.peft.prune`).

`activation_norms` runs the model on calibration batches and returns, for every targeted
linear, the L2 norm of each input feature over all real tokens (Wanda's ||X_j||_2). It swaps
each target for a `RecordingWeight`, which multiplies as its base does and sends the per-feature
sum of squares of its input to the host (`jax.debug.callback`) with its layer index, so it
works unchanged under `lax.scan` over stacked layers (the index is an [L] field that scan
slices like any other). Padding tokens (segment id 0) are excluded through a per-token weight
field (stacked [L, B, T] for the same reason).

`train_masked` is the recovery fine-tune: a few AdamW steps of the SFT loss on a params tree
whose pruned kernels are `MaskedWeight`s; only their bases (and other plain leaves) train,
and the masks stay fixed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import models
from ftjax.models.config import ModelConfig
from ftjax.peft import core
from ftjax.peft.prune import DEFAULT_TARGETS
from ftjax.train.step import sft_loss


class _Sums:
    """Host accumulator of per-(path, layer) sums of squares; static field of the weights."""

    def __init__(self) -> None:
        self.sq: dict[str, dict[int, np.ndarray]] = {}
        self.tokens = 0.0

    def add(self, path: str, layer, sq) -> None:
        per = self.sq.setdefault(path, {})
        i = int(np.asarray(layer))
        per[i] = per.get(i, 0.0) + np.asarray(sq, np.float64)


@flax.struct.dataclass
class RecordingWeight(core.StructuredWeight):
    """A dense base that records sum_t valid_t * x_tj^2 of its input on the host."""
    base: Any
    layer: jax.Array       # [L] int32 for stacked kernels (scan slices it to this layer's index)
    valid: jax.Array       # [L, B, T] (or [B, T]) float32 token weights: 1 real, 0 padding
    path: str = flax.struct.field(pytree_node=False, default="")
    sink: Any = flax.struct.field(pytree_node=False, default=None)

    def matmul(self, x):
        xf = x.astype(jnp.float32)
        sq = jnp.einsum("...i,...->i", xf * xf, self.valid)
        jax.debug.callback(self.sink.add, self.path, self.layer, sq)
        return core.linear(x, self.base, x.dtype)

    def materialize(self):
        return core.materialize(self.base)


def activation_norms(params: Any, cfg: ModelConfig, batches: Iterable[Mapping[str, Any]],
                     targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, np.ndarray]:
    """path -> [L, in] (stacked) or [in] L2 norms of each input feature of every target,
    over the real tokens (segment_ids != 0) of `batches` (training layout: inputs,
    segment_ids, positions)."""
    sink = _Sums()
    run_cfg = dataclasses.replace(cfg, remat="none")
    stacked: dict[str, bool] = {}

    def check(path, w):
        if core.is_structured(w) or getattr(w, "ndim", 0) not in (2, 3) or (
                w.ndim == 3 and not path.startswith("layers/")):
            raise ValueError(f"calibration target {path!r} (shape {getattr(w, 'shape', None)}) "
                             "is not a dense [in, out] kernel or a stacked [L, in, out] one "
                             "(expert kernels are not supported); narrow the targets")

    @jax.jit
    def fwd(p, batch):
        logits, _ = models.apply(p, run_cfg, batch["inputs"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"])
        return jnp.sum(logits[..., :1])  # something to wait for; the callbacks are the output

    n_tokens, n_batches = 0.0, 0
    for batch in batches:
        seg = jnp.asarray(batch["segment_ids"], jnp.int32)
        valid = (seg != 0).astype(jnp.float32)
        L = cfg.num_layers

        def make(path, w, k, valid=valid):
            stacked[path] = w.ndim == 3
            if w.ndim == 3:
                return RecordingWeight(base=w, layer=jnp.arange(L, dtype=jnp.int32),
                                       valid=jnp.broadcast_to(valid, (L, *valid.shape)),
                                       path=path, sink=sink)
            return RecordingWeight(base=w, layer=jnp.zeros((), jnp.int32), valid=valid,
                                   path=path, sink=sink)
        rec = core.select_targets(params, targets, make, name="calibration", check=check)
        arrays = {k: jnp.asarray(batch[k], jnp.int32)
                  for k in ("inputs", "segment_ids", "positions")}
        jax.block_until_ready(fwd(rec, arrays))
        n_tokens += float(valid.sum())
        n_batches += 1
    jax.effects_barrier()
    if n_batches == 0 or n_tokens == 0:
        raise ValueError("activation_norms: no calibration tokens (no batches, or every "
                         "segment id is 0)")
    out = {}
    for path, is_stacked in stacked.items():
        per = sink.sq.get(path, {})
        if is_stacked:
            missing = [i for i in range(cfg.num_layers) if i not in per]
            if missing:
                raise RuntimeError(f"calibration recorded no input for {path!r} layers {missing}")
            out[path] = np.sqrt(np.stack([per[i] for i in range(cfg.num_layers)])).astype(
                np.float32)
        else:
            out[path] = np.sqrt(per[0]).astype(np.float32)
    return out


def train_masked(params: Any, cfg: ModelConfig, batches: Iterable[Mapping[str, Any]], *,
                 steps: int, learning_rate: float = 1e-4, weight_decay: float = 0.0,
                 train_patterns: Sequence[str] = (".*",)) -> tuple[Any, list[float]]:
    """`steps` AdamW steps of the SFT loss (`train.step.sft_loss`) on `params` (MaskedWeight
    leaves train their base only; plain leaves matching `train_patterns` train too).
    Returns (params, per-step losses). The masks are never updated: they are frozen leaves."""
    mask = core.trainable_mask(params, train_patterns)
    trainable, frozen = core.partition(params, mask)
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = opt.init(trainable)
    loss_fn = sft_loss(cfg, 0.0)

    @jax.jit
    def step(tr, st, batch):
        def f(t):  # the mean over the batch's loss tokens (sft_loss returns sums)
            obj, stats = loss_fn(core.combine(t, frozen), batch, None)
            return obj / jnp.maximum(stats["tokens"], 1.0)
        loss, g = jax.value_and_grad(f)(tr)
        upd, st = opt.update(g, st, tr)
        return optax.apply_updates(tr, upd), st, loss

    losses = []
    it = iter(batches)
    for _ in range(int(steps)):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        trainable, opt_state, loss = step(trainable, opt_state, batch)
        losses.append(float(loss))
    return core.combine(trainable, frozen), losses
