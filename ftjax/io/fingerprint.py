"""A fingerprint of a run's base weights, stored with its checkpoints, so that whatever
rebuilds the base later (an export, a resume that rebuilds frozen weights) can check that it
rebuilt the weights the run trained on.

A PEFT run's checkpoints hold only what trained; the frozen base is rebuilt from
`model.init_from` (or the seeded random init). If that file changed or was replaced, the
rebuilt model would be wrong without any error; the fingerprint turns that into a refusal.

Per leaf of the base params (before any PEFT transform): its path, shape and dtype, the sum of
squares of every element (float32), and `SAMPLES` values at fixed strided positions (a grid
of about SAMPLES^(1/ndim) indices per axis). Computing it is one reduction per leaf plus a
strided slice, and it runs under jit on sharded arrays without gathering any leaf, so it costs
next to nothing for a 7B model (the result is ~1 KB per leaf). Two fingerprints match when
paths, shapes and dtypes are equal and every sum and sampled value agrees to a relative
`RTOL` (random inits rebuilt on another backend or mesh may differ in the last bits). It
detects a different or retrained base file; it cannot see a change confined to elements off
the sample grid that leaves every sum of squares within RTOL.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import numpy as np

__all__ = ["SAMPLES", "RTOL", "summaries", "fingerprint", "compare", "check"]

SAMPLES = 64    # sampled values per leaf
RTOL = 1e-4     # relative tolerance of sums and samples
VERSION = 1


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    per_axis = max(1, math.ceil(SAMPLES ** (1.0 / max(len(shape), 1))))
    return tuple(max(1, -(-n // per_axis)) for n in shape)


def summaries(params: Any) -> dict[str, dict]:
    """path -> {"sumsq", "sample"} as arrays; jittable (jax arrays, sharded or not)."""
    import jax.numpy as jnp
    from ftjax.io.params_file import flatten
    out = {}
    for path, x in flatten(params).items():
        x = jnp.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1)
        sample = x[tuple(slice(None, None, s) for s in _strides(x.shape))]
        x32 = x.astype(jnp.float32)
        out[path] = {"sumsq": jnp.sum(x32 * x32),
                     "sample": sample.reshape(-1).astype(jnp.float32)}
    return out


def fingerprint(params: Any, computed: Optional[dict] = None) -> dict:
    """The JSON fingerprint of `params` (host or device arrays). `computed`: the output of
    `summaries(params)` when it was computed already (e.g. inside the jit that made params)."""
    import jax
    from ftjax.io.params_file import flatten
    if computed is None:
        computed = jax.jit(summaries)(params)
    computed = jax.device_get(computed)
    leaves = {}
    for path, x in sorted(flatten(params).items()):
        s = computed[path]
        leaves[path] = {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name,
                        "sumsq": float(s["sumsq"]),
                        "sample": [float(v) for v in np.asarray(s["sample"])]}
    # A short digest for messages; samples rounded so last-bit differences do not change it.
    rounded = {p: [v["shape"], v["dtype"], [float(f"{x:.3g}") for x in v["sample"]]]
               for p, v in leaves.items()}
    digest = hashlib.sha256(json.dumps(rounded, sort_keys=True).encode()).hexdigest()[:12]
    return {"version": VERSION, "samples": SAMPLES, "digest": digest, "leaves": leaves}


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= RTOL * max(scale, 1e-30)


def compare(saved: dict, now: dict) -> list[str]:
    """Differences between two fingerprints, one string per differing leaf (empty: equal)."""
    a, b = saved.get("leaves", {}), now.get("leaves", {})
    problems = [f"{p}: missing now" for p in sorted(set(a) - set(b))]
    problems += [f"{p}: not in the saved base" for p in sorted(set(b) - set(a))]
    for p in sorted(set(a) & set(b)):
        x, y = a[p], b[p]
        if x["shape"] != y["shape"] or x["dtype"] != y["dtype"]:
            problems.append(f"{p}: {x['dtype']}{x['shape']} then, {y['dtype']}{y['shape']} now")
            continue
        sx, sy = np.asarray(x["sample"]), np.asarray(y["sample"])
        scale = float(np.abs(sx).max()) if sx.size else 0.0
        if sx.shape != sy.shape or not all(_close(u, v, scale) for u, v in zip(sx, sy)) \
                or not _close(x["sumsq"], y["sumsq"], max(abs(x["sumsq"]), abs(y["sumsq"]))):
            delta = float(np.abs(sx - sy).max()) if sx.shape == sy.shape else float("nan")
            problems.append(f"{p}: values differ (max |diff| {delta:.3g} over sampled values "
                            f"of magnitude {scale:.3g})")
    return problems


def check(saved: Optional[dict], now: dict, what: str) -> None:
    """Refuses, in one line, when the fingerprint `now` of a rebuilt base differs from the
    `saved` one (None: nothing was recorded, nothing to check). `what` names the rebuilt base
    for the message, e.g. "the base rebuilt from model.init_from='base.safetensors'"."""
    if saved is None:
        return
    problems = compare(saved, now)
    if problems:
        raise ValueError(f"{what} is not the base the run trained on (fingerprint "
                         f"{saved.get('digest')} then, {now.get('digest')} now; {len(problems)} "
                         f"of {len(saved.get('leaves', {}))} leaves differ, e.g. {problems[0]}):"
                         " the base file changed or was replaced. Restore the original base (or "
                         "point model.init_from in the workdir's config.json at it); a model "
                         "built on this base would not be the trained one")
