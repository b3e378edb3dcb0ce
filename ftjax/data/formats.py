"""Record formats -> canonical examples, with field remapping and errors that name the input.

Formats and the fields they read (defaults; `field_map={"canonical": "field in the data"}`
renames any of them, and `"role"`/`"content"` rename the keys inside chat messages):

    instruction     instruction, input (optional, may be empty), output, system (optional)
                    -> {"messages": [system?, user: instruction + "\\n\\n" + input, assistant]}
    chat            messages: [{"role", "content"}, ...]          -> {"messages": [...]}
    sharegpt        conversations: [{"from", "value"}, ...], system (optional); roles
                    human/gpt/system (also user/assistant/model/bot) -> {"messages": [...]}
    preference      prompt (optional), chosen, rejected: strings or message lists
                    -> {"prompt": [...], "chosen": [...], "rejected": [...]}
    unpaired        prompt, completion, label (bool, 0/1, "true"/"false", "yes"/"no")
                    -> {"prompt": [...], "completion": [...], "label": bool}
    classification  text, label -> {"text": str, "label": str}
    text            text -> {"text": str}

A plain-string prompt becomes one user message, a plain-string completion/chosen/rejected one
assistant message. A preference record without `prompt` whose chosen and rejected are
conversations takes their longest common leading messages as the prompt (the usual
"implicit prompt" layout). A message list may also be given as its JSON text (CSV cells).
Canonical roles are system/user/assistant; every assistant message needs non-empty content
(an empty one would train nothing but the end-of-turn token).

Errors are `DataError`s that start with `origin` ("file:line") and name the field, what was
found, the fields present, and the fix.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

from ftjax.data.errors import DataError

__all__ = ["FORMATS", "FIELDS", "ROLES", "ROLE_ALIASES", "to_canonical", "detect_format",
           "canonical_kind"]

FORMATS = ("instruction", "chat", "sharegpt", "preference", "unpaired", "classification",
           "text")

# Fields each format reads: (required, optional). "role"/"content" remap message keys.
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instruction": (("instruction", "output"), ("input", "system")),
    "chat": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "preference": (("chosen", "rejected"), ("prompt", "margin")),
    "unpaired": (("prompt", "completion", "label"), ()),
    "classification": (("text", "label"), ()),
    "text": (("text",), ()),
}
_MESSAGE_KEYS = {"chat": ("role", "content"), "sharegpt": ("from", "value"),
                 "preference": ("role", "content"), "unpaired": ("role", "content")}

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant",
                "human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")


def canonical_kind(fmt: str) -> str:
    """The canonical form a format produces: "sft", "text", "preference", "unpaired" or
    "classification"."""
    _check_format(fmt)
    return "sft" if fmt in ("instruction", "chat", "sharegpt") else fmt


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of {list(FORMATS)} (or 'auto' "
                        "where the config allows detection)")


class _Reader:
    """Reads fields of one record through the field map, with errors naming the origin."""

    def __init__(self, record: Any, fmt: str, field_map: Optional[Mapping[str, str]],
                 origin: str) -> None:
        self.fmt, self.origin = fmt, origin or "<record>"
        if not isinstance(record, Mapping):
            raise DataError(f"{self.origin}: a {fmt} record must be an object (dict), got "
                            f"{type(record).__name__}: {str(record)[:80]!r}")
        self.record = record
        self.map = dict(field_map or {})
        required, optional = FIELDS[fmt]
        allowed = set(required) | set(optional)
        if fmt in _MESSAGE_KEYS:
            allowed |= {"role", "content"}
        unknown = sorted(set(self.map) - allowed)
        if unknown:
            raise DataError(f"field_map keys {unknown} are not fields of the {fmt} format; its "
                            f"fields are {sorted(allowed)} (map canonical field -> field in "
                            "the data)")
        bad = sorted(k for k, v in self.map.items() if not isinstance(v, str))
        if bad:
            raise DataError(f"field_map values must be field names (strings); {bad} are not")

    def present(self) -> list[str]:
        return sorted(str(k) for k in self.record)

    def where(self, name: str) -> str:
        """How the field is called in the data (with the map), for messages."""
        mapped = self.map.get(name, name)
        return repr(mapped) if mapped == name else f"{mapped!r} (mapped from {name!r})"

    def has(self, name: str) -> bool:
        mapped = self.map.get(name, name)
        return (mapped in self.record and self.record[mapped] is not None) or \
            (mapped != name and self.record.get(name) is not None)

    def get(self, name: str, default: Any = ...) -> Any:
        mapped = self.map.get(name, name)
        if mapped in self.record and self.record[mapped] is not None:
            return self.record[mapped]
        # sources.open_source may have applied the same map already.
        if mapped != name and self.record.get(name) is not None:
            return self.record[name]
        if default is not ...:
            return default
        hint = "" if name in self.map else \
            f"; if it has another name, map it: field_map={{{name!r}: '<field in your data>'}}"
        raise DataError(f"{self.origin}: {self.fmt} record has no field {self.where(name)} "
                        f"(fields present: {self.present()}){hint}")

    def fail(self, name: str, problem: str) -> DataError:
        return DataError(f"{self.origin}: {self.fmt} field {self.where(name)} {problem}")

    def string(self, name: str, *, allow_empty: bool = False, default: Any = ...) -> str:
        value = self.get(name, default)
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.fail(name, f"must be a string, got {type(value).__name__}: "
                                  f"{str(value)[:80]!r}")
        value = value if isinstance(value, str) else str(value)
        if not allow_empty and not value.strip():
            raise self.fail(name, "is empty")
        return value

    def messages(self, name: str, value: Any = ..., *, default_role: Optional[str] = None) \
            -> list[dict]:
        """A message list (or a string, as one `default_role` message)."""
        value = self.get(name) if value is ... else value
        if isinstance(value, str) and default_role is not None:
            stripped = value.strip()
            if not (stripped.startswith("[") and stripped.endswith("]")):
                if not stripped:
                    raise self.fail(name, "is empty")
                return [{"role": default_role, "content": value}]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise self.fail(name, f"must be a list of messages; its text is not a JSON "
                                      f"list ({e.msg}): {value[:80]!r}") from None
        if not isinstance(value, list):
            raise self.fail(name, f"must be a list of messages, got {type(value).__name__}: "
                                  f"{str(value)[:80]!r}")
        if not value:
            raise self.fail(name, "is an empty list of messages")
        role_key, content_key = _MESSAGE_KEYS.get(self.fmt, ("role", "content"))
        role_key = self.map.get("role", role_key)
        content_key = self.map.get("content", content_key)
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, Mapping):
                raise self.fail(name, f"message {i} must be an object with {role_key!r} and "
                                      f"{content_key!r}, got {type(m).__name__}: "
                                      f"{str(m)[:80]!r}")
            rk = role_key if role_key in m else ("role" if "role" in m else
                                                  "from" if "from" in m else role_key)
            ck = content_key if content_key in m else ("content" if "content" in m else
                                                        "value" if "value" in m else content_key)
            if rk not in m or ck not in m:
                missing = rk if rk not in m else ck
                raise self.fail(name, f"message {i} has no {missing!r} key (keys: "
                                      f"{sorted(m)}); map it with field_map={{'role': ..., "
                                      "'content': ...}")
            role = m[rk]
            canonical = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
            if canonical is None:
                raise self.fail(name, f"message {i} has unknown role {role!r}; known roles: "
                                      f"{sorted(ROLE_ALIASES)}")
            content = m[ck]
            if not isinstance(content, str):
                raise self.fail(name, f"message {i} ({canonical}) content must be a string, "
                                      f"got {type(content).__name__}: {str(content)[:80]!r}")
            if canonical == "assistant" and not content.strip():
                raise self.fail(name, f"message {i} is an empty assistant message")
            out.append({"role": canonical, "content": content})
        return out


def _needs_assistant(r: _Reader, name: str, messages: list[dict]) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise r.fail(name, "has no assistant message, so nothing would be trained "
                           f"(roles: {[m['role'] for m in messages]})")
    return messages


def _label_bool(r: _Reader) -> bool:
    value = r.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise r.fail("label", f"must be a boolean (true/false, 1/0, yes/no), got {value!r}")


def _margin(r: _Reader) -> float:
    value = r.get("margin")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(float(value)):
        raise r.fail("margin", f"must be a finite number (how much chosen is preferred), "
                               f"got {value!r}")
    return float(value)


def _label_str(r: _Reader) -> str:
    value = r.get("label")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise r.fail("label", f"must be a non-empty string or a number, got "
                          f"{type(value).__name__}: {str(value)[:80]!r}")


def to_canonical(record: Mapping[str, Any], fmt: str, field_map: Optional[Mapping[str, str]] = None,
                 origin: str = "") -> dict:
    """One record in format `fmt` -> its canonical example (see the module docstring)."""
    _check_format(fmt)
    r = _Reader(record, fmt, field_map, origin)
    if fmt == "instruction":
        instruction = r.string("instruction")
        extra = r.string("input", allow_empty=True, default=None) or ""
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        system = r.string("system", allow_empty=True, default=None)
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        return {"messages": messages + [{"role": "user", "content": user},
                                        {"role": "assistant", "content": r.string("output")}]}
    if fmt == "chat":
        return {"messages": _needs_assistant(r, "messages", r.messages("messages"))}
    if fmt == "sharegpt":
        messages = r.messages("conversations")
        system = r.string("system", allow_empty=True, default=None)
        if system and system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        return {"messages": _needs_assistant(r, "conversations", messages)}
    if fmt == "preference":
        chosen = r.messages("chosen", default_role="assistant")
        rejected = r.messages("rejected", default_role="assistant")
        if r.has("prompt"):
            prompt = r.messages("prompt", default_role="user")
        else:
            n = 0
            while (n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]):
                n += 1
            if n == 0:
                raise DataError(f"{r.origin}: preference record has no field "
                                f"{r.where('prompt')} and chosen/rejected share no leading "
                                f"messages to take it from (fields present: {r.present()}); "
                                "add a prompt or map it with field_map={'prompt': ...}")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            _needs_assistant(r, name, side)
        if prompt[-1]["role"] == "assistant":
            raise r.fail("prompt", "ends with an assistant message; the completion must follow "
                                   "a user (or system) turn")
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if r.has("margin"):   # how much chosen is preferred (reward models' margin)
            out["margin"] = _margin(r)
        return out
    if fmt == "unpaired":
        prompt = r.messages("prompt", default_role="user")
        completion = _needs_assistant(r, "completion",
                                      r.messages("completion", default_role="assistant"))
        return {"prompt": prompt, "completion": completion, "label": _label_bool(r)}
    if fmt == "classification":
        return {"text": r.string("text"), "label": _label_str(r)}
    return {"text": r.string("text")}


def detect_format(record: Mapping[str, Any],
                  field_map: Optional[Mapping[str, str]] = None, origin: str = "",
                  what: str = "fields") -> str:
    """The format whose fields the record has (checked most specific first). `origin` (the
    file) and `what` ("columns" for CSV) make the error name the file and what it holds."""
    if not isinstance(record, Mapping):
        raise DataError(f"cannot detect the format of a {type(record).__name__}; records are "
                        "objects (dicts)")
    fm = dict(field_map or {})
    keys = set(record)

    def has(*names: str) -> bool:
        return all(fm.get(n, n) in keys or n in keys for n in names)

    if has("chosen", "rejected"):
        return "preference"
    if has("messages"):
        return "chat"
    if has("conversations"):
        return "sharegpt"
    if has("prompt", "completion", "label"):
        return "unpaired"
    if has("instruction", "output"):
        return "instruction"
    if has("text", "label"):
        return "classification"
    if has("text"):
        return "text"
    expected = {f: list(req) for f, (req, _) in FIELDS.items()}
    where = f"{origin}: " if origin else ""
    raise DataError(f"{where}cannot detect the data format from {what} "
                    f"{sorted(map(str, keys))}; formats need {expected}. Set the format and map "
                    f"your {what} to its fields, e.g. --config.data.format=instruction "
                    "--config.data.field_map=instruction=YOUR_PROMPT,output=YOUR_ANSWER")
