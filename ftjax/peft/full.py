"""Full and partial fine-tuning: no transform; `peft.train_patterns` picks what trains.

Partial fine-tuning is a choice of patterns over param paths, e.g. the head only
(`lm_head/.*`), norms only (`.*norm/.*`), or everything (`.*`, the default).
"""
from ftjax.peft.method import Method, register

# train_patterns: regexes of the params that train; empty: every param trains.
DEFAULTS = dict(train_patterns=())


def method(s, *, apply_fn=None, tokenizer=None) -> Method:
    del apply_fn, tokenizer  # the forward pass is the model's own
    return Method(name="full", transform=None,
                  train_patterns=tuple(s.train_patterns or ()) or (".*",))


register("full", DEFAULTS, method)
