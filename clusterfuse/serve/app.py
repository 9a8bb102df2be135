"""The routes of the OpenAI-compatible server, over one `AsyncLLM`.

Every request is parsed by hand from the raw body (not by FastAPI's parameter binding) so that
each way a body can be wrong — bytes that are not UTF-8, malformed JSON, a field out of range,
a prompt that does not fit — gets OpenAI's error body with a 4xx status and names the field.

A request's generation is an async iterator of the engine; closing it aborts the request and
frees its pages.  It is closed when the request ends, whichever way: finished, the client went
away (a stream's disconnect cancels the response; a non-streaming request watches for it), or
an error.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from clusterfuse.engine.async_engine import AsyncLLM, EngineDeadError
from clusterfuse.engine.outputs import RequestOutput
from clusterfuse.engine.sampling import SamplingParams
from clusterfuse.serve.metrics import CONTENT_TYPE, RequestTimer, ServerMetrics
from clusterfuse.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)

log = logging.getLogger("clusterfuse.serve")

RequestT = TypeVar("RequestT", bound=BaseModel)
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its response was complete."""


@dataclass
class _Prepared:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    echo_text: str  # the prompt text, for completions with echo


@dataclass
class _ServerState:
    engine: AsyncLLM
    served_model_name: str
    metrics: ServerMetrics
    #: Set when the engine raised something other than a request error: /health turns 503.
    engine_error: str | None = None


def default_max_request_bytes(capacity: int) -> int:
    """The largest request body a server of ``capacity`` tokens per sequence reads: 64 bytes per token
    (a token id in a JSON list takes at most 8, a token of text escaped as JSON rarely over 30), at
    least 1 MiB.  A larger body could not hold a prompt that fits, and reading and tokenizing it
    would cost the server memory and time (200 MB of text took 14 GB to tokenize)."""
    return max(1 << 20, 64 * capacity)


#: Seconds a client may take to send a request's body (`build_app`'s default ``body_timeout_s``).
DEFAULT_BODY_TIMEOUT_S = 30.0


def build_app(engine: AsyncLLM, served_model_name: str, *, drain_on_shutdown: bool = True,
              max_request_bytes: int | None = None, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI application serving ``engine`` (an `AsyncLLM`) under ``served_model_name``.

    Request bodies over ``max_request_bytes`` (default `default_max_request_bytes` of the engine's
    capacity) are refused with 413 before they are read whole, and bodies not received within
    ``body_timeout_s`` seconds with 408 (a client that trickles or stalls its body would otherwise
    hold its connection and buffers for as long as it likes).

    On shutdown (lifespan end: uvicorn got Ctrl-C / SIGTERM and in-flight responses finished)
    the engine is shut down, draining what is left when ``drain_on_shutdown``.
    """
    if max_request_bytes is None:
        max_request_bytes = default_max_request_bytes(engine.capacity)
    body_limit = _BodyLimit(max_request_bytes, body_timeout_s)
    state = _ServerState(engine, served_model_name, ServerMetrics(engine.stats))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("draining and stopping the engine")
        await engine.shutdown(drain=drain_on_shutdown)

    app = FastAPI(title="clusterfuse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    # ------------------------------------------------------------------ errors: always OpenAI's body
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count(state, request, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500
                       else "server_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_api_error(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        _count(state, request, 500)
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> Response:
        if state.engine_error is not None:
            return JSONResponse({"status": "error", "error": state.engine_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_name, max_model_len=engine.capacity)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        _check_model(state, model_id)
        return ModelCard(id=served_model_name, max_model_len=engine.capacity)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest, body_limit)
        _check_model(state, body.model)
        messages = body.chat_messages()
        try:
            prompt_text = await _off_loop_if_long(sum(len(m["content"]) for m in messages),
                                                  engine.apply_chat_template, messages)
        except ValueError as e:  # the template refused the conversation (roles out of order, ...)
            raise APIError(400, f"messages: {e}", param="messages") from None
        ids = await _encode(engine.tokenizer, prompt_text, add_special_tokens=False)
        prepared = _prepare(state, new_id("chatcmpl"), ids, body, body.requested_max_tokens, "messages")
        if body.stream:
            return await _stream(state, request, prepared, body.include_usage, chat=True)
        return await _complete(state, request, prepared, _chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest, body_limit)
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            ids = await _encode(engine.tokenizer, body.prompt, add_special_tokens=True)
            prompt_text = body.prompt
        else:
            ids = list(body.prompt)
            vocab = engine.tokenizer.vocab_size
            if max(ids) >= vocab:
                raise APIError(400, f"prompt: token id {max(ids)} is outside the vocabulary (size {vocab})",
                               param="prompt")
            prompt_text = engine.tokenizer.decode(ids) if body.echo else ""
        prepared = _prepare(state, new_id("cmpl"), ids, body, body.max_tokens, "prompt")
        prepared.echo_text = prompt_text if body.echo else ""
        if body.stream:
            return await _stream(state, request, prepared, body.include_usage, chat=False)
        return await _complete(state, request, prepared, _completion_response)

    return app


# ----------------------------------------------------------------------------- parsing
def _validation_api_error(errors: Any) -> APIError:
    """The first pydantic error as a 400 naming the field."""
    first = list(errors)[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


@dataclass(frozen=True)
class _BodyLimit:
    """How much of a request body the server reads, and for how long."""

    max_bytes: int
    timeout_s: float


async def _read_body(request: Request, limit: _BodyLimit) -> bytes:
    """The whole body; a 413 as soon as it is known to be over ``limit.max_bytes`` (from its
    Content-Length before reading anything, or while reading a body sent in chunks), a 408 when it
    has not all arrived within ``limit.timeout_s``."""
    def too_large(size: str) -> APIError:
        return APIError(413, f"request body: {size} bytes is over this server's limit of {limit.max_bytes} bytes",
                        code="request_too_large")

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit.max_bytes:
        raise too_large(length)
    chunks, size = [], 0
    try:
        with anyio.fail_after(limit.timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit.max_bytes:
                    raise too_large(f"more than {limit.max_bytes}")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"request body: not received within {limit.timeout_s:g} s ({size} bytes arrived)",
                       code="request_timeout") from None
    return b"".join(chunks)


async def _parse(request: Request, model: type[RequestT], limit: _BodyLimit) -> RequestT:
    raw = await _read_body(request, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body: not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body: not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:  # Python's JSON reader recurses per level: [[[[...]]]] runs out of stack
        raise APIError(400, "request body: JSON nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body: expected a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise _validation_api_error(e.errors(include_url=False)) from None


#: Texts longer than this are templated and tokenized off the event loop, so that other requests'
#: streams keep flowing.
_OFF_LOOP_CHARS = 4096


async def _off_loop_if_long(chars: int, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)``, in a worker thread when it handles more than `_OFF_LOOP_CHARS` characters."""
    if chars > _OFF_LOOP_CHARS:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


async def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return await _off_loop_if_long(len(text), tokenizer.encode, text, add_special_tokens=add_special_tokens)


def _check_model(state: _ServerState, name: str) -> None:
    if name != state.served_model_name:
        raise APIError(404, f"model: the model `{name}` does not exist; this server serves "
                       f"`{state.served_model_name}`", param="model", code="model_not_found")


def _prepare(state: _ServerState, request_id: str, ids: list[int], body: ChatCompletionRequest | CompletionRequest,
             max_tokens: int | None, prompt_field: str) -> _Prepared:
    capacity = state.engine.capacity
    if not ids:
        raise APIError(400, f"{prompt_field}: the prompt is empty", param=prompt_field)
    if len(ids) >= capacity:
        raise APIError(400, f"{prompt_field}: the prompt is {len(ids)} tokens; this server holds at most "
                       f"{capacity} tokens per sequence (prompt + output)", param=prompt_field,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = capacity - len(ids)
    elif len(ids) + max_tokens > capacity:
        raise APIError(400, f"max_tokens: the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = "
                       f"{len(ids) + max_tokens} tokens is over this server's capacity of {capacity} tokens per "
                       "sequence", param="max_tokens", code="context_length_exceeded")
    try:
        params = body.sampling_params(max_tokens)
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        raise APIError(400, str(e), param=field if field.isidentifier() else None) from None
    return _Prepared(request_id, ids, params, "")


#: The routes whose requests are counted (a fixed set: a label per path a client makes up would grow forever).
_COUNTED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


def _count(state: _ServerState, request: Request, status: int) -> None:
    if request.url.path in _COUNTED_ROUTES:
        state.metrics.requests.labels(request.url.path, str(status)).inc()


# ----------------------------------------------------------------------------- generation
async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone (and ``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation run its course (it unwinds the engine's iterator) before anyone
            # touches that iterator again: closing it while it still runs is an error.
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone()
    return task.result()


class _Generation:
    """One request in the engine: its output iterator, metrics, and the error mapping."""

    def __init__(self, state: _ServerState, prepared: _Prepared) -> None:
        self.state = state
        self.prepared = prepared
        self.timer = RequestTimer(state.metrics)
        self._it: AsyncIterator[RequestOutput] | None = None
        self.last: RequestOutput | None = None

    async def next(self) -> RequestOutput | None:
        """The next output, or None when the request has finished."""
        try:
            if self._it is None:
                p = self.prepared
                it = self.state.engine.generate(p.prompt_ids, p.params, request_id=p.request_id)
                self._it = aiter(await it if inspect.isawaitable(it) else it)
            out = await anext(self._it)
        except StopAsyncIteration:
            return None
        except ValueError as e:  # the engine refused the request
            raise APIError(400, str(e)) from None
        except EngineDeadError as e:  # the engine thread stopped: this server cannot serve any more
            self.state.engine_error = str(e)
            raise APIError(503, str(e), type="server_error") from None
        except RuntimeError as e:  # AsyncLLM refuses new requests while it shuts down
            raise APIError(503, f"not accepting requests: {e}", type="server_error") from None
        if out.delta_token_ids:
            self.timer.tokens(len(out.delta_token_ids), out.arrival_s, out.first_token_s)
        if out.finished:
            self.timer.finished(out.finish_reason, out.prompt_tokens, out.arrival_s, out.finished_s)
        self.last = out
        return out

    async def close(self) -> None:
        """Abort the request if it is still running (frees its pages); shielded so that a cancelled
        response (the client went away) still gets to close it."""
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


async def _complete(state: _ServerState, request: Request, prepared: _Prepared,
                    respond: Callable[[_ServerState, _Prepared, RequestOutput], BaseModel]) -> Response:
    gen = _Generation(state, prepared)

    async def run() -> RequestOutput | None:
        while (out := await gen.next()) is not None and not out.finished:
            pass
        return gen.last

    try:
        out = await _or_disconnect(request, run())
    except ClientGone:
        _count(state, request, 499)
        log.info("client left: request %s aborted", prepared.request_id)
        return Response(status_code=499)
    finally:
        await gen.close()
    if out is None or not out.finished:  # the engine stopped (shutdown) before the request finished
        raise APIError(503, "the request was aborted: the server is shutting down", type="server_error")
    _count(state, request, 200)
    return JSONResponse(respond(state, prepared, out).model_dump(mode="json"))


def _chat_response(state: _ServerState, prepared: _Prepared, out: RequestOutput) -> ChatCompletionResponse:
    return ChatCompletionResponse(id=prepared.request_id, model=state.served_model_name,
                                  choices=[ChatChoice(message=AssistantMessage(content=out.text),
                                                      finish_reason=out.finish_reason)],
                                  usage=Usage.of(out.prompt_tokens, out.completion_tokens))


def _completion_response(state: _ServerState, prepared: _Prepared, out: RequestOutput) -> CompletionResponse:
    return CompletionResponse(id=prepared.request_id, model=state.served_model_name,
                              choices=[CompletionChoice(text=prepared.echo_text + out.text,
                                                        finish_reason=out.finish_reason)],
                              usage=Usage.of(out.prompt_tokens, out.completion_tokens))


class _StreamChunks:
    """The server-sent events of one streamed request (chat or completion chunks).

    Every token's chunk has the same JSON around its text, so that frame is rendered once, from the
    response model with a marker for the text, and each token then costs one ``json.dumps`` of its
    text: the event loop shares the interpreter with the engine thread, and at 64 streams it formats
    thousands of chunks a second.  The other chunks (first, last, usage) go through the models."""

    _MARK = "@@clusterfuse-text@@"

    def __init__(self, state: _ServerState, prepared: _Prepared, chat: bool) -> None:
        self.chat = chat
        self.prepared = prepared
        self._head = {"id": prepared.request_id, "model": state.served_model_name, "created": int(time.time())}
        frame = self._sse(self._text_chunk(self._MARK, None)).split(json.dumps(self._MARK))
        self._frame = (frame[0], frame[1]) if len(frame) == 2 else None  # None: a served name holding the mark

    def _text_chunk(self, text: str, finish: str | None, role: str | None = None) -> BaseModel:
        if self.chat:
            return ChatCompletionChunk(**self._head, choices=[ChatChunkChoice(
                delta=DeltaMessage(role=role, content=text), finish_reason=finish)])
        return CompletionResponse(**self._head, choices=[CompletionChoice(text=text, finish_reason=finish)])

    @staticmethod
    def _sse(obj: BaseModel) -> str:
        return f"data: {obj.model_dump_json()}\n\n"

    def _text(self, text: str) -> str:
        if self._frame is None:
            return self._sse(self._text_chunk(text, None))
        return f"{self._frame[0]}{json.dumps(text)}{self._frame[1]}"

    def events(self, out: RequestOutput, first: bool) -> list[str]:
        """The events for one engine output (``first``: the request's first)."""
        events = []
        text = out.delta_text
        if first:
            if self.chat:
                events.append(self._sse(self._text_chunk("", None, role="assistant")))
            else:
                text = self.prepared.echo_text + text
        if out.finished:
            if self.chat:
                if text:
                    events.append(self._text(text))
                events.append(self._sse(ChatCompletionChunk(**self._head, choices=[ChatChunkChoice(
                    delta=DeltaMessage(), finish_reason=out.finish_reason)])))
            else:
                events.append(self._sse(self._text_chunk(text, out.finish_reason)))
        elif text:
            events.append(self._text(text))
        return events

    def usage(self, out: RequestOutput) -> str:
        usage = Usage.of(out.prompt_tokens, out.completion_tokens)
        model = ChatCompletionChunk if self.chat else CompletionResponse
        return self._sse(model(**self._head, choices=[], usage=usage))


async def _stream(state: _ServerState, request: Request, prepared: _Prepared, include_usage: bool,
                  chat: bool) -> Response:
    """Server-sent events.  The first output is awaited before the response starts, so a request the
    engine refuses still gets a 4xx status rather than an error inside a 200 stream."""
    gen = _Generation(state, prepared)
    try:
        first = await _or_disconnect(request, gen.next())
    except ClientGone:
        await gen.close()
        _count(state, request, 499)
        return Response(status_code=499)
    except BaseException:
        await gen.close()
        raise

    chunks = _StreamChunks(state, prepared, chat)

    async def events() -> AsyncIterator[str]:
        status = 499  # until the stream completes: a cancellation here means the client went away
        try:
            out, is_first = first, True
            while out is not None:
                for event in chunks.events(out, is_first):
                    yield event
                is_first = False
                if out.finished:
                    break
                out = await gen.next()
            if include_usage and gen.last is not None:
                yield chunks.usage(gen.last)
            yield "data: [DONE]\n\n"
            status = 200
        except APIError as e:  # the engine failed mid-stream: say so in the stream, then end it
            status = e.status
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await gen.close()
            _count(state, request, status)
            if status == 499:
                log.info("client left: request %s aborted", prepared.request_id)

    return _ClosingStreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its event generator when the response ends, whichever way.  On a disconnect Starlette
    cancels the sending; if the generator was waiting at a ``yield`` (its chunk being sent), it would
    otherwise stay open until garbage collection, and the request would keep its pages until then."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
