"""Full and partial fine-tuning: no transform; `peft.train_patterns` picks what trains.

Partial fine-tuning is a choice of patterns over param paths, e.g. the head only
(`lm_head/.*`), norms only (`.*norm/.*`), or everything (`.*`, the default).
"""
from ftjax.peft import Method


def method(pcfg) -> Method:
    patterns = tuple(pcfg.get("train_patterns", (".*",))) if pcfg is not None else (".*",)
    return Method(name="full", transform=None, train_patterns=patterns)
