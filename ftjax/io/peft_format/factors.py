"""LoRA factors in PEFT's layout, and the conversions between it and ftjax's.

ftjax's a [.., in, r] / b [.., r, out] are PEFT's lora_A.T / lora_B.T ([r, in] / [out, r]);
stacked layers are a leading index of the ftjax leaf, stacked experts a leading axis of the
factors (PEFT's ParamWrapper flattens them, see `to_peft_factors`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from ftjax.io.peft_format.files import PeftFormatError, host_slice

__all__ = ["Adapter", "row_norms", "module_adapter", "to_peft_factors", "from_peft_factors"]


@dataclasses.dataclass
class Adapter:
    """One module's LoRA in PEFT layout: A [r, in], B [out, r], scale, DoRA magnitude [out];
    for stacked experts A [E, r, in], B [E, out, r] (one adapter per expert)."""
    A: np.ndarray
    B: np.ndarray
    scale: float
    magnitude: Optional[np.ndarray] = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[-2])


def row_norms(w_in_out: np.ndarray) -> np.ndarray:
    """Norm of each output unit's weights: PEFT's `||W||` over dim 1 of the [out, in] weight."""
    return np.linalg.norm(w_in_out.astype(np.float64), axis=0).astype(np.float32)


def _part_adapter(fields: dict[str, Any], layer: Any) -> Adapter:
    """One leaf slot's adapter from its codec's fields (a, b, scale; m for DoRA)."""
    a, b = host_slice(fields["a"], layer), host_slice(fields["b"], layer)
    mag = None
    if "m" in fields:
        mag = host_slice(fields["m"], layer).reshape(-1)
    return Adapter(A=np.ascontiguousarray(np.swapaxes(a, -1, -2)),
                   B=np.ascontiguousarray(np.swapaxes(b, -1, -2)),
                   scale=float(fields["scale"]), magnitude=mag)


def module_adapter(module: Any, fields: dict[str, dict]) -> Optional[Adapter]:
    """The PEFT adapter of a Module or Param, combining the pieces of fused weights (GPT-2's
    q|k|v, Mixtral's gate|up); None when no piece is adapted. fields: each adapted leaf's
    codec fields, by leaf path."""
    pieces = [(k, _part_adapter(fields[p], i)) for k, (p, i) in enumerate(module.parts)
              if p in fields]
    if not pieces:
        return None
    if len(module.parts) == 1:
        return pieces[0][1]
    # A stacks the pieces' ranks, B is block-diagonal (pieces without an adapter contribute
    # zero rows): B @ A = sum_k (rows of piece k) B_k @ A_k. Differing scales are folded into
    # B relative to the first piece's.
    s0 = pieces[0][1].scale
    offsets = np.cumsum((0,) + module.out_sizes)
    r_total = sum(ad.rank for _, ad in pieces)
    lead = pieces[0][1].B.shape[:-2]
    B = np.zeros(lead + (module.n_out, r_total), np.float32)
    col = 0
    for k, ad in pieces:
        B[..., offsets[k]:offsets[k + 1], col:col + ad.rank] = \
            ad.B * np.float32(ad.scale / s0) if ad.scale != s0 else ad.B
        col += ad.rank
    A = np.concatenate([ad.A for _, ad in pieces], axis=-2)
    if any(ad.magnitude is not None for _, ad in pieces):
        raise PeftFormatError(f"DoRA on the fused module {module.name!r} is not supported")
    return Adapter(A=A, B=B, scale=s0)


def to_peft_factors(ad: Adapter) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight, lora_B.weight) of a ParamWrapper: per-expert A [E, r, in] and
    B [E, out, r] become [E*r, in] (expert-major rows) and [out, r*E] (expert-minor columns)."""
    if ad.A.ndim == 2:
        return ad.A, ad.B
    e, r, n_in = ad.A.shape
    return (ad.A.reshape(e * r, n_in),
            np.ascontiguousarray(ad.B.transpose(1, 2, 0)).reshape(ad.B.shape[1], r * e))


def from_peft_factors(A: np.ndarray, B: np.ndarray, experts: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_to_peft_factors`: per-expert A [E, r, in], B [E, out, r] (2-D as given)."""
    if not experts:
        return A, B
    r = A.shape[0] // experts
    return A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts).transpose(2, 0, 1)
