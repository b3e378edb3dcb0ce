"""`Method` (what a trainer needs from a PEFT method) and the registry of methods.

A method module registers itself, in one place, at import:

    DEFAULTS = dict(rank=8, alpha=16.0, ...)           # every setting and its default
    def method(s, *, apply_fn, tokenizer) -> Method:   # s: the resolved `peft` section
        ...
    register("lora", DEFAULTS, method)

Every module of the `ftjax.peft` package is imported the first time a method is looked up,
so a new file is found without an entry anywhere else. `resolve(pcfg)` fills in the defaults
and refuses unknown keys; `get_method(pcfg, apply_fn=..., tokenizer=...)` builds the Method.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections


@dataclasses.dataclass(frozen=True)
class Method:
    """What a trainer needs from a PEFT method.

    transform(params, key) -> params'   wraps weights in structured weights (core.py) or adds
                                        new plain leaves (e.g. prompt embeddings)
    train_patterns                      regexes of *plain* leaves that train (e.g. new leaves);
                                        fields of structured weights train as their class says
    apply_fn                            the replacement of `models.apply` (same signature), built
                                        by wrapping the apply function given to `get_method`, for
                                        methods that change what the model sees (virtual
                                        tokens, prefix key/values); None otherwise
    bind_rng                            `(params, rng) -> params` run by the loss on every
                                        training step (never in eval), e.g. LoRA dropout
    wrap_optimizer                      optional `tx -> tx'` around the run's optax optimizer,
                                        for methods that act on updates (HFT's round masks)
    mergeable                           False for methods whose weights have no dense form
                                        (token-routed memory experts): merged exports are
                                        refused before training rather than after it
    """
    name: str
    transform: Optional[Callable[[Any, Any], Any]]
    train_patterns: Sequence[str] = ()
    apply_fn: Optional[Callable[..., Any]] = None
    bind_rng: Optional[Callable[[Any, Any], Any]] = None
    wrap_optimizer: Optional[Callable[[Any], Any]] = None
    mergeable: bool = True


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered method: its name, its settings with their defaults, and its builder
    `build(resolved_section, *, apply_fn, tokenizer) -> Method`."""
    name: str
    defaults: Mapping[str, Any]
    build: Callable[..., Method]
    module: str
    checks: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Spec] = {}
_DISCOVERED = False


def register(name: str, defaults: Mapping[str, Any], build: Callable[..., Method],
             checks: Optional[Mapping[str, Any]] = None) -> Spec:
    """Registers method `name` with its settings' defaults (a dict or ConfigDict, `method`
    excluded) and its builder. Called once, at import, by the method's own module.

    checks: `{setting: rule}` validated before a run builds anything (`trainers/_validate.py`):
    a rule is a bound such as ">= 1" or "in [0, 1)", or a tuple of the allowed values."""
    defaults = dict(defaults.to_dict() if isinstance(defaults, ml_collections.ConfigDict)
                    else defaults)
    if "method" in defaults:
        raise ValueError(f"peft method {name!r}: DEFAULTS must not contain 'method'")
    module = getattr(build, "__module__", "?")
    old = _REGISTRY.get(name)
    if old is not None and old.module != module:
        raise ValueError(f"peft method {name!r} is registered twice ({old.module} and {module})")
    unknown = sorted(set(checks or {}) - set(defaults))
    if unknown:
        raise ValueError(f"peft method {name!r}: checks for settings it does not have: {unknown}")
    spec = Spec(name=name, defaults=defaults, build=build, module=module,
                checks=dict(checks or {}))
    _REGISTRY[name] = spec
    return spec


def _discover() -> None:
    """Imports every module of the ftjax.peft package once (each registers its methods)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("ftjax.peft")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"ftjax.peft.{info.name}")
    _DISCOVERED = True


def registry() -> dict[str, Spec]:
    """name -> Spec of every registered method."""
    _discover()
    return dict(_REGISTRY)


def method_names() -> list[str]:
    return sorted(registry())


def _spec(name: Any) -> Spec:
    specs = registry()
    if name not in specs:
        close = difflib.get_close_matches(str(name), specs, n=3)
        hint = f" (did you mean {close}?)" if close else ""
        raise ValueError(f"peft.method={name!r} is not known{hint}; choose one of "
                         f"{sorted(specs)}")
    return specs[name]


def method_defaults(name: str) -> ml_collections.ConfigDict:
    """The full `peft` section of method `name`: `method=name` plus every setting with its
    default (what a config file builds its section from, then overrides)."""
    spec = _spec(name)
    return ml_collections.ConfigDict(dict(method=name, **_copy(spec.defaults)))


def _copy(d: Mapping[str, Any]) -> dict:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _items(pcfg: Any) -> dict[str, Any]:
    if pcfg is None:
        return {}
    if isinstance(pcfg, ml_collections.ConfigDict):
        return pcfg.to_dict()
    if isinstance(pcfg, Mapping):
        return dict(pcfg)
    raise TypeError(f"the peft section must be a ConfigDict or dict, got {type(pcfg).__name__}")


def resolve(pcfg: Any) -> ml_collections.ConfigDict:
    """The `peft` section with every default of its method filled in (`method` defaults to
    "full"). An unknown or misspelled key raises ValueError naming it, the close matches and
    the method's valid keys."""
    given = _items(pcfg)
    name = given.pop("method", "full") or "full"
    spec = _spec(name)
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        valid = sorted(spec.defaults)
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=3)
            hints.append(f"peft.{key}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"peft.method={name!r} has no setting {'; '.join(hints)}; its settings "
                         f"are {valid}")
    out = _copy(spec.defaults)
    out.update(given)
    return ml_collections.ConfigDict(dict(method=name, **out))


def get_method(pcfg: Any, *, apply_fn: Optional[Callable[..., Any]] = None,
               tokenizer: Any = None) -> Method:
    """The Method for a config's `peft` section (`pcfg.method` names it; None: full).

    apply_fn: the model's apply function (`ftjax.models.apply`); methods that change the
    forward pass wrap it into `Method.apply_fn`, others ignore it. tokenizer: the run's
    tokenizer, for settings given as text (prompt tuning's `init_text`).
    """
    s = resolve(pcfg)
    return _spec(s.method).build(s, apply_fn=apply_fn, tokenizer=tokenizer)


def require_apply_fn(name: str, apply_fn: Optional[Callable[..., Any]]) -> Callable[..., Any]:
    """apply_fn, or a ValueError saying how to pass it (for methods that wrap it)."""
    if apply_fn is None:
        raise ValueError(f"peft.method={name!r} changes the forward pass and wraps the model's "
                         "apply function: call ftjax.peft.get_method(pcfg, "
                         "apply_fn=ftjax.models.apply)")
    return apply_fn
