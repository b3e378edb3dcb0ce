"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): a
zeroth-order SGD step that needs two forward passes and no gradient, activations for a
backward, or optimizer state.

With z ~ N(0, I) of the params' shape (Alg. 1 of the paper, SPSA):

    g = (L(p + eps z) - L(p - eps z)) / (2 eps)      the projected gradient, a scalar
    p <- p - lr * (g z + wd * p)                     E[g z] = E[z z^T] grad L = grad L (eps -> 0)

z is never stored beside the params: it is regenerated leaf by leaf from
`fold_in(key, leaf index)` each time it is used (perturb +eps, -2 eps, then restore and update
in one pass), so the step holds one copy of the params (donated, updated in place) plus the
activations of one forward pass. Two `optimization_barrier`s order the passes (the -2 eps
perturbation cannot start before L+ is known) and stop XLA from merging the four identical
random draws into one stored z.

Use it through the optimizer section (`optimizer.name="mezo"`, `optimizer.mezo_eps`): then
`optim.make_optimizer` returns a `MeZO` in place of an optax transformation and
`step.make_train_step` builds `make_mezo_train_step` with the run's loss (any objective, any
PEFT method: only the trainable leaves are perturbed). Or call `make_mezo_step` directly.
Params are perturbed in their own dtype: with bf16 params the restore is not exact (as in the
paper's fp16 runs); float32 params are restored to rounding error.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.train.step import split_microbatches


class MeZO(NamedTuple):
    """The `optimizer.name="mezo"` settings, standing where an optax transformation would.

    `init` gives the (empty) optimizer state; `update` refuses: MeZO has no gradients to
    transform, its step is `make_mezo_train_step` (`step.make_train_step` switches to it)."""
    init: Callable
    update: Callable
    schedule: Callable
    eps: float
    weight_decay: float


def mezo(schedule: Callable, eps: float = 1e-3, weight_decay: float = 0.0) -> MeZO:
    if not eps > 0:
        raise ValueError(f"optimizer.mezo_eps={eps} must be > 0 (the perturbation scale; "
                         "the paper uses 1e-3)")

    def update(*_, **__):
        raise TypeError("MeZO has no gradients to update with: it was wrapped by another "
                        "transformation (optimizer.param_groups, a PEFT method's "
                        "wrap_optimizer) or passed to a first-order step; use "
                        "step.make_train_step / mezo.make_mezo_train_step with it")

    return MeZO(lambda params: optax.EmptyState(), update, schedule, float(eps),
                float(weight_decay))


def perturbation(params: Any, key: jax.Array) -> Any:
    """The z of one step as a tree (for tests and analysis only; the step never builds it):
    leaf i is N(0, 1) float32 drawn from fold_in(key, i), block by block (`_blocks`)."""
    leaves, treedef = jax.tree.flatten(params)
    out = [_map_leaf(jnp.zeros(x.shape, jnp.float32), key, i, lambda c, z: (z, 0.0))[0]
           for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


# z is drawn in blocks of rows of at most this many numbers: drawing a 16M-number leaf (the
# embedding of `small`) at once costs several leaf-sized temporaries in the RNG.
BLOCK_ELEMENTS = 2**20


def _blocks(shape) -> int:
    """Rows of the leading axis per block: the largest divisor of shape[0] that fits."""
    if len(shape) == 0:
        return 0
    rest = max(1, int(np.prod(shape[1:])))
    best = 1
    for b in range(1, shape[0] + 1):
        if shape[0] % b == 0 and b * rest <= BLOCK_ELEMENTS:
            best = b
    return best


def _map_leaf(x, key, i, fn):
    """x updated block by block as fn(block, z block) -> (new block, scalar); returns
    (new x, sum of the scalars). z of block j comes from fold_in(fold_in(key, i), j)."""
    ki = jax.random.fold_in(key, i)
    rows = _blocks(x.shape)
    if rows == 0 or rows == x.shape[0]:
        z = jax.random.normal(jax.random.fold_in(ki, 0), x.shape, jnp.float32)
        y, a = fn(x, z)
        return y.astype(x.dtype), jnp.asarray(a, jnp.float32)

    def body(j, carry):
        x, acc = carry
        blk = jax.lax.dynamic_slice_in_dim(x, j * rows, rows)
        z = jax.random.normal(jax.random.fold_in(ki, j), blk.shape, jnp.float32)
        y, a = fn(blk, z)
        return jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), j * rows, 0), acc + a

    return jax.lax.fori_loop(0, x.shape[0] // rows, body, (x, jnp.zeros((), jnp.float32)))


def _perturb(params, key, scale):
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, x in enumerate(leaves):
        y, _ = _map_leaf(x, key, i, lambda c, z: (c + scale * z, 0.0))
        # Leaf by leaf: the next leaf's key passes a barrier with this leaf's result, so XLA
        # cannot draw every leaf's z at once.
        y, key = jax.lax.optimization_barrier((y, key))
        out.append(y)
    return jax.tree.unflatten(treedef, out)


def _restore_and_update(params, key, eps, lr, g, wd):
    """p - eps z (as held after the second pass) -> restored p + eps z, minus the step; also
    returns |z|^2 (for the norm of the estimated gradient |g| |z|)."""
    leaves, treedef = jax.tree.flatten(params)
    out, zz = [], jnp.zeros((), jnp.float32)

    def fn(c, z):
        p = c.astype(jnp.float32) + eps * z
        return p * (1.0 - lr * wd) - lr * g * z, jnp.sum(z * z)

    for i, x in enumerate(leaves):
        y, a = _map_leaf(x, key, i, fn)
        y, zz, key = jax.lax.optimization_barrier((y, zz + a, key))  # leaf by leaf
        out.append(y)
    return jax.tree.unflatten(treedef, out), zz


def _loss_sums(loss_fn, params, batch, rng, accum_steps):
    """(objective sum, stats sums) over the whole batch, micro-batch by micro-batch."""
    if accum_steps == 1:
        return loss_fn(params, batch, rng)
    micro = split_microbatches(batch, accum_steps)

    def body(carry, xs):
        mb, i = xs
        obj, s = loss_fn(params, mb, None if rng is None else jax.random.fold_in(rng, i))
        s = jax.tree.map(lambda v: v.astype(jnp.float32), s)
        return (carry[0] + obj.astype(jnp.float32), jax.tree.map(jnp.add, carry[1], s)), None

    first = jax.tree.map(lambda x: x[0], micro)
    _, s_shape = jax.eval_shape(loss_fn, params, first, rng)
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), s_shape)
    (obj, stats), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zero),
                                   (micro, jnp.arange(accum_steps)))
    return obj, stats


def mezo_update(loss_fn, params: Any, batch: dict, key: jax.Array, *, lr, eps: float,
                weight_decay: float = 0.0, rng: Optional[jax.Array] = None,
                accum_steps: int = 1, full: Optional[Callable] = None):
    """One MeZO step on `params` (the leaves that train). Returns (params, stats, info).

    loss_fn(params, batch, rng) -> (objective_sum, stats with "tokens"), as the first-order
    step's; the loss is objective_sum / tokens. `full` (optional) maps the trained leaves to
    the tree the loss is applied to (adds the frozen leaves). The same `rng` (dropout) is used
    for both passes, so their difference measures the perturbation only.
    stats: the two passes' stats averaged; info: {"projected_grad", "z_sq"}.
    """
    full = full or (lambda p: p)

    def loss(p):
        obj, s = _loss_sums(loss_fn, full(p), batch, rng, accum_steps)
        return obj / jnp.maximum(s["tokens"], 1.0), s

    p = _perturb(params, key, eps)                      # p + eps z
    l_plus, s_plus = loss(p)
    p, l_plus, key2 = jax.lax.optimization_barrier((p, l_plus, key))
    p = _perturb(p, key2, -2.0 * eps)                   # p - eps z
    l_minus, s_minus = loss(p)
    p, l_minus, key3 = jax.lax.optimization_barrier((p, l_minus, key))
    g = (l_plus - l_minus).astype(jnp.float32) / (2.0 * eps)
    p, zz = _restore_and_update(p, key3, eps, lr, g, weight_decay)
    stats = jax.tree.map(lambda a, b: (a + b) / 2, s_plus, s_minus)
    return p, stats, {"projected_grad": g, "z_sq": zz}


def make_mezo_step(loss_fn, *, eps: float = 1e-3, learning_rate=None,
                   schedule: Optional[Callable] = None, weight_decay: float = 0.0,
                   accum_steps: int = 1):
    """`(params, batch, key, step) -> (params, metrics)`, to be jitted with donate_argnums=0.

    z is drawn from fold_in(key, step), so one run key serves every step; the learning rate
    is `schedule(step)` or the constant `learning_rate`."""
    if (learning_rate is None) == (schedule is None):
        raise ValueError("make_mezo_step: give exactly one of learning_rate and schedule")
    sched = schedule or (lambda _: learning_rate)

    def step_fn(params, batch, key, step):
        k = jax.random.fold_in(key, step)
        lr = sched(step)
        params, stats, info = mezo_update(loss_fn, params, batch, jax.random.fold_in(k, 0),
                                          lr=lr, eps=eps, weight_decay=weight_decay,
                                          rng=jax.random.fold_in(k, 1),
                                          accum_steps=accum_steps)
        return params, _metrics(stats, info, lr)

    return step_fn


def _metrics(stats, info, lr):
    denom = jnp.maximum(stats["tokens"], 1.0)
    m = {k: v / denom for k, v in stats.items() if k != "tokens"}
    m["loss"] = m.pop("nll")
    m["tokens"] = stats["tokens"]
    g = info["projected_grad"]
    m["projected_grad"] = g
    m["grad_norm"] = jnp.abs(g) * jnp.sqrt(info["z_sq"])   # norm of the estimate g z
    m["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return m


def make_mezo_train_step(loss_fn, tx: MeZO, *, accum_steps: int = 1,
                         schedule: Optional[Callable] = None):
    """The loop's `(TrainState, batch) -> (TrainState, metrics)` for `optimizer.name="mezo"`:
    same state, shardings and donation as the first-order step (`opt_state` is empty)."""
    del schedule  # the MeZO settings carry the run's schedule
    from ftjax.peft.core import combine

    def train_step(state, batch):
        rng, step_rng = jax.random.split(state.rng)
        full = (lambda p: combine(p, state.frozen)) if state.frozen is not None else None
        lr = tx.schedule(state.step)
        params, stats, info = mezo_update(
            loss_fn, state.params, batch, jax.random.fold_in(step_rng, 0), lr=lr, eps=tx.eps,
            weight_decay=tx.weight_decay, rng=jax.random.fold_in(step_rng, 1),
            accum_steps=accum_steps, full=full)
        new_state = state.replace(step=state.step + 1, params=params, rng=rng)
        return new_state, _metrics(stats, info, lr)

    return train_step
