"""Preference alignment: the DPO family (DPO and its loss variants, ORPO, SimPO) on pairs of
completions, reusing the generic training loop (`ftjax.train.loop`).

  logps       per-sequence summed log-probs of completion tokens (float32)
  dpo         pure per-pair losses from the reference formulas, and their combination
  reference   the reference model: adapters stripped in the step, or a dense starting copy
  precompute  reference log-probs once per pair (cached) or per batch from a frozen copy
  objective   the `loss_fn(params, batch, rng)` of the training loop, with its metrics
  data        synthetic preference pairs and the in-memory preference loader
  trainer     trainer "dpo": config -> run (`python -m ftjax.main --config configs/dpo_*.py`)
"""
from ftjax.align import dpo, logps
from ftjax.align.reference import strip_adapters

__all__ = ["dpo", "logps", "strip_adapters"]
