"""Which PEFT codec writes (and reads back) each kind of structured weight.

A *codec* says how one kind of structured weight appears in a PEFT adapter: its peft_type
(the adapter_config.json format: "LORA", "IA3"), the fields the format needs (`export`) and
how to build the weight back from them (`build`). A *format* is the writer and reader of one
peft_type (`lora_write.py` / `lora_read.py`, `ia3.py`); it sees weights only through their
codecs' `export` / `build`, never through their classes.

A weight finds its codec by type (`register_codec(LoRAWeight, ...)`: the MRO is walked, so a
subclass finds its parent's codec) or by protocol (`register_codec(predicate, ...)`: e.g. any
weight with a `lora_factors()` method is written as LoRA). The built-in registrations are in
`codecs.py`: a new weight type adds one line there, or implements a protocol and needs none.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

__all__ = ["Codec", "Format", "register_codec", "codec_for", "reader_codec", "register_format",
           "format_for", "supported_weights", "supported_formats"]


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one kind of structured weight is written as a PEFT adapter, and read back.

    peft_type: the adapter_config.json format ("LORA", "IA3"); kind: the variant's name in
    messages and flags ("lora", "dora": LORA with `use_dora`, "ia3"). export(w) returns the
    fields the format writes: LORA {base, a [.., in, r], b [.., r, out], scale} plus m [.., out]
    for "dora"; IA3 {base, ia3_l, feedforward}. build(base, **fields) makes the weight a
    reader returns (None: this codec only writes). on_experts: the weight may sit on
    mixture-of-experts parameters (PEFT's target_parameters take plain LoRA only).
    """
    peft_type: str
    kind: str
    export: Callable[[Any], dict[str, Any]]
    build: Optional[Callable[..., Any]] = None
    on_experts: bool = False


@dataclasses.dataclass(frozen=True)
class Format:
    """The writer and reader of one peft_type.

    write(request) -> (tensors, adapter_config fields) for `save.WriteRequest`;
    read(request) -> params for `load.ReadRequest`; describe: what the reader supports, for
    error messages.
    """
    peft_type: str
    write: Callable[[Any], tuple[dict, dict]]
    read: Callable[[Any], Any]
    describe: str


_BY_TYPE: dict[type, Codec] = {}
_BY_PROTOCOL: list[tuple[Callable[[Any], bool], str, Codec]] = []
_FORMATS: dict[str, Format] = {}


def register_codec(weight: Union[type, Callable[[Any], bool]], codec: Codec, *,
                   protocol: str = "") -> Codec:
    """Writes weights of class `weight` (and its subclasses) with `codec`; or, for a predicate,
    every weight it accepts that no class registration claims (`protocol` names it in error
    messages, e.g. "a lora_factors() method"). Returns the codec."""
    if isinstance(weight, type):
        _BY_TYPE[weight] = codec
    elif callable(weight):
        _BY_PROTOCOL.append((weight, protocol or getattr(weight, "__name__", "protocol"), codec))
    else:
        raise TypeError(f"register_codec takes a weight class or a predicate, got {weight!r}")
    return codec


def codec_for(w: Any) -> Optional[Codec]:
    """The codec of a structured weight: its class's (nearest in the MRO), else the first
    protocol it satisfies; None when it has no PEFT form."""
    for cls in type(w).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    for accepts, _, codec in _BY_PROTOCOL:
        if accepts(w):
            return codec
    return None


def reader_codec(kind: str) -> Optional[Codec]:
    """The codec whose `build` makes the weights of `kind` a reader returns (first registered)."""
    for codec in [*_BY_TYPE.values(), *(c for _, _, c in _BY_PROTOCOL)]:
        if codec.kind == kind and codec.build is not None:
            return codec
    return None


def register_format(fmt: Format) -> Format:
    """Makes `fmt` the writer and reader of its peft_type."""
    _FORMATS[fmt.peft_type.upper()] = fmt
    return fmt


def format_for(peft_type: str) -> Optional[Format]:
    return _FORMATS.get(str(peft_type).upper())


def supported_weights() -> str:
    """What has a PEFT form, for error messages ("LoRAWeight, DoRAWeight, IA3Weight, ...")."""
    names = [cls.__name__ for cls in _BY_TYPE]
    names += [f"weights with {name}" for _, name, _ in _BY_PROTOCOL]
    return ", ".join(names)


def supported_formats() -> dict[str, Format]:
    return dict(_FORMATS)
