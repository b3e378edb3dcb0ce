"""Parameter-efficient fine-tuning as transforms on the param tree.

Every method is one file exposing `method(pcfg) -> Method`, registered in `METHODS`. A Method
bundles what the trainer needs:

  transform(params, key) -> params'   wraps weights in structured weights (core.py) or adds
                                      new plain leaves (e.g. prompt embeddings)
  train_patterns                      regexes of *plain* leaves that train (e.g. new leaves);
                                      fields of structured weights train as their class says
  apply_fn                            optional replacement of `models.apply` with the same
                                      signature, for methods that change what the model sees
                                      (virtual tokens, prefix key/values)
  wrap_optimizer                      optional `tx -> tx'` around the run's optax optimizer, for
                                      methods that act on updates (HFT's per-round masks)

The model code never changes when a method is added.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    transform: Optional[Callable[[Any, Any], Any]]
    train_patterns: Sequence[str] = ()
    apply_fn: Optional[Callable[..., Any]] = None
    # `(params, rng) -> params` run by the loss on every training step (never in eval), e.g.
    # LoRA dropout binding fresh keys into the adapters.
    bind_rng: Optional[Callable[[Any, Any], Any]] = None
    wrap_optimizer: Optional[Callable[[Any], Any]] = None
    # False for methods whose weights have no dense form (token-routed memory experts), so
    # merged exports are refused before training rather than after it.
    mergeable: bool = True


# name -> module path; each module defines `method(pcfg) -> Method`.
METHODS = {
    "full": "ftjax.peft.full",
    "lora": "ftjax.peft.lora",
    "dora": "ftjax.peft.dora",
    "qlora": "ftjax.peft.qlora",
    "ia3": "ftjax.peft.ia3",
    "adapter": "ftjax.peft.adapters",
    "prompt_tuning": "ftjax.peft.prompt",
    "prefix_tuning": "ftjax.peft.prompt",
    "hft": "ftjax.peft.hft",
    "vera": "ftjax.peft.vera",
    "memory": "ftjax.peft.memory",
}


def get_method(pcfg: Any) -> Method:
    """The Method for a config's `peft` section (`pcfg.method` names it)."""
    name = pcfg.get("method", "full") if pcfg is not None else "full"
    if name not in METHODS:
        raise ValueError(f"peft.method={name!r} is not known; choose one of {sorted(METHODS)}")
    return importlib.import_module(METHODS[name]).method(pcfg)
