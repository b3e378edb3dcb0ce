"""Full and partial fine-tuning: no transform; `peft.train_patterns` picks what trains.

Partial fine-tuning is a choice of patterns over param paths, e.g. the head only
(`lm_head/.*`), norms only (`.*norm/.*`), or everything (`.*`, the default).
"""
from ftjax.peft import Method


def method(pcfg) -> Method:
    patterns = tuple(pcfg.get("train_patterns") or ()) if pcfg is not None else ()
    patterns = patterns or (".*",)  # empty: every param trains
    return Method(name="full", transform=None, train_patterns=patterns)
