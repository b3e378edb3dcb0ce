"""The training state and its placement on a device mesh."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `rng` is a raw uint32[2] key (checkpoint-friendly).

    `params` holds the trainable leaves only; `frozen` the rest (a base model under an adapter,
    frozen layers), as two trees of the same structure with None where the other has a leaf
    (`ftjax.peft.core.partition`). Frozen leaves get no gradients and no optimizer state, and
    are not written to checkpoints (they are rebuilt from the base model on resume).
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None

    def full_params(self) -> Any:
        """Trainable and frozen leaves together: the tree the model is applied to."""
        if self.frozen is None:
            return self.params
        from ftjax.peft.core import combine
        return combine(self.params, self.frozen)


def create_state(params: Any, tx, seed: int, frozen: Any = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), frozen=frozen)
