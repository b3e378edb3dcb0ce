"""Half Fine-Tuning, HFT (Hui et al. 2024, arXiv 2404.18466): full fine-tuning in which, in each
round, half of the parameters of every block are frozen and the other half train, the halves
being re-drawn every round.

The paper's recipe (category-level selection, p = 0.5), per layer: 2 of the 4 attention
matrices (q, k, v, o), 1 or 2 of the 3 FFN matrices (gate, up, down) balanced across layers so
the total is half, and half of the norms; embeddings, lm_head and the final norm always train.
Seen as an optimisation of theta0 + M * dtheta with a 0/1 mask M (the paper's section 3).

In ftjax HFT is no transform of the params but a wrapper around the optimizer
(`Method.wrap_optimizer`): its state counts the steps, and at step t the mask is a pure function
of (round = t // steps_per_round, seed), computed inside the jitted step, so rounds change
without recompiling. A unit (one projection: its kernel and bias, or one norm) has its mask
broadcast over the stacked layer axis ([L, ...] leaves); the mask multiplies the gradients
before the inner optimizer (frozen units do not count towards gradient clipping, and their
moments only decay) and the updates after it (weight decay and momentum do not move them).
Optimizer moments are not reset when a unit is re-activated: they carry on (decayed) from
when it last trained. For the paper's round-per-stage use, run each stage with
`steps_per_round=0` (one draw for the whole run) and a new `seed`.

Granularity: "category" (the paper: half of each category per layer), "layer" (half of all of
a layer's units, categories pooled), "model" (half of all (layer, unit) slices, model-wide).
Layer leaves matched by no category (e.g. MoE experts) always train, as do non-layer leaves.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.peft.core import compile_patterns, path_str
from ftjax.peft.method import Method, register

# Each regex fully matches the paths of one category's leaves; group 1 names the unit.
DEFAULT_CATEGORIES = (
    r"layers/attn/(q_proj|k_proj|v_proj|o_proj)/.*",
    r"layers/mlp/(gate_proj|up_proj|down_proj)/.*",
    r"layers/(attn_norm|mlp_norm|attn/q_norm|attn/k_norm)/.*",
)
GRANULARITIES = ("category", "layer", "model")


class HFTState(NamedTuple):
    count: jax.Array        # steps taken: the round is count // steps_per_round
    inner: Any


def _units(tree: Any, categories: Sequence[str]):
    """({path: (category, unit)}, [unit names per category], L) from the leaves' paths."""
    pats = compile_patterns(categories)
    found: dict[str, tuple[int, str]] = {}
    lead: dict[str, int] = {}

    def one(path, x):
        p = path_str(path)
        for c, pat in enumerate(pats):
            m = pat.fullmatch(p)
            if m:
                found[p] = (c, m.group(1) if pat.groups else p)
                lead[p] = int(np.shape(x)[0]) if np.ndim(x) else 0
                return
    jax.tree_util.tree_map_with_path(one, tree)
    if not found:
        raise ValueError(f"HFT: no param path matches the categories {list(categories)}; "
                         "set peft.categories to regexes over the stacked layer weights")
    if len(set(lead.values())) != 1:
        raise ValueError(f"HFT: category leaves must share their leading layer dim, got {lead}")
    names = [sorted({u for c_, u in found.values() if c_ == c}) for c in range(len(pats))]
    plan = {p: (c, names[c].index(u)) for p, (c, u) in found.items()}
    return plan, names, next(iter(lead.values()))


def _choose(key: jax.Array, n_layers: int, n_units: int, ratio: float) -> jax.Array:
    """Bool [L, n]: `ratio` of the units of each layer (row) train.

    Layer l trains k_l = floor((pi_l+1) q + o) - floor(pi_l q + o) units, q = n * ratio, for a
    random layer order pi and offset o in [0, 1): k_l is floor(q) or ceil(q) and the k_l sum to
    floor(L q + o), so e.g. 1 or 2 of 3 FFN matrices with half of them over all layers.
    """
    k_off, k_order, k_pick = jax.random.split(key, 3)
    off = jax.random.uniform(k_off)
    order = jax.random.permutation(k_order, n_layers).astype(jnp.float32)
    q = n_units * ratio
    k = jnp.floor((order + 1) * q + off) - jnp.floor(order * q + off)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_pick, (n_layers, n_units)), axis=1),
                       axis=1)
    return rank < k[:, None]


class Selection(NamedTuple):
    plan: dict          # leaf path -> (category index, unit index)
    names: list         # unit names of each category
    tables: list        # per category, bool [L, n_units]: which units train this round


def selection(tree: Any, step: Any, *, seed: int = 0, steps_per_round: int = 0,
              ratio: float = 0.5, granularity: str = "category",
              categories: Sequence[str] = DEFAULT_CATEGORIES) -> Selection:
    """Which units of which layers train in the round holding `step` (a pure function of
    round = step // steps_per_round, or 0 when steps_per_round is 0, and seed)."""
    plan, names, n_layers = _units(tree, categories)
    rnd = step // steps_per_round if steps_per_round > 0 else jnp.zeros_like(step)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), rnd)
    sizes = [len(n) for n in names]
    if granularity == "category":
        tables = [_choose(jax.random.fold_in(key, c), n_layers, n, ratio)
                  for c, n in enumerate(sizes)]
    elif granularity in ("layer", "model"):
        total = sum(sizes)
        joint = (_choose(key, n_layers, total, ratio) if granularity == "layer"
                 else _choose(key, 1, n_layers * total, ratio).reshape(n_layers, total))
        tables = jnp.split(joint, np.cumsum(sizes)[:-1], axis=1)
    else:
        raise ValueError(f"peft.granularity={granularity!r}; choose one of {GRANULARITIES}")
    return Selection(plan, names, list(tables))


def round_masks(tree: Any, step: Any, **kw) -> Any:
    """Float multipliers with the structure of `tree`: [L, 1, ..] 0/1 for category leaves, 1.0
    for the rest."""
    sel = selection(tree, step, **kw)

    def one(path, x):
        hit = sel.plan.get(path_str(path))
        if hit is None:
            return jnp.ones((), jnp.float32)
        col = sel.tables[hit[0]][:, hit[1]].astype(jnp.float32)
        return col.reshape(col.shape + (1,) * (np.ndim(x) - 1))
    return jax.tree_util.tree_map_with_path(one, tree)


def hft_optimizer(tx: optax.GradientTransformation, **kw) -> optax.GradientTransformation:
    """`tx` with HFT's per-round masks on gradients and updates (kw: see `selection`)."""
    unknown = set(kw) - {"seed", "steps_per_round", "ratio", "granularity", "categories"}
    if unknown:
        raise TypeError(f"hft_optimizer: unknown arguments {sorted(unknown)}")
    if kw.get("granularity", "category") not in GRANULARITIES:
        raise ValueError(f"peft.granularity={kw['granularity']!r}; choose one of "
                         f"{GRANULARITIES}")
    if not 0.0 < float(kw.get("ratio", 0.5)) <= 1.0:
        raise ValueError(f"peft.ratio={kw['ratio']!r} (the trained fraction) must be in (0, 1]")

    def mask(tree, masks):
        return jax.tree.map(lambda u, m: (u * m).astype(u.dtype), tree, masks)

    def init(params):
        _units(params, kw.get("categories", DEFAULT_CATEGORIES))  # fail early on a bad tree
        return HFTState(jnp.zeros((), jnp.int32), tx.init(params))

    def update(updates, state, params=None):
        masks = round_masks(updates, state.count, **kw)
        updates, inner = tx.update(mask(updates, masks), state.inner, params)
        return mask(updates, masks), HFTState(optax.safe_int32_increment(state.count), inner)

    return optax.GradientTransformation(init, update)


DEFAULTS = dict(
    seed=0,                        # the round plans are a function of (seed, round)
    steps_per_round=0,             # steps per round of masks; 0: one round for the whole run
    ratio=0.5,                     # fraction of each category's units trained per round
    granularity="category",        # category | layer | model
    categories=DEFAULT_CATEGORIES,  # regexes, one per category of units
    train_patterns=(),             # plain leaves that train; empty: everything
)


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """HFT from a resolved `peft` section (see DEFAULTS)."""
    del apply_fn, tokenizer
    kw = dict(seed=int(s.seed), steps_per_round=int(s.steps_per_round), ratio=float(s.ratio),
              granularity=str(s.granularity), categories=tuple(s.categories))
    return Method(name="hft", transform=None,
                  train_patterns=tuple(s.train_patterns or ()) or (".*",),
                  wrap_optimizer=functools.partial(hft_optimizer, **kw))


register("hft", DEFAULTS, method, dict(steps_per_round=">= 0", ratio="in (0, 1]",
                                       granularity=GRANULARITIES))
