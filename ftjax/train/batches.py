"""What the loop draws its training batches from.

Two kinds of producer, both resumable (`get_state()` / `set_state(state)`, saved with every
checkpoint, so a resumed run sees exactly the batches an uninterrupted one would have):

- a `ftjax.data.resumable.Resumable` loader, or any iterator of this process's rows of each global batch (numpy dicts): `next(it)`, for data
  that does not depend on the model (SFT, preference pairs, classification);
- an `OnPolicy` producer: `next_batch(step, params)` receives the current full params (placed
  on the mesh, sharded) before every step, for data the policy makes itself (rollouts of PPO,
  GRPO, RLOO, online DPO). It may sample with them (e.g. `ftjax.infer.generate`, jitted once
  and fed the sharded params) and score the samples, then returns the batch the loss needs.
  Its sampling keys must come from its own state (e.g. `fold_in(seed, step)`), so that a
  resumed run draws the same rollouts.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ftjax.data.resumable import PassthroughIterator, Resumable  # noqa: F401 (re-exported)


class OnPolicy:
    """Base of batch producers that see the policy: subclasses implement `next_batch` (and
    `get_state` / `set_state` when they hold more than what the step number determines)."""

    def next_batch(self, step: int, params: Any) -> dict:
        """The batch for training step `step` (0-based), made with the current `params`."""
        raise NotImplementedError

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def is_on_policy(producer: Any) -> bool:
    return isinstance(producer, OnPolicy) or callable(getattr(producer, "next_batch", None))


def draw(producer: Any, step: int, params_fn) -> dict:
    """The next batch of either kind; `params_fn()` is called only for on-policy producers."""
    if is_on_policy(producer):
        return producer.next_batch(step, params_fn())
    return next(producer)


def as_rank2(batch: dict) -> dict:
    """Rank-1 leaves ([B]) -> [B, 1], so one [batch, ...] sharding fits every leaf."""
    return {k: (v[:, None] if np.ndim(v) == 1 else v) for k, v in batch.items()}


class Rank2Iterator(PassthroughIterator):
    """Applies `as_rank2` to every batch of the wrapped iterator."""

    def attach(self, batch: dict) -> dict:
        return as_rank2(batch)
