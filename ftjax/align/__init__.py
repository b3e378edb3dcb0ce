"""Preference alignment: the DPO family (DPO and its loss variants, ORPO, SimPO) on pairs of
completions. The trainer that runs them is `ftjax/trainers/dpo.py`.

  logps       per-sequence summed log-probs of completion tokens (float32)
  dpo         pure per-pair losses from the reference formulas, and their combination
  reference   the reference model: adapters stripped in the step, or a dense starting copy
  precompute  reference log-probs once per pair (cached) or per batch from a frozen copy
  objective   the `loss_fn(params, batch, rng)` of the training loop, with its metrics
  data        synthetic preference pairs and the in-memory preference loader
"""
from ftjax.align import dpo, logps
from ftjax.align.reference import strip_adapters

__all__ = ["dpo", "logps", "strip_adapters"]
