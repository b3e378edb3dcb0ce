"""QLoRA (Dettmers et al. 2023): LoRA over a frozen 4-bit NormalFloat base.

`apply_qlora` quantizes the targets (NF4 with double quantization by default, or int8) and
wraps each in `LoRAWeight(base=NF4Weight(...), a, b)`; `quantize_targets` may quantize more
weights than get adapters (the paper quantizes every linear layer). The adapters are
initialised exactly as `lora.apply_lora` does with the same key, so at initialisation the
model equals the *dequantized* base, not the original one.

Merging has to say where the update goes (`merge_qlora`):
  dequantized  W = deq(Q) + s·A·B — exactly the function that was trained;
  original     W = W0 + s·A·B — the full-precision base the quantized one came from, which
               differs from the trained function by the quantization error W0 - deq(Q).
The report gives the max abs difference between the two merges for every weight.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from ftjax.peft import lora, quant
from ftjax.peft.core import StructuredWeight, compile_patterns, map_weights, materialize
from ftjax.peft.lora import DEFAULT_TARGETS, LoRAWeight, init_factors, wrap_targets
from ftjax.peft.method import Method, register


def apply_qlora(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
                targets: Sequence[str] = DEFAULT_TARGETS,
                quantize_targets: Optional[Sequence[str]] = None, quant_kind: str = "nf4",
                block_size: int = 64, double_quant: bool = True, rslora: bool = False,
                init: str = "default", rank_pattern: Optional[dict] = None,
                alpha_pattern: Optional[dict] = None, dtype=None) -> Any:
    """Quantizes `targets` (plus any `quantize_targets`) and puts LoRA on `targets`.

    init: default (A Kaiming-uniform, B = 0) or gaussian. PiSSA/LoftQ-style inits, which
    move part of W into the adapter before quantizing, are not implemented.
    """
    if init not in ("default", "gaussian"):
        raise ValueError(f"QLoRA init={init!r} is not supported; choose default or gaussian")
    qkw = dict(block_size=block_size, double_quant=double_quant) if quant_kind == "nf4" else {}
    lora_pats = compile_patterns(targets)
    extra = [t for t in (quantize_targets or ()) if t not in targets]
    if extra:  # quantized without an adapter (frozen, dequantized in the product)
        q_pats = compile_patterns(extra)
        params = map_weights(
            lambda p, w: w if (any(x.fullmatch(p) for x in lora_pats)
                               or not any(x.fullmatch(p) for x in q_pats)
                               or isinstance(w, StructuredWeight))
            else quant.quantize(w, quant_kind, **qkw), params)

    def make(path, w, r, s, k):
        # The same factors as apply_lora for the same key; the base is quantized.
        a, b, _ = init_factors(k, w, r, s, init, is_embedding=path.endswith("embedding"))
        adt = dtype or jnp.float32
        return LoRAWeight(base=quant.quantize(w, quant_kind, **qkw), a=a.astype(adt),
                          b=b.astype(adt), scale=s)

    return wrap_targets(params, key, "QLoRA", targets, None, make, rank=rank, alpha=alpha,
                        rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _is_quantized(w: Any) -> bool:
    return isinstance(w, quant.QUANTIZED)


def merge_qlora(params: Any, target: str = "dequantized",
                original_params: Any = None) -> tuple[Any, dict]:
    """Dense params with every adapter merged, and a report.

    target="dequantized": W = deq(Q) + s·A·B (equals the unmerged quantized model).
    target="original": W = W0 + s·A·B with W0 from `original_params` (the params before
      `apply_qlora`, same tree), i.e. the adapter applied to the full-precision base.
    Report: {"target", "max_abs_error", "per_weight": {path: max |merge_deq - merge_orig|}},
    the elementwise gap between the two merges (= max |W0 - deq(Q)|); `max_abs_error` is None
    when `original_params` is not given.
    """
    if target not in ("dequantized", "original"):
        raise ValueError(f"merge target {target!r}: choose 'dequantized' or 'original'")
    if target == "original" and original_params is None:
        raise ValueError("target='original' needs original_params (the params before "
                         "apply_qlora) to merge the adapters into")
    originals: dict[str, Any] = {}
    if original_params is not None:
        map_weights(lambda p, w: originals.__setitem__(p, w), original_params)
    per_weight: dict[str, float] = {}

    def one(path, w):
        if not isinstance(w, StructuredWeight):
            return w
        if isinstance(w, LoRAWeight) and _is_quantized(w.base):
            deq = materialize(w.base)
            delta = (w.scale * jnp.matmul(w.a, w.b)).astype(deq.dtype)
        elif _is_quantized(w):
            deq, delta = materialize(w), None
        else:
            return materialize(w)  # other structured weights merge as usual
        merged_deq = deq if delta is None else deq + delta
        if original_params is None:
            return merged_deq
        if path not in originals:
            raise ValueError(f"original_params has no weight {path!r}; pass the params the "
                             "quantized model was made from")
        orig = jnp.asarray(originals[path]).astype(deq.dtype)
        if orig.shape != deq.shape:
            raise ValueError(f"original weight {path!r} has shape {orig.shape}, the quantized "
                             f"one {deq.shape}")
        merged_orig = orig if delta is None else orig + delta
        per_weight[path] = float(jnp.max(jnp.abs(merged_deq.astype(jnp.float32)
                                                 - merged_orig.astype(jnp.float32))))
        return merged_deq if target == "dequantized" else merged_orig

    merged = map_weights(one, params)
    report = {"target": target,
              "max_abs_error": max(per_weight.values()) if per_weight else None,
              "per_weight": per_weight}
    return merged, report


# LoRA's settings without dropout, plus the quantization of the frozen base.
DEFAULTS = dict({k: v for k, v in lora.DEFAULTS.items() if k != "dropout"},
                quant="nf4",              # nf4 | int8
                block_size=64,            # NF4 block size
                double_quant=True,        # NF4: quantize the block scales too
                quantize_targets=())      # more weights quantized (frozen) without an adapter


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    """QLoRA from a resolved `peft` section (see DEFAULTS)."""
    del apply_fn, tokenizer
    transform = functools.partial(
        apply_qlora, **lora.lowrank_kwargs(s),
        quantize_targets=tuple(s.quantize_targets) or None, quant_kind=str(s.quant),
        block_size=int(s.block_size), double_quant=bool(s.double_quant))
    return Method(name="qlora", transform=transform, train_patterns=tuple(s.train_patterns))


CHECKS = dict({k: v for k, v in lora.CHECKS.items() if k in DEFAULTS},
              quant=quant.KINDS, block_size=">= 1")

register("qlora", DEFAULTS, method, CHECKS)
