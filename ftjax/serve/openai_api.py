"""The OpenAI API's request fields, error shape and response objects, without any server.

`parse_completion(body)` / `parse_chat(body)` check a decoded JSON body and return a
`GenerationRequest`; anything wrong raises `APIError` with the HTTP status, OpenAI error
type, parameter and code that the server returns as `{"error": {...}}`. The response
builders make the objects of `/v1/completions` and `/v1/chat/completions` (whole, or as
server-sent-event chunks with `stream: true`).

Defaults follow the OpenAI API: temperature 1, top_p 1, n 1, max_tokens 16 for completions
and "until the context is full" for chat (here: the server's `--max-len`).
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, Optional, Sequence

__all__ = ["APIError", "GenerationRequest", "parse_completion", "parse_chat", "error_body",
           "completion_response", "chat_response", "completion_chunk", "chat_chunk", "sse",
           "MAX_N", "MAX_STOP"]

MAX_N = 16         # choices per request
MAX_STOP = 4       # stop strings per request (as the OpenAI API)
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias",
                "tools", "functions", "tool_choice", "function_call", "response_format")


class APIError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, `param`, `code`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = \
            message, status, type, param, code


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


@dataclasses.dataclass
class GenerationRequest:
    """One parsed request: `prompts` are strings (completions) or one message list (chat)."""
    kind: str                      # "completion" | "chat"
    model: str
    prompts: list                  # [str | list[int]] for completions; [[message]] for chat
    max_tokens: Optional[int]      # None: until the context is full (chat default)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple = ()
    seed: Optional[int] = None
    user: Optional[str] = None


def _num(body: dict, key: str, kind, default, lo=None, hi=None, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise APIError(f"'{key}' must be an integer, got {v!r}", param=key, code="invalid_type")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise APIError(f"'{key}' must be a number, got {v!r}", param=key, code="invalid_type")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise APIError(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=key,
                       code="invalid_value")
    if hi is not None and v > hi:
        raise APIError(f"'{key}' must be <= {hi}, got {v}", param=key, code="invalid_value")
    return kind(v)


def _common(body: Any, kind: str) -> dict:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("'model' is required (a name from GET /v1/models)", param="model",
                       code="missing_required_parameter")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0, [], {}):
            raise APIError(f"'{key}' is not supported by this server", param=key,
                           code="unsupported_parameter")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError("'stop' must be a string or a list of strings", param="stop",
                       code="invalid_type")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(f"'stop' takes up to {MAX_STOP} non-empty strings", param="stop",
                       code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be a boolean", param="stream", code="invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError("'stream_options' must be an object", param="stream_options",
                       code="invalid_type")
    max_key = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_key = "max_completion_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError("'seed' must be an integer", param="seed", code="invalid_type")
    return dict(
        model=model,
        max_tokens=_num(body, max_key, int, 16 if kind == "completion" else None, lo=1),
        temperature=_num(body, "temperature", float, 1.0, lo=0.0, hi=2.0),
        top_p=_num(body, "top_p", float, 1.0, lo=0.0, hi=1.0, lo_open=True),
        n=_num(body, "n", int, 1, lo=1, hi=MAX_N),
        stream=stream, include_usage=bool(opts.get("include_usage", False)), stop=stop,
        seed=seed, user=body.get("user"))


def parse_completion(body: Any) -> GenerationRequest:
    """POST /v1/completions: `prompt` is a string, a list of strings, a list of token ids or
    a list of such lists (each prompt gets `n` choices)."""
    common = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError("'prompt' must be a non-empty string, list of strings, or list of "
                       "token ids", param="prompt", code="invalid_type")
    return GenerationRequest(kind="completion", prompts=prompts, **common)


def parse_chat(body: Any) -> GenerationRequest:
    """POST /v1/chat/completions: `messages` with string contents (or text parts)."""
    common = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages",
                       code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                             "assistant"):
            raise APIError(f"messages[{i}] needs a role of system, user or assistant",
                           param=f"messages[{i}].role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="unsupported_parameter")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string",
                           param=f"messages[{i}].content", code="invalid_type")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return GenerationRequest(kind="chat", prompts=[out], **common)


# ------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: Sequence[tuple[str, str]],
                        usage_: dict, fingerprint: str) -> dict:
    """choices: (text, finish_reason) in index order."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(choices)],
            "usage": usage_}


def chat_response(rid: str, model: str, choices: Sequence[tuple[str, str]], usage_: dict,
                  fingerprint: str) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                         "logprobs": None, "finish_reason": r}
                        for i, (t, r) in enumerate(choices)],
            "usage": usage_}


def completion_chunk(rid: str, model: str, index: int, text: str, finish: Optional[str],
                     fingerprint: str, usage_: Optional[dict] = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()),
           "model": model, "system_fingerprint": fingerprint,
           "choices": [{"index": index, "text": text, "logprobs": None,
                        "finish_reason": finish}]}
    if usage_ is not None:
        out["choices"], out["usage"] = [], usage_
    return out


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: Optional[str],
               fingerprint: str, usage_: Optional[dict] = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
           "model": model, "system_fingerprint": fingerprint,
           "choices": [{"index": index, "delta": delta, "logprobs": None,
                        "finish_reason": finish}]}
    if usage_ is not None:
        out["choices"], out["usage"] = [], usage_
    return out


def sse(obj: Any) -> str:
    """One server-sent event line pair (`data: ...`)."""
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"
