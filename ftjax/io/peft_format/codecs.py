"""The built-in codecs and formats: which ftjax structured weights have a PEFT form, and how.

A new weight type that is LoRA underneath needs no entry: its `lora_factors()` (the
StructuredWeight protocol, ftjax.peft.core) returns (a [.., in, r], b [.., r, out], scale)
and its `base` field holds the weight under it, and the LoRA codec writes it (LoRA-FA does
this). Anything else registers here with `register_codec(WeightClass, Codec(...))`
(see registry.py); a new peft_type also needs a format (a writer and a reader, see ia3.py).
QLoRA (LoRA over an NF4/int8 base) and LoRA on stacked MoE experts are LoRAWeights: the
base is not part of the adapter, and experts are a leading axis of the factors.
"""
from __future__ import annotations

from typing import Any

from ftjax.io.peft_format.ia3 import read_ia3, write_ia3
from ftjax.io.peft_format.lora_read import read_lora
from ftjax.io.peft_format.lora_write import write_lora
from ftjax.io.peft_format.registry import Codec, Format, register_codec, register_format
from ftjax.peft.dora import DoRAWeight
from ftjax.peft.ia3 import IA3Weight
from ftjax.peft.lora import LoRAWeight

__all__ = ["LORA", "DORA", "IA3", "LORA_FACTORS"]


def _lora_fields(w: Any) -> dict[str, Any]:
    return dict(base=w.base, a=w.a, b=w.b, scale=w.scale)


def _dora_fields(w: Any) -> dict[str, Any]:
    return dict(base=w.base, a=w.a, b=w.b, scale=w.scale, m=w.m)


def _ia3_fields(w: Any) -> dict[str, Any]:
    return dict(base=w.base, ia3_l=w.ia3_l, feedforward=w.feedforward)


def _factor_fields(w: Any) -> dict[str, Any]:
    a, b, scale = w.lora_factors()
    return dict(base=w.base, a=a, b=b, scale=scale)


def _has_lora_factors(w: Any) -> bool:
    """StructuredWeight.lora_factors() returns None unless the weight is base + s * a @ b."""
    factors = getattr(w, "lora_factors", None)
    return callable(factors) and hasattr(w, "base") and factors() is not None


LORA = register_codec(LoRAWeight, Codec(
    "LORA", "lora", _lora_fields, on_experts=True,
    build=lambda base, a, b, scale: LoRAWeight(base=base, a=a, b=b, scale=scale)))
DORA = register_codec(DoRAWeight, Codec(
    "LORA", "dora", _dora_fields,
    build=lambda base, a, b, m, scale: DoRAWeight(base=base, a=a, b=b, m=m, scale=scale)))
IA3 = register_codec(IA3Weight, Codec(
    "IA3", "ia3", _ia3_fields,
    build=lambda base, ia3_l, feedforward: IA3Weight(base=base, ia3_l=ia3_l,
                                                     feedforward=feedforward)))
# Written as LoRA, read back as LoRAWeight (the reader cannot know the original class).
LORA_FACTORS = register_codec(_has_lora_factors, Codec("LORA", "lora", _factor_fields,
                                                       on_experts=True),
                              protocol="a lora_factors() method and a base")

register_format(Format("LORA", write_lora, read_lora,
                       "LORA (incl. rsLoRA, rank/alpha patterns, DoRA)"))
register_format(Format("IA3", write_ia3, read_ia3, "IA3"))
