"""An OpenAI-compatible HTTP server over the continuous-batching engine, with a web chat page.

    app = create_app(engine, tokenizer, api_key="...")      # then uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI's wire format, `stream: true` as
server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus) and
the chat page at `/`. Every client error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`
with a 4xx status, so OpenAI clients raise their usual exceptions and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from importlib.resources import files
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoseek.cost.energy import EnergyMeter
from nanoseek.data.tokenizer import DataError, Tokenizer
from nanoseek.infer import Engine, EngineStopped, InferenceError, QueueFull, SamplingParams, TokenEvent
from nanoseek.serve.metrics import ServerMetrics

log = logging.getLogger("nanoseek.serve")
T = TypeVar("T")

MAX_BODY_BYTES = 1 << 20  # a full prompt for a 128K-token context is ~0.5 MB of text
MAX_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 16, 256
# Endpoints named in the request counter; any other path counts as "other", so scanners cannot grow the label set.
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
# OpenAI parameters this server does not implement, with the values that mean "not used" (accepted silently).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}


# ---- errors -------------------------------------------------------------------------------------------------

class APIError(Exception):
    """A request the server will not serve as sent; becomes an OpenAI-style error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its work was cancelled."""


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as 'field: what is wrong', and the field's dotted path."""
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    where = f"{param}: " if param else "the request body: "
    return f"{where}{first['msg']}{more}", param


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for. A checkpoint's vocabulary may be padded past its tokenizer's (DeepSeek-V3:
    129,280 rows for fewer tokens): an id with no token stands for no bytes, as decode() gives it no text."""
    try:
        return tokenizer.token_bytes(token_id)
    except DataError:
        return b""


class TextOffsets:
    """Where each token's text starts in the completion, in characters (`text_offset`). Counted from the tokens'
    own bytes through an incremental UTF-8 decoder, not from the text released so far (a stop string holds text
    back); a token that ends inside a character leaves the next offset at that character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.chars = tokenizer, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token_id: int) -> int:
        at = self.chars
        self.chars += len(self.decoder.decode(token_bytes(self.tokenizer, token_id)))
        return at


# ---- middleware (plain ASGI, so they run before the body is parsed and see every response) -----------------

class RequestCounter:
    """Counts every response by endpoint and status, errors from the other middleware included."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status: int | None = None
        failed = False

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            failed = True
            raise
        finally:
            # no response and no error: the client left first (499, nginx's code), e.g. mid-upload
            code = status if status is not None else 500 if failed else 499
            self.metrics.requests.labels(endpoint=endpoint, status=str(code)).inc()


class BodyLimit:
    """Rejects bodies over `max_bytes` with 413, by Content-Length or by counting what arrives, then replays
    the body to the app: a client cannot make the server buffer more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: int | str) -> JSONResponse:
        return error_response(413, f"the request body is {size} bytes, over this server's limit of "
                                   f"{self.max_bytes} bytes: send a shorter prompt or fewer messages",
                              code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, f"Content-Length {length.decode(errors='replace')!r} is not a number",
                                     code="bad_content_length")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await self._too_large(int(length))(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(f"more than {self.max_bytes}")(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class BearerAuth:
    """With an API key set, `/v1/*` and `/metrics` need `Authorization: Bearer KEY`; the chat page and
    `/health` stay open (the page asks for the key)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path == "/metrics"):
            given = dict(scope["headers"]).get(b"authorization")
            if given is None:
                await error_response(401, "this server needs an API key: send the header "
                                          "'Authorization: Bearer KEY' (the key the server was started with)",
                                     code="missing_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            if not secrets.compare_digest(given, self.expected):
                await error_response(401, "incorrect API key: send 'Authorization: Bearer KEY' with the key the "
                                          "server was started with (--api-key or NANOSEEK_API_KEY)",
                                     code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- request bodies (OpenAI's schema; unknown fields are ignored, as OpenAI clients send extras) -------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        """OpenAI's newer "developer" role is the system prompt; text parts are joined into one string."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _GenerationRequest(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but vLLM's and llama.cpp's servers take it too
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        # every stop string is checked against the text at each token, on the engine's thread that the whole
        # batch shares: bounded (OpenAI takes 4)
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return v


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# ---- the app ----------------------------------------------------------------------------------------------

async def _client_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it if the client disconnects first: a gone client must not keep a batch slot."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _usage(ev: TokenEvent) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


class Server:
    """The request handlers: validation into engine calls, engine events into OpenAI responses."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.created = int(time.time())

    # -- shared checks ------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.engine.model_name:
            raise APIError(404, f"the model {model!r} does not exist on this server; it serves "
                                f"{self.engine.model_name!r} (GET /v1/models lists it)",
                           param="model", code="model_not_found")

    @staticmethod
    def check_supported(req: _GenerationRequest) -> None:
        for name, value in (req.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise APIError(400, f"the parameter {name!r} is not supported by this server: leave it out",
                               param=name, code="unsupported_parameter")
        if (req.n or 1) != 1:
            raise APIError(400, f"n={req.n}: this server returns one choice per request; send {req.n} requests "
                                "(with different seeds) instead", param="n", code="unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def sampling_params(self, req: _GenerationRequest, prompt_ids: list[int], max_tokens: int | None,
                        logprobs: int | None, prompt_param: str, default_max: int | None = None) -> SamplingParams:
        """Engine parameters, after checking that prompt + max_tokens fit in the model's context. Without
        max_tokens: `default_max` (OpenAI's 16 for completions) or what the context leaves, whichever is less."""
        context, n_prompt = self.engine.max_context, len(prompt_ids)
        if n_prompt >= context:
            raise APIError(400, f"the prompt is {n_prompt} tokens, but this model's context is {context} tokens "
                                "(prompt and answer together): shorten it", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max or context, context - n_prompt)
        elif n_prompt + max_tokens > context:
            raise APIError(400, f"max_tokens={max_tokens} does not fit: this model's context is {context} tokens "
                                f"and the prompt takes {n_prompt}; ask for at most {context - n_prompt} tokens "
                                "or shorten the prompt", param="max_tokens", code="context_length_exceeded")
        stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            stop=stop,  # the engine stops at EOS unless ignore_eos
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )

    # -- the engine stream, timed ---------------------------------------------------------------------------
    async def events(self, prompt_ids: list[int], params: SamplingParams,
                     arrived: float) -> AsyncGenerator[TokenEvent, None]:
        """The engine's events with admission errors as API errors, and the latencies recorded."""
        stream = self.engine.stream(prompt_ids, params)
        m = self.metrics
        try:
            try:
                ev = await anext(stream)
            except QueueFull as e:
                raise APIError(429, f"the server is busy (its request queue is full: {e}); retry in a moment",
                               code="queue_full") from e
            except InferenceError as e:
                raise APIError(400, str(e), code="invalid_request") from e
            last = time.perf_counter()
            m.time_to_first_token.observe(last - arrived)
            m.prompt_tokens.inc(ev.prompt_tokens)
            m.generation_tokens.inc()
            yield ev
            async for ev in stream:
                now = time.perf_counter()
                m.inter_token_latency.observe(now - last)
                m.generation_tokens.inc()
                last = now
                yield ev
            m.request_latency.observe(last - arrived)
        except EngineStopped as e:  # the server is stopping, before or during the answer: not the request's fault
            raise APIError(503, f"{e}: retry later", code="unavailable") from e
        except APIError:
            raise
        except Exception as e:  # a step failed under this request: its answer, not an unhandled error (that would
            log.exception("generation failed")  # also make uvicorn drop the client's keep-alive connection)
            raise APIError(500, f"generation failed: {e}", code="generation_failed") from e
        finally:
            await stream.aclose()

    async def run(self, request: Request, req: _GenerationRequest, prompt_ids: list[int], params: SamplingParams,
                  arrived: float, render: Callable[[list[TokenEvent]], dict[str, Any]],
                  chunks: Callable[[TokenEvent, AsyncIterator[TokenEvent]], AsyncIterator[str]]) -> Response:
        """One generation: the whole answer as JSON, or server-sent events once the first token exists (so
        queue-full and bad-parameter errors still get their HTTP status)."""
        events = self.events(prompt_ids, params, arrived)
        if not req.stream:
            async def collect() -> list[TokenEvent]:
                return [ev async for ev in events]

            return JSONResponse(render(await _unless_disconnected(request, collect())))
        first = await _unless_disconnected(request, anext(events))
        return StreamingResponse(chunks(first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(events.aclose))

    async def _stream_tail(self, first: TokenEvent, rest: AsyncIterator[TokenEvent],
                           chunk: Callable[[TokenEvent], list[dict[str, Any]]], usage_chunk: dict[str, Any] | None
                           ) -> AsyncIterator[str]:
        """SSE lines for every event, the usage chunk if asked for, then [DONE]; an engine failure mid-stream
        becomes an error event (the status line is already sent)."""
        last = first
        try:
            for c in chunk(first):
                yield _sse(c)
            async for last in rest:
                for c in chunk(last):
                    yield _sse(c)
        except APIError as e:  # e.g. the engine stopped (503)
            yield _sse(error_body(e.status, e.message, e.param, e.code))
            return
        except Exception as e:
            log.exception("generation failed mid-stream")
            yield _sse(error_body(500, f"generation failed: {e}"))
            return
        if usage_chunk is not None:
            yield _sse({**usage_chunk, "usage": _usage(last)})
        yield _sse("[DONE]")

    # -- logprobs in OpenAI's two formats --------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, events: list[TokenEvent]) -> dict[str, Any]:
        def entry(token_id: int, lp: float) -> dict[str, Any]:  # bytes: the token's own, part of a character or not
            return {"token": self._token_text(token_id), "logprob": lp,
                    "bytes": list(token_bytes(self.tokenizer, token_id))}

        return {"content": [{**entry(ev.token_id, ev.logprob),
                             "top_logprobs": [entry(i, lp) for i, lp in ev.top_logprobs or []]} for ev in events],
                "refusal": None}

    def completion_logprobs(self, events: list[TokenEvent], offsets: TextOffsets) -> dict[str, Any]:
        return {"tokens": [self._token_text(ev.token_id) for ev in events],
                "token_logprobs": [ev.logprob for ev in events],
                "top_logprobs": [None if ev.top_logprobs is None else
                                 {self._token_text(i): lp for i, lp in ev.top_logprobs} for ev in events],
                "text_offset": [offsets(ev.token_id) for ev in events]}

    # -- endpoints --------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise APIError(400, f"the model {self.engine.model_name!r} has no chat template (no chat_template in "
                                "its tokenizer_config.json and no chat_template.jinja), so the server cannot turn "
                                "messages into a prompt: add a template to the model folder, or use "
                                "/v1/completions with a prompt in the model's own format",
                           param="messages", code="no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template([m.as_template_input() for m in messages],
                                                      add_generation_prompt=True)
        except (TemplateError, DataError) as e:
            raise APIError(400, f"the model's chat template rejected the messages: {e}", param="messages") from e
        return self.encode(text, "messages")  # the template starts with the BOS token's text

    def encode(self, text: str, param: str) -> list[int]:
        try:  # JSON can carry a lone surrogate ("\\ud800"), which is no text any tokenizer can read
            text.encode()
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param}: not valid Unicode text ({e.reason} at character {e.start}: a lone UTF-16 "
                                "surrogate such as \\ud800)", param=param) from e
        return self.tokenizer.encode(text)

    async def chat(self, request: Request, req: ChatRequest) -> Response:
        arrived = time.perf_counter()
        self.check_model(req.model)
        self.check_supported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt_ids = self.chat_prompt(req.messages)
        params = self.sampling_params(req, prompt_ids, req.max_completion_tokens or req.max_tokens,
                                      (req.top_logprobs or 0) if req.logprobs else None, "messages")
        rid, name = f"chatcmpl-{uuid.uuid4().hex}", self.engine.model_name
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if with_usage else {}

        def render(events: list[TokenEvent]) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion", "created": head["created"], "model": name,
                    "choices": [{"index": 0,
                                 "message": {"role": "assistant", "content": "".join(ev.text for ev in events)},
                                 "logprobs": self.chat_logprobs(events) if req.logprobs else None,
                                 "finish_reason": events[-1].finish_reason}],
                    "usage": _usage(events[-1])}

        def chunk(ev: TokenEvent) -> list[dict[str, Any]]:
            out = []
            if ev.text or req.logprobs:
                out.append({**head, "choices": [{"index": 0, "delta": {"content": ev.text},
                                                 "logprobs": self.chat_logprobs([ev]) if req.logprobs else None,
                                                 "finish_reason": None}], **extra})
            if ev.finish_reason:
                out.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                 "finish_reason": ev.finish_reason}], **extra})
            return out

        async def chunks(first: TokenEvent, rest: AsyncIterator[TokenEvent]) -> AsyncIterator[str]:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra})
            async for line in self._stream_tail(first, rest, chunk, {**head, "choices": []} if with_usage else None):
                yield line

        return await self.run(request, req, prompt_ids, params, arrived, render, chunks)

    def completion_prompt(self, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return [self.tokenizer.bos_id, *self.encode(prompt, "prompt")]
        if all(isinstance(p, str) for p in prompt) and prompt:
            if len(prompt) > 1:
                raise APIError(400, f"{len(prompt)} prompts in one request: this server completes one prompt per "
                                    "request; send them as separate requests", param="prompt",
                               code="unsupported_parameter")
            return self.completion_prompt(prompt[0])
        ids = [int(t) for t in prompt]
        vocab = self.tokenizer.vocab_size
        if not ids or not all(0 <= t < vocab for t in ids):
            raise APIError(400, f"a prompt of token ids needs at least one id, each in [0, {vocab})", param="prompt")
        return ids

    async def completion(self, request: Request, req: CompletionRequest) -> Response:
        arrived = time.perf_counter()
        self.check_model(req.model)
        self.check_supported(req)
        prompt_ids = self.completion_prompt(req.prompt)
        params = self.sampling_params(req, prompt_ids, req.max_tokens, req.logprobs, "prompt", default_max=16)
        rid, name = f"cmpl-{uuid.uuid4().hex}", self.engine.model_name
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name}
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if with_usage else {}
        logprobs = req.logprobs is not None

        def render(events: list[TokenEvent]) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "text": "".join(ev.text for ev in events),
                                         "logprobs": self.completion_logprobs(events, TextOffsets(self.tokenizer))
                                         if logprobs else None,
                                         "finish_reason": events[-1].finish_reason}],
                    "usage": _usage(events[-1])}

        offsets = TextOffsets(self.tokenizer)

        def chunk(ev: TokenEvent) -> list[dict[str, Any]]:
            if not (ev.text or logprobs or ev.finish_reason):
                return []
            choice = {"index": 0, "text": ev.text,
                      "logprobs": self.completion_logprobs([ev], offsets) if logprobs else None,
                      "finish_reason": ev.finish_reason}
            return [{**head, "choices": [choice], **extra}]

        def chunks(first: TokenEvent, rest: AsyncIterator[TokenEvent]) -> AsyncIterator[str]:
            return self._stream_tail(first, rest, chunk, {**head, "choices": []} if with_usage else None)

        return await self.run(request, req, prompt_ids, params, arrived, render, chunks)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.engine.max_context}


def create_app(engine: Engine, tokenizer: Tokenizer, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, energy: EnergyMeter | None = None) -> FastAPI:
    """The server app for a started `engine` (the caller starts and shuts it down). With `api_key`, the API and
    the metrics need `Authorization: Bearer api_key`; with `energy`, /metrics reports energy per token."""
    metrics = ServerMetrics(engine, energy)
    server = Server(engine, tokenizer, metrics)
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.param, exc.code,
                              headers={"Retry-After": "1"} if exc.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        json_body = kind == "application/json" or kind.endswith("+json")  # what FastAPI parses as JSON
        if request.method == "POST" and not json_body:  # curl -d sends a form: its JSON is never read
            return error_response(400, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                       f"(this request's is {kind or 'missing'!r})")
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the metrics do

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); the server log has details")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        return await server.chat(request, body)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await server.completion(request, body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return server.model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, **engine.stats()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    page = (files("nanoseek.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    # The last added runs first: count every response, then check the key before reading any body.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics)
    return app
