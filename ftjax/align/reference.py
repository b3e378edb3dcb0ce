"""The reference model of preference training, without a second copy of the weights when possible.

Three ways to get reference log-probs (`dpo.reference`):

  strip       in the step: the policy's own params with every adapter removed
              (`strip_adapters`), under stop_gradient. No extra memory; exact whenever the
              adapters start as a no-op and hold nothing but their base besides what trains
              (LoRA/QLoRA/DoRA/IA3/VeRA with their default inits). Prompt and prefix tuning
              get the base model without the virtual tokens, as TRL's adapter-disabled
              reference.
  precompute  once, before training: the starting policy (`Run.starting_params()`: the params of
              step 0, adapters included, through the method's forward) scores every
              training and validation pair, the table is cached in the workdir and the
              values are attached to each batch (`ref_chosen_logps`, `ref_rejected_logps`) by
              the rows' content; no reference weights are kept during training.
  copy        a frozen copy of the starting policy scores each batch as the loader yields it
              (a separate jitted forward with the copy as an explicit sharded argument);
              costs one model of memory and a host sync per step.
  auto        strip when every trainable leaf is an adapter field of a structured weight
              whose removal restores the starting model, else precompute.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ftjax import models, peft
from ftjax.align import logps as lp
from ftjax.models.config import ModelConfig
from ftjax.peft import core as peft_core

MODES = ("auto", "strip", "precompute", "copy")


def _strip_one(path: str, w: Any) -> Any:
    # Adapters give way to their frozen base (`StructuredWeight.frozen_base`, unwrapped
    # recursively): a plain array or a structured base such as NF4Weight (stays quantized).
    if not peft_core.is_structured(w) or not w.trainable_fields():
        return w
    if not peft_core.is_adapter(w):
        raise ValueError(f"{path}: {type(w).__name__} trains {w.trainable_fields()} but defines "
                         "no frozen_base(), so the model without it is undefined; use "
                         "dpo.reference=precompute or copy")
    return w.frozen_base()


def strip_adapters(params: Any) -> Any:
    """The params with every adapter replaced by the frozen weight it sits on
    (`frozen_base()`: nested bases kept as they are, LoRA over NF4 gives the NF4 weight)."""
    return peft_core.map_weights(_strip_one, params)


def _inexact(w: Any) -> str:
    """Why stripping the structured weight `w` would not give the original weight ("" if it
    would): an adapter with no frozen base, or one whose base is not the original weight."""
    if not peft_core.is_structured(w):
        return ""
    if w.trainable_fields() and not peft_core.is_adapter(w):
        return f"{type(w).__name__} trains but defines no frozen_base()"
    if peft_core.is_adapter(w) and not w.frozen_base_exact():
        return f"{type(w).__name__} holds part of the original weight"
    for field in w.array_fields():  # adapters stacked on adapters
        why = _inexact(getattr(w, field))
        if why:
            return why
    return ""


def strip_safe(abstract_params: Any, train_patterns, peft_cfg: Any = None) -> tuple[bool, str]:
    """(whether `strip` reproduces the starting model, why not).

    Plain leaves that train (full or partial fine-tuning, `peft.train_patterns`) change the
    stripped model; so do adapters whose `frozen_base()` is not the original weight
    (`frozen_base_exact()` False: a serial bottleneck adapter holds the projection's folded-in
    bias), and LoRA with init="pissa", which moves the principal part of W into the adapter.
    Frozen fields besides the base (LoRA-FA's frozen A, the memory experts' layer mask) go
    with the adapter, so they do not matter. Adapters with no frozen base cannot be stripped.
    """
    mask = peft_core.trainable_mask(abstract_params, train_patterns)
    plain: list[str] = []
    inexact: list[str] = []

    def visit(path, w, m):
        name = peft_core.path_str(path)
        if not peft_core.is_structured(w):
            if m:
                plain.append(name)
            return
        why = _inexact(w)
        if why:
            inexact.append(f"{name} ({why})")
    jax.tree_util.tree_map_with_path(visit, abstract_params, mask, is_leaf=peft_core.is_structured)
    if plain:
        return False, f"plain params train ({', '.join(plain[:3])}{', ...' if len(plain) > 3 else ''})"
    if inexact:
        return False, f"stripping the adapters does not give the original weights: {inexact[0]}"
    init = peft.resolve(peft_cfg).get("init", "default") if peft_cfg is not None else "default"
    if init == "pissa":
        return False, "LoRA init='pissa' moves W's principal part into the adapter"
    return True, ""


def resolve_mode(mode: str, abstract_params: Any, train_patterns, peft_cfg: Any) -> str:
    """The concrete reference mode for `dpo.reference`; raises when `strip` would be wrong."""
    if mode not in MODES:
        raise ValueError(f"dpo.reference={mode!r}: choose one of {MODES}")
    safe, why = strip_safe(abstract_params, train_patterns, peft_cfg)
    if mode == "strip" and not safe:
        raise ValueError(f"dpo.reference='strip' would not give the starting model: {why}; "
                         "use dpo.reference=precompute (or copy, or auto)")
    if mode != "auto":
        return mode
    return "strip" if safe else "precompute"


def pair_rows(batch: dict, key: str) -> jax.Array:
    """[B, T] chosen and rejected halves interleaved into [2B, T] (row 2i chosen i, 2i+1
    rejected i), keeping each pair's rows on the devices that hold the pair."""
    c, r = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    return jnp.stack([c, r], axis=1).reshape((-1,) + c.shape[1:])


def pair_logps(params: Any, model_cfg: ModelConfig, batch: dict, apply_fn=None,
               **apply_kw) -> dict:
    """Summed completion log-probs and counts of both halves: {"chosen", "rejected",
    "chosen_counts", "rejected_counts"} [B] each, from one forward over the 2B rows, plus the
    forward's "aux" (MoE routing statistics)."""
    apply_fn = apply_fn or models.apply
    logits, aux = apply_fn(params, model_cfg, pair_rows(batch, "inputs"),
                           positions=pair_rows(batch, "positions"),
                           segment_ids=pair_rows(batch, "segment_ids"), **apply_kw)
    s = lp.sequence_logps(logits, pair_rows(batch, "targets"), pair_rows(batch, "loss_mask"))
    return {"chosen": s["logps"][0::2], "rejected": s["logps"][1::2],
            "chosen_counts": s["counts"][0::2], "rejected_counts": s["counts"][1::2],
            "aux": aux}


def make_ref_logps_fn(model_cfg: ModelConfig, apply_fn=None
                      ) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """Jitted `(ref_params, batch) -> (chosen [B, 1], rejected [B, 1])` reference log-probs
    (`[B, 1]` so that they travel in the batch with the 2-D batch sharding). apply_fn: the
    PEFT method's forward when the reference is the starting policy."""
    def fn(ref_params, batch):
        s = pair_logps(ref_params, model_cfg, batch, apply_fn)
        return s["chosen"][:, None], s["rejected"][:, None]
    return jax.jit(fn)
