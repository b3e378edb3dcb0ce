"""Experiment configs: load `configs/<name>.py[:arg]`, typed config arguments, CLI overrides.

An experiment is a config file defining `get_config(arg=None) -> ml_collections.ConfigDict`
(DESIGN.md §1.5). The pieces here turn a command line such as

    --config configs/lora_sft.py:model=llama,rank=16 --config.optimizer.learning_rate=2e-4

into a resolved, typed ConfigDict. Hashing and recording it is `ftjax.config_record`; the argv
parser and help text are `ftjax.cli` (both re-exported here).
Every mistake (unknown key, wrong type, missing file) raises a ValueError that names the key,
the value and what was expected.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import logging
import math
import os
import pathlib
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from ftjax import paths
# Re-exported: the command line and the config record live in their own modules.
from ftjax.cli import parse_cli
from ftjax.config_record import config_hash, to_jsonable, write_resolved_config

log = logging.getLogger(__name__)

__all__ = [
    "parse_arg",
    "pack_arg",
    "config_arguments",
    "load_config",
    "apply_overrides",
    "parse_value",
    "parse_cli",
    "config_hash",
    "to_jsonable",
    "write_resolved_config",
]

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


# ------------------------------------------------------------------------------------------
# Scalar parsing shared by parse_arg and apply_overrides.


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"not a bool (use one of {sorted(_TRUE | _FALSE)})")


def _parse_int(text: str) -> int:
    s = text.strip()
    try:
        return int(s, 0) if s.lower().startswith(("0x", "-0x", "0b", "0o")) else int(s)
    except ValueError:
        pass
    # Accept integral scientific notation such as 1e4 (handy for step counts), not 1.5.
    f = float(s)  # raises ValueError for non-numbers
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError("not an integer")
    return int(f)


def _parse_float(text: str) -> float:
    return float(text.strip())


def _autotype(text: str) -> Any:
    """Best-effort literal: Python literal (None, numbers, tuples, ...) else the raw string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _type_name(t: type) -> str:
    return getattr(t, "__name__", str(t))


# ------------------------------------------------------------------------------------------
# Typed config-file arguments ("model=llama,rank=16").


_ARG_RECORDER: list[list[dict[str, Any]]] = []  # open `config_arguments` calls


def config_arguments(spec: str) -> dict[str, Any]:
    """The typed arguments of a config file with their defaults (`{"rank": 8, ...}`): the
    defaults of the first `parse_arg` call its `get_config()` makes ({} when it takes none)."""
    calls: list[dict[str, Any]] = []
    _ARG_RECORDER.append(calls)
    try:
        load_config(_split_spec(spec)[0])
    finally:
        _ARG_RECORDER.remove(calls)
    return calls[0] if calls else {}


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config file's argument string into a ConfigDict typed by `defaults`.

    `parse_arg("model=llama,rank=16,lora=True", model="gemma", rank=8, lora=False)` gives
    `{model: 'llama', rank: 16, lora: True}`. Values are converted to the type of the default:
    bool (true/false/1/0/yes/no; a bare `lora` means `lora=True`), int, float (ints accepted),
    str; a default of None accepts any Python literal, falling back to the raw string.
    Keys not given keep their default. Unknown keys or unparsable values raise ValueError.
    """
    for calls in _ARG_RECORDER:
        calls.append(dict(defaults))
    result = ml_collections.ConfigDict(dict(defaults))
    if arg is None or not arg.strip():
        return result
    seen: set[str] = set()
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, has_value, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; allowed keys: {sorted(defaults)}"
            )
        if key in seen:
            raise ValueError(f"config argument {key!r} given twice in {arg!r}")
        seen.add(key)
        default = defaults[key]
        if not has_value:
            if isinstance(default, bool):
                result[key] = True
                continue
            raise ValueError(
                f"config argument {key!r} needs a value ({key}=...); only bool arguments "
                f"may be given bare"
            )
        result[key] = _convert_arg(key, text, default)
    return result


def _convert_arg(key: str, text: str, default: Any) -> Any:
    if default is None:
        return _autotype(text)
    parsers = {bool: _parse_bool, int: _parse_int, float: _parse_float, str: lambda s: s}
    kind = type(default)
    if kind not in parsers:
        raise ValueError(
            f"config argument {key!r} has a default of unsupported type {_type_name(kind)}; "
            f"use bool, int, float, str or None"
        )
    try:
        return parsers[kind](text)
    except ValueError:
        raise ValueError(
            f"config argument {key!r}: cannot parse {text!r} as {_type_name(kind)} "
            f"(default {default!r})"
        ) from None


def pack_arg(**kwargs: Any) -> str:
    """Inverse of `parse_arg` for scalars: `pack_arg(rank=16, model='llama')` -> 'rank=16,model=llama'."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


# ------------------------------------------------------------------------------------------
# Loading config files.


def _split_spec(spec: str) -> tuple[str, str | None]:
    """'a/b.py:x=1' -> ('a/b.py', 'x=1'); 'a/b.py' -> ('a/b.py', None)."""
    idx = spec.find(".py:")
    if idx >= 0:
        return spec[: idx + 3], spec[idx + 4 :]
    return spec, None


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py` or `path/to/file.py:arg string` and returns `get_config(arg)`.

    A relative path is looked up in the current directory, then under the ftjax root
    (`ftjax.paths`), so `configs/X.py` works from any directory. The file is imported by
    path. If it lives in a package directory (e.g. `configs/` with an
    `__init__.py`), the directory above it is put on `sys.path` so that `from configs import
    common` works wherever the command is launched from.
    """
    path_str, arg = _split_spec(spec)
    path = pathlib.Path(paths.resolve(path_str))  # a local file: cwd first, then the ftjax root
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {path_str!r} (from --config {spec!r}) does not exist "
            f"(looked in the current directory {os.getcwd()!r} and the ftjax root)"
        )
    path = path.resolve()
    if (path.parent / "__init__.py").is_file():
        root = str(path.parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)

    mod_name = f"_ftjax_config_{path.stem}_{uuid.uuid4().hex[:8]}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ValueError(f"cannot import config file {str(path)!r}: not a Python file?")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module  # lets dataclasses/pickling inside the config resolve
    try:
        mod_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(mod_name, None)
        raise
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {str(path)!r} does not define get_config(arg=None)")

    params = [
        p for p in inspect.signature(get_config).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if arg is not None:
        if not params:
            raise ValueError(
                f"config file {str(path)!r}: get_config() takes no argument, but {arg!r} "
                f"was given after ':'"
            )
        cfg = get_config(arg)
    elif params and params[0].default is inspect.Parameter.empty and params[0].kind != (
        inspect.Parameter.VAR_POSITIONAL
    ):
        cfg = get_config(None)  # get_config(arg) with a required arg: no arg means None.
    else:
        cfg = get_config()

    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(
            f"config file {str(path)!r}: get_config returned {type(cfg).__name__}, "
            f"expected ml_collections.ConfigDict"
        )
    return cfg


# ------------------------------------------------------------------------------------------
# Command-line overrides ("--config.optimizer.learning_rate=2e-4").


def unknown_key_message(name: str, keys: Sequence[str], parent: str, full_key: str) -> str:
    """`full_key` is not a key: the keys `parent` has, and the close matches."""
    where = f"{parent!r}" if parent else "the top level"
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    hint = ""
    if close:
        pre = f"{parent}." if parent else ""
        hint = "; did you mean " + " or ".join(repr(pre + c) for c in close) + "?"
    return f"unknown config key {full_key!r}; {where} has keys: {sorted(keys)}{hint}"


def _parse_sequence(key: str, text: str, current: Sequence[Any]) -> tuple | list:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # Unquoted comma lists of names: `--config.lora.targets=q_proj,v_proj`.
        value = tuple(s.strip() for s in text.split(",") if s.strip())
    if isinstance(value, str) and value.strip():
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise ValueError(
            f"config key {key!r}: cannot set {text!r}; expected a {type(current).__name__} "
            f"(e.g. \"(1, 2)\" or \"a,b\"), got {type(value).__name__}"
        )
    elem_types = {type(v) for v in current}
    if len(elem_types) == 1:
        (elem,) = elem_types
        for v in value:
            ok = isinstance(v, elem) or (elem is float and type(v) is int)
            if elem in (int, float) and type(v) is bool:
                ok = False
            if not ok and elem in (bool, int, float, str):
                raise ValueError(
                    f"config key {key!r}: cannot set {text!r}; expected a "
                    f"{type(current).__name__} of {_type_name(elem)}, got element {v!r}"
                )
        if elem is float:
            value = [float(v) for v in value]
    return type(current)(value)


def parse_value(key: str, text: str, current: Any, field_type: type | None = None) -> Any:
    """Parses override `text` for config `key` to the type of the field's `current` value.

    bool takes true/false/1/0/yes/no; int takes integers (and integral `1e4`); float takes ints
    too; str is taken verbatim; tuple/list take a Python literal or an unquoted comma list.
    Fields whose current value is None (and have no declared type) accept any Python literal,
    falling back to the raw string. A typed placeholder (FieldReference, `field_type` its
    declared type) whose value is None takes values of that type or "None". Any other field
    rejects "None".
    """
    if field_type is None and current is not None:
        field_type = type(current)
    if field_type is None or field_type is type(None):
        return _autotype(text)
    if text.strip() == "None" and current is None:
        return None

    def fail(expected: str) -> ValueError:
        hint = ""
        if text.strip() == "None":
            hint = " (None is only accepted by fields whose default is None)"
        return ValueError(f"config key {key!r}: cannot set {text!r}; expected {expected}{hint}")

    if field_type is bool:
        try:
            return _parse_bool(text)
        except ValueError:
            raise fail("bool (true/false/1/0/yes/no)") from None
    if field_type is int:
        try:
            return _parse_int(text)
        except ValueError:
            raise fail("int") from None
    if field_type is float:
        try:
            return _parse_float(text)
        except ValueError:
            raise fail("float") from None
    if text.strip() == "None":
        raise fail(_type_name(field_type))
    if field_type is str:
        return text
    if field_type in (tuple, list):
        seq = current if isinstance(current, (tuple, list)) else field_type()
        return _parse_sequence(key, text, seq)
    if isinstance(current, ml_collections.ConfigDict) or field_type is ml_collections.ConfigDict:
        raise ValueError(
            f"config key {key!r} is a config group; override its fields "
            f"(e.g. --config.{key}.<field>=...) instead"
        )
    # Other types (dicts, custom objects): accept a Python literal of the same type.
    value = _autotype(text)
    if not isinstance(value, field_type):
        raise fail(_type_name(field_type))
    return value


def _walk(cfg: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """Returns (parent node, leaf name) for dotted `key`, with errors naming the nearest keys."""
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"malformed config key {key!r}")
    node = cfg
    for i, name in enumerate(parts[:-1]):
        parent = ".".join(parts[:i])
        if name not in node:
            raise ValueError(unknown_key_message(name, list(node.keys()), parent, key))
        child = node[name]
        if not isinstance(child, ml_collections.ConfigDict):
            raise ValueError(
                f"unknown config key {key!r}: {'.'.join(parts[: i + 1])!r} is a "
                f"{type(child).__name__}, not a config group"
            )
        node = child
    leaf = parts[-1]
    if leaf not in node:
        raise ValueError(unknown_key_message(leaf, list(node.keys()), ".".join(parts[:-1]), key))
    return node, leaf


def apply_overrides(
    cfg: ml_collections.ConfigDict,
    overrides: Iterable[tuple[str, str]] | Mapping[str, str],
) -> ml_collections.ConfigDict:
    """Returns a copy of `cfg` with each `("a.b.c", "value string")` override applied.

    The key must already exist; the value is parsed to the type of the existing field (see
    `parse_value`). Overrides apply in order, so a later one wins. FieldReferences are kept:
    overriding a referenced field updates the fields that refer to it.
    """
    import copy

    out = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for key, text in items:
        if not isinstance(text, str):
            raise TypeError(f"override for {key!r} must be a string, got {type(text).__name__}")
        node, leaf = _walk(out, key)
        raw = node._fields.get(leaf)  # pylint: disable=protected-access
        field_type = None
        if isinstance(raw, config_dict.FieldReference):
            # A placeholder keeps its declared type; like any field it takes "None" only
            # while its value is None (a referenced field may feed computed fields).
            field_type, current = raw.get_type(), raw.get()
        else:
            current = node[leaf]
        value = parse_value(key, text, current, field_type)
        try:
            node[leaf] = value  # existing key, so allowed on a locked ConfigDict too
        except (TypeError, ValueError) as e:
            raise ValueError(f"config key {key!r}: cannot set {text!r}: {e}") from None
    return out
