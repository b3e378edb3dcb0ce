"""Adapters trained over a rewritten base (PiSSA) as adapters on the original weights."""
from __future__ import annotations

import dataclasses
from typing import Any

from ftjax.io.params_file import flatten, unflatten
from ftjax.io.peft_format.files import PeftFormatError
from ftjax.io.peft_format.registry import codec_for
from ftjax.peft.core import is_structured

__all__ = ["residual_to_standard"]


def residual_to_standard(trained: Any, initial: Any, original: Any) -> Any:
    """LoRA/DoRA leaves trained on a residual base (PiSSA: W_res = W - s*a0@b0) as adapters
    on the original W.

    trained / initial: the params after training and right after the transform (same
    structure); original: the untransformed params. W_res + s*a@b = W + s*(a@b - a0@b0), so
    the result has rank 2r: a' = [a | a0], b' = [b ; -b0] (PEFT's
    path_initial_model_for_weight_conversion does the same). DoRA's direction, hence its
    magnitude, is unchanged. Leaves written by other PEFT formats are returned as they are.
    """
    import jax.numpy as jnp
    t, i, o = flatten(trained), flatten(initial), flatten(original)
    out = {}
    for p, w in t.items():
        codec = codec_for(w) if is_structured(w) else None
        if codec is None or codec.peft_type != "LORA":
            out[p] = w
            continue
        f, f0 = codec.export(w), codec.export(i[p])
        names = {fl.name for fl in dataclasses.fields(w)} if dataclasses.is_dataclass(w) else ()
        if not {"base", "a", "b"} <= set(names):
            raise PeftFormatError(f"{p!r}: residual_to_standard rebuilds LoRA leaves with "
                                  f"dataclasses.replace(base=, a=, b=); {type(w).__name__} has "
                                  f"no such fields")
        out[p] = dataclasses.replace(w, base=o[p], a=jnp.concatenate([f["a"], f0["a"]], axis=-1),
                                     b=jnp.concatenate([f["b"], -f0["b"]], axis=-2))
    return unflatten(out)
