"""The training state and its placement on a device mesh."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `rng` is a raw uint32[2] key (checkpoint-friendly)."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_state(params: Any, tx, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))
