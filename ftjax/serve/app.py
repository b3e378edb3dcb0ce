"""The OpenAI-compatible HTTP server: FastAPI routes over a continuous-batching engine.

    server = Server(model, name="qs", slots=16, max_len=256)   # model: ftjax.evaluate.EvalModel
    app = create_app(server)                                    # uvicorn.run(app, ...)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (adapters without a restart), GET /metrics (Prometheus), GET /health.
Every error is the OpenAI shape `{"error": {"message", "type", "param", "code"}}`; a bad
request is answered and forgotten, never fatal. The engine runs in its own thread; each
choice of a request is one engine request whose tokens come back through a thread-safe
callback into the request's asyncio queue.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, AsyncIterator, Optional

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves the annotations here

from ftjax.data.batching import bos_prefix
from ftjax.data.chat import apply_chat_template
from ftjax.data.hf_tokenizer import HFTokenizer
from ftjax.infer.batching import BatchEngine, Request, SamplingParams
from ftjax.serve import openai_api as api
from ftjax.serve.registry import Registry, fingerprint

__all__ = ["Server", "create_app"]

log = logging.getLogger("ftjax.serve")


def _eos_ids(tok) -> list[int]:
    ids = list(getattr(tok, "eos_ids", ()) or ())
    return ids or [int(tok.eos_id)]


class _Choice:
    """One choice's tokens, text and finish reason, fed from the engine thread.

    Stop strings end the choice at their first occurrence (the stop text is not returned);
    while streaming, text that could still turn into a stop string (or an incomplete UTF-8
    character) is held back until it cannot."""

    def __init__(self, index: int, server: "Server", queue: asyncio.Queue,
                 loop: asyncio.AbstractEventLoop, stop: tuple, prompt_len: int):
        self.index, self.server, self.queue, self.loop = index, server, queue, loop
        self.stop, self.prompt_len = stop, prompt_len
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.finish: Optional[str] = None
        self.first_token_at: Optional[float] = None
        self.request: Optional[Request] = None

    def on_tokens(self, new: list, reason: Optional[str]) -> bool:
        if self.finish is not None:             # already ended here (a stop string)
            return False
        try:
            return self._tokens(new, reason)
        except Exception:  # noqa: BLE001 - e.g. a tokenizer that cannot decode an id
            log.exception("choice %d failed", self.index)
            self.finish = "error"
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, "", "error"))
            return False

    def _tokens(self, new: list, reason: Optional[str]) -> bool:
        if new and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(new)
        text = self.server.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        self.text = text
        done = reason is not None
        if done:
            # "stop" (an eos id or a stop string), "length", or "cancelled" (client gone)
            self.finish = reason
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete character
                end -= 1
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        if delta or done:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, delta,
                                                                   self.finish))
        return cut < 0

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


class Server:
    """The model, its adapters, the engine and the monitoring of one serving process.

    model: an `ftjax.evaluate.EvalModel` (params placed, tokenizer, chat template, source).
    metrics / request_log / drift: `ftjax.serve.metrics.ServerMetrics`,
    `ftjax.serve.reqlog.RequestLog`, `ftjax.serve.drift.DriftMonitor` (each optional).
    """

    def __init__(self, model: Any, *, name: str, slots: int = 16, max_len: int = 256,
                 chunk: int = 4, max_adapters: int = 0, max_lora_rank: int = 16,
                 metrics: Any = None, request_log: Any = None, drift: Any = None,
                 cache_sharding: Any = None, extra_version: Optional[dict] = None,
                 warmup: bool = False):
        if model.apply_fn is not None:
            raise ValueError(f"{model.source.get('peft')!r} changes the model's forward pass "
                             "(prompt or prefix tuning); the server runs plain and LoRA models "
                             "only: use scripts/generate.py, or export a merged model")
        self.model, self.cfg, self.tok = model, model.cfg, model.tokenizer
        self.eos_ids = frozenset(_eos_ids(self.tok))
        version = {k: v for k, v in model.source.items() if v is not None}
        version.update(extra_version or {})
        self.registry = Registry(name, model.cfg, model.params, version,
                                 max_adapters=max_adapters, max_lora_rank=max_lora_rank)
        self.metrics, self.request_log, self.drift = metrics, request_log, drift
        on_step = self._on_step if metrics is not None else None
        self.engine = BatchEngine(self.registry.params, model.cfg, eos_ids=sorted(self.eos_ids),
                                  pad_id=int(self.tok.pad_id), slots=slots, max_len=max_len,
                                  chunk=chunk,
                                  adapters=self.registry.bank, cache_sharding=cache_sharding,
                                  on_step=on_step)
        self.started = int(time.time())
        self.warmup = warmup   # compile every decode program before serving (the CLI does)

    def decode(self, ids: list) -> str:
        """Text of generated ids: eos ids, and ids past the tokenizer's vocabulary (the
        padding rows a model's embedding table may have), have no text."""
        n = int(self.tok.vocab_size)
        return self.tok.decode([t for t in ids if t not in self.eos_ids and 0 <= t < n])

    def _on_step(self, active: int, total: int, dt: float) -> None:
        self.metrics.observe_step(active, total, dt)
        self.metrics.set_queue_depth(self.engine.queued())

    # ---- prompts --------------------------------------------------------------------------

    def encode(self, req: api.GenerationRequest, prompt: Any) -> list[int]:
        """Token ids of one prompt: chat messages through the model's chat template with the
        generation prompt; a completion string as `scripts/generate.py --prompt` encodes it
        (HF tokenizers with their special tokens; the character tokenizer in the synthetic
        tasks' layout `[bos] text "\\n"`); token ids as given."""
        if req.kind == "chat":
            return list(apply_chat_template(self.tok, prompt, add_generation_prompt=True,
                                            template=self.model.template))
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise api.APIError(f"token ids {bad[:5]} are outside the vocabulary "
                                   f"[0, {self.cfg.vocab_size})", param="prompt",
                                   code="invalid_value")
            return list(prompt)
        if isinstance(self.tok, HFTokenizer):
            return list(self.tok.encode(prompt, add_special_tokens=True))
        return bos_prefix(self.tok) + list(self.tok.encode(prompt + "\n"))

    def _sampling(self, req: api.GenerationRequest, prompt_len: int, choice: int
                  ) -> SamplingParams:
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = max(self.engine.max_len - prompt_len, 1)
        seed = (req.seed if req.seed is not None else time.time_ns()) + 7919 * choice
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                              top_p=req.top_p, seed=seed & 0xFFFFFFFF)

    # ---- one request ----------------------------------------------------------------------

    def start(self, req: api.GenerationRequest, loop: asyncio.AbstractEventLoop):
        """Validates, encodes and submits every choice; returns (queue, choices, prompt
        lengths, adapter version)."""
        try:
            adapter, version = self.registry.resolve(req.model)
        except KeyError:
            raise api.APIError(f"The model '{req.model}' does not exist; served: "
                               f"{[m['id'] for m in self.registry.models()]}", status=404,
                               param="model", code="model_not_found") from None
        prompts = [self.encode(req, p) for p in req.prompts]
        for ids in prompts:
            try:
                self.engine.check(len(ids), self._sampling(req, len(ids), 0))
            except ValueError as e:
                raise api.APIError(str(e), param="messages" if req.kind == "chat" else
                                   "prompt", code="context_length_exceeded") from None
        queue: asyncio.Queue = asyncio.Queue()
        choices = []
        for p, ids in enumerate(prompts):
            if self.drift is not None:
                self._observe_drift(self._drift_ids(req, req.prompts[p], ids))
            for c in range(req.n):
                ch = _Choice(len(choices), self, queue, loop, req.stop, len(ids))
                ch.request = Request(ids, self._sampling(req, len(ids), c), ch.on_tokens,
                                     adapter=adapter)
                choices.append(ch)
        for ch in choices:
            self.engine.submit(ch.request)
        return queue, choices, [len(i) for i in prompts], version

    def cancel(self, choices) -> None:
        for ch in choices:
            if ch.finish is None and ch.request is not None:
                self.engine.cancel(ch.request)

    def _drift_ids(self, req: api.GenerationRequest, prompt: Any, ids: list) -> list:
        """The tokens the drift check compares: the prompt text encoded as the reference file
        is (`DriftMonitor.from_jsonl`: `tokenizer.encode(text)`, chat messages as their joined
        contents), so template and bos tokens do not read as drift."""
        if req.kind == "chat":
            from ftjax.serve.drift import messages_text
            return list(self.tok.encode(messages_text(prompt)))
        return ids if isinstance(prompt, list) else list(self.tok.encode(prompt))

    def _observe_drift(self, ids: list) -> None:
        report = self.drift.observe(ids)
        if report is None:
            return
        if self.metrics is not None:
            for stat, value, alert in report.statistics():
                self.metrics.set_drift(stat, value, alert)
        if report.alert:
            from ftjax.serve.drift import format_alert
            line = format_alert(report)
            log.warning(line)
            print(line, file=sys.stderr, flush=True)

    def finished(self, req: api.GenerationRequest, endpoint: str, choices, prompt_lens,
                 version: dict, t0: float, status: str = "ok") -> dict:
        prompt_tokens = sum(prompt_lens) * req.n
        completion = sum(c.completion_tokens for c in choices)
        latency = time.perf_counter() - t0
        firsts = [c.first_token_at for c in choices if c.first_token_at is not None]
        ttft = (min(firsts) - t0) if firsts else None
        if self.metrics is not None:
            if status != "ok":
                self.metrics.error(req.model, endpoint, "client_disconnected"
                                   if status == "cancelled" else "generation_failed")
            self.metrics.request_finished(req.model, endpoint,
                                          status="ok" if status == "ok" else "error",
                                          latency_s=latency, prompt_tokens=prompt_tokens,
                                          completion_tokens=completion, ttft_s=ttft)
        if self.request_log is not None:
            self.request_log.write({
                "time": time.time(), "endpoint": endpoint, "model": req.model,
                "version": version, "status": status, "n": req.n, "stream": req.stream,
                "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "latency_s": round(latency, 6),
                "ttft_s": None if ttft is None else round(ttft, 6),
                "finish_reasons": [c.finish for c in choices],
                "max_tokens": req.max_tokens, "temperature": req.temperature,
                "prompt": req.prompts if req.kind == "completion" else None,
                "messages": req.prompts[0] if req.kind == "chat" else None,
                "completion": [c.text for c in choices]})
        return api.usage(prompt_tokens, completion)


# ------------------------------------------------------------------------------------------
# The FastAPI app
# ------------------------------------------------------------------------------------------

def create_app(server: Server):
    """The ASGI app; starts the engine thread at startup and stops it at shutdown."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if server.warmup:
            took = server.engine.warmup()
            log.info("compiled the decode programs in %.1f s", took)
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    app = FastAPI(title="ftjax", lifespan=lifespan)

    def error_response(e: api.APIError, model: str = "", endpoint: str = "") -> JSONResponse:
        if server.metrics is not None and endpoint:
            server.metrics.error(model, endpoint, e.code or e.type)
        return JSONResponse(api.error_body(e), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        return JSONResponse(api.error_body(api.APIError(
            str(exc.detail), status=exc.status_code,
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
            code="not_found" if exc.status_code == 404 else None)), status_code=exc.status_code)

    async def body_of(request: HTTPRequest) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise api.APIError(f"the request body is not valid JSON: {e}",
                               code="invalid_json") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": server.engine.active(),
                "queued": server.engine.queued()}

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": m["id"], "object": "model", "created": server.started,
                 "owned_by": "ftjax", "root": m.get("parent", m["id"]),
                 "parent": m.get("parent"), "version": m["version"]}
                for m in server.registry.models()]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        if server.metrics is None:
            return PlainTextResponse("metrics are off\n", status_code=404)
        body, ctype = server.metrics.render()
        return PlainTextResponse(body, media_type=ctype)

    async def generate(request: HTTPRequest, endpoint: str, parse):
        t0 = time.perf_counter()
        model = ""
        try:
            body = await body_of(request)
            model = body.get("model", "") if isinstance(body, dict) else ""
            req = parse(body)
            loop = asyncio.get_running_loop()
            queue, choices, prompt_lens, version = server.start(req, loop)
        except api.APIError as e:
            return error_response(e, str(model), endpoint)
        if server.metrics is not None:
            server.metrics.request_started(req.model, endpoint)
        fp = fingerprint(version)
        headers = {"x-ftjax-version": json.dumps(version, sort_keys=True)}
        rid = api.new_id(req.kind)
        if req.stream:
            return StreamingResponse(
                _stream(server, req, endpoint, rid, queue, choices, prompt_lens, version, fp,
                        t0), media_type="text/event-stream", headers=headers)
        try:
            pending = len(choices)
            while pending:
                _, _, finish = await queue.get()
                pending -= finish is not None
        except asyncio.CancelledError:
            server.cancel(choices)
            server.finished(req, endpoint, choices, prompt_lens, version, t0, "cancelled")
            raise
        if any(c.finish == "error" for c in choices):
            server.finished(req, endpoint, choices, prompt_lens, version, t0, "error")
            return error_response(api.APIError(
                f"generation failed: {server.engine.last_error or 'the request callback failed'}",
                status=500, type="server_error", code="generation_failed"), req.model, endpoint)
        usage = server.finished(req, endpoint, choices, prompt_lens, version, t0)
        out = [(c.text, c.finish) for c in choices]
        build = api.chat_response if req.kind == "chat" else api.completion_response
        return JSONResponse(build(rid, req.model, out, usage, fp), headers=headers)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await generate(request, "completions", api.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await generate(request, "chat", api.parse_chat)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HTTPRequest):
        try:
            body = await body_of(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not isinstance(path, str):
                raise api.APIError("give 'lora_name' and 'lora_path' (strings)",
                                   code="missing_required_parameter")
            busy = server.engine.adapters_in_use()
            loop = asyncio.get_running_loop()
            try:
                version = await loop.run_in_executor(
                    None, lambda: server.registry.add_adapter(name, path, busy))
            except (ValueError, FileNotFoundError, OSError) as e:
                raise api.APIError(str(e), param="lora_path", code="invalid_adapter") from None
            server.engine.set_params(server.registry.params)
        except api.APIError as e:
            return error_response(e)
        return {"id": f"{server.registry.name}:{name}", "version": version}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HTTPRequest):
        try:
            body = await body_of(request)
            name = body.get("lora_name") if isinstance(body, dict) else None
            try:
                server.registry.remove_adapter(str(name))
            except KeyError:
                raise api.APIError(f"no adapter named {name!r}", status=404,
                                   param="lora_name", code="model_not_found") from None
        except api.APIError as e:
            return error_response(e)
        return {"removed": f"{server.registry.name}:{name}"}

    @app.exception_handler(Exception)
    async def internal_error(_request, exc):
        log.exception("internal error")
        return JSONResponse(api.error_body(api.APIError(
            f"internal server error: {type(exc).__name__}: {exc}", status=500,
            type="server_error")), status_code=500)

    return app


async def _stream(server: Server, req, endpoint, rid, queue, choices, prompt_lens, version,
                  fp, t0) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice (chat), text deltas, a finish chunk per
    choice, the usage chunk when asked (`stream_options.include_usage`), then [DONE]."""
    chat = req.kind == "chat"
    status = "cancelled"
    try:
        if chat:
            for c in choices:
                yield api.sse(api.chat_chunk(rid, req.model, c.index, {"role": "assistant",
                                                                      "content": ""}, None, fp))
        pending = len(choices)
        while pending:
            index, delta, finish = await queue.get()
            if delta:
                yield api.sse(api.chat_chunk(rid, req.model, index, {"content": delta}, None,
                                             fp) if chat else
                              api.completion_chunk(rid, req.model, index, delta, None, fp))
            if finish == "error":
                yield api.sse(api.error_body(api.APIError(
                    f"generation failed: {server.engine.last_error or 'callback failed'}",
                    status=500, type="server_error", code="generation_failed")))
                status = "error"
                return
            if finish is not None:
                pending -= 1
                yield api.sse(api.chat_chunk(rid, req.model, index, {}, finish, fp) if chat
                              else api.completion_chunk(rid, req.model, index, "", finish, fp))
        status = "ok"
        usage = server.finished(req, endpoint, choices, prompt_lens, version, t0)
        if req.include_usage:
            build = api.chat_chunk if chat else api.completion_chunk
            yield api.sse(build(rid, req.model, 0, {} if chat else "", None, fp, usage))
        yield api.sse("[DONE]")
    finally:
        if status != "ok":               # the client went away mid-stream
            server.cancel(choices)
            server.finished(req, endpoint, choices, prompt_lens, version, t0, status)
