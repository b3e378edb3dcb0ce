"""One validation pass over a resolved config, before anything is built or written.

The rules sit next to the defaults they belong to: `CHECKS` beside `DEFAULTS` in
`train/loop.py` (section `train`), `train/optim.py` (`optimizer`), `data/options.py`
(`data`, dotted keys such as "splits.kfold"), a trainer's module (`CHECKS = {section: {key:
rule}}`) and a PEFT method's `register(..., checks)` (`peft`). A rule is a bound (">= 1",
"> 0", "in [0, 1)") or a tuple of the allowed values; a key a config does not have is not
checked. On top of them: no NaN or infinity anywhere in the config, and the few rules that
span keys (warmup within the run, accumulation dividing the batch, split ratios summing to
1). Every problem is reported in one line naming the key, the value and the fix.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator, Mapping

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_RANGE = re.compile(r"^in\s*([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")


def rule_problem(value: Any, rule: Any) -> str | None:
    """What is wrong with `value` under `rule` ("must be >= 1"), or None when it holds."""
    if isinstance(rule, (tuple, list)):
        return None if value in rule else f"must be one of {list(rule)}"
    text = str(rule).strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number {text}"
    m = _BOUND.match(text)
    if m:
        op, bound = m.group(1), float(m.group(2))
        ok = {">=": value >= bound, ">": value > bound, "<=": value <= bound,
              "<": value < bound}[op]
        return None if ok else f"must be {text}"
    m = _RANGE.match(text)
    if m:
        lo_open, lo, hi, hi_open = m.group(1) == "(", float(m.group(2)), float(m.group(3)), \
            m.group(4) == ")"
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        return None if ok else f"must be {text}"
    raise ValueError(f"config rule {rule!r} is not understood (use '>= N', '> N', "
                     "'in [a, b)' or a tuple of the allowed values)")


def _fix(key: str, rule: Any) -> str:
    if isinstance(rule, (tuple, list)):
        return f"set --config.{key} to one of them"
    return f"set --config.{key} to a value {str(rule).strip()}"


def _default(key: str) -> str:
    """" (default X)" for a key of the engine's sections, else ""."""
    from ftjax.train import loop, optim
    section, _, name = key.partition(".")
    defaults = {"train": loop.DEFAULTS, "optimizer": optim.DEFAULTS}.get(section, {})
    return f" (default {defaults[name]!r})" if name in defaults else ""


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) of every leaf, through ConfigDicts, dicts, lists and tuples."""
    if hasattr(node, "to_dict") and not isinstance(node, type):
        node = node.to_dict()
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def section_rules(cfg: Any) -> dict[str, Mapping[str, Any]]:
    """{section: {key: rule}} that apply to this config (engine, trainer, PEFT method)."""
    from ftjax import peft, trainers
    from ftjax.data import options
    from ftjax.train import loop, optim
    rules: dict[str, Mapping[str, Any]] = {"train": loop.CHECKS, "optimizer": optim.CHECKS,
                                           "data": options.CHECKS}
    rules.update(getattr(trainers.get(cfg.get("trainer", "sft")), "CHECKS", {}))
    method = (cfg.get("peft") or {}).get("method", "full") or "full"
    rules["peft"] = peft.registry()[method].checks
    return rules


_MISSING = object()


def _get(node: Any, dotted: str) -> Any:
    """`node.a.b` for "a.b", or _MISSING where the config has no such key."""
    for name in dotted.split("."):
        if not hasattr(node, "get") or name not in node:
            return _MISSING
        node = node[name]
    return node


def problems(cfg: Any) -> list[str]:
    """Every problem of a resolved config (empty when it is valid), one line each."""
    out, non_finite = [], set()
    for key, value in _walk(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            non_finite.add(key)
            out.append(f"{key}={value} is not a finite number; set --config.{key} to a "
                       f"finite value{_default(key)}")
    for section, rules in section_rules(cfg).items():
        node = cfg.get(section)
        if node is None:
            continue
        for name, rule in rules.items():
            key = f"{section}.{name}"
            value = _get(node, name)
            if value is _MISSING or key in non_finite:
                continue
            problem = rule_problem(value, rule)
            if problem:
                out.append(f"{key}={value!r} {problem}; {_fix(key, rule)}")
    out += _across_sections(cfg)
    return out


def _data_splits(cfg: Any) -> list[str]:
    """splits.ratios (positive, summing to 1) and a fold of a k-fold split."""
    out = []
    ratios, kfold, fold = (_get(cfg, f"data.splits.{k}") for k in ("ratios", "kfold", "fold"))
    if isinstance(kfold, int) and kfold:
        if kfold == 1:
            out.append(f"data.splits.kfold={kfold} must be 0 (off) or >= 2; set "
                       "--config.data.splits.kfold to 0 or the number of folds")
        elif kfold > 1 and isinstance(fold, int) and not 0 <= fold < kfold:
            out.append(f"data.splits.fold={fold} must be in 0..{kfold - 1} for kfold={kfold}; "
                       "set --config.data.splits.fold to one of them")
    elif isinstance(ratios, (list, tuple)) and ratios and all(
            isinstance(r, (int, float)) and math.isfinite(r) for r in ratios):
        if any(r <= 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            out.append(f"data.splits.ratios={tuple(ratios)} must be positive and sum to 1 (they "
                       f"sum to {sum(ratios):g}); set --config.data.splits.ratios, e.g. "
                       "'(0.8, 0.2)' (train, validation) or '(0.8, 0.1, 0.1)' (and test)")
    return out


def _preference(cfg: Any) -> list[str]:
    """The `dpo` section's loss types and weights (`align.dpo.check_settings`)."""
    d = cfg.get("dpo")
    if d is None or cfg.get("trainer") != "dpo":
        return []
    from ftjax.align import dpo
    types = d.get("loss_type", ("sigmoid",))
    types = (types,) if isinstance(types, str) else tuple(types)
    try:
        dpo.check_settings(types, tuple(d.get("loss_weights", ()) or ()), d.get("beta", 0.1),
                           d.get("label_smoothing", 0.0))
    except (ValueError, TypeError) as e:
        return [str(e)]
    return []


def _across_sections(cfg: Any) -> list[str]:
    t, o = cfg.get("train"), cfg.get("optimizer")
    out = _data_splits(cfg) + _preference(cfg)
    if t is None:
        return out
    steps, batch, accum = t.get("steps"), t.get("batch_size"), t.get("accum_steps", 1)
    ints = lambda *xs: all(isinstance(x, int) and not isinstance(x, bool) and x >= 1  # noqa: E731
                           for x in xs)
    if ints(batch, accum) and batch % accum:
        lo, hi = batch // accum * accum, -(-batch // accum) * accum
        out.append(f"train.batch_size={batch} is not divisible by train.accum_steps={accum} "
                   f"(each step splits the batch into accum_steps micro-batches); set "
                   f"--config.train.batch_size={hi}" + (f" (or {lo})" if lo else "")
                   + " or change --config.train.accum_steps")
    if o is not None and ints(steps):
        warmup, schedule = o.get("warmup_steps", 0), o.get("schedule", "constant")
        decays = schedule != "constant"
        if isinstance(warmup, int) and (warmup >= steps if decays else warmup > steps):
            need = "smaller than" if decays else "at most"
            out.append(f"optimizer.warmup_steps={warmup} must be {need} train.steps={steps} "
                       f"(the {schedule} schedule decays after the warmup); lower "
                       f"--config.optimizer.warmup_steps or raise --config.train.steps")
    return out


def validate(cfg: Any) -> None:
    """Refuses a config with any problem: one ValueError, one line, every problem named."""
    found = problems(cfg)
    if found:
        raise ValueError("invalid config: " + " | ".join(found))
