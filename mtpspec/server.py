"""OpenAI-compatible HTTP server over the engine: ``mtpspec serve``, on FastAPI and uvicorn.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (whole responses, or with
``"stream": true`` Server-Sent Events ending in ``data: [DONE]``, plus a usage chunk when
``stream_options.include_usage``), ``GET /v1/models``, ``GET /health`` (503 while the engine
thread is dead), ``GET /metrics`` (Prometheus text, ``server_metrics``) and the web playground at
``GET /`` (``playground``: static files that use the API above). Request checking and
response bodies are ``openai_api``'s; decoding is a ``BatchSession`` driven by the
``Scheduler``'s one engine thread, so concurrent requests decode together.

The HTTP stack is a kept one (Starlette/FastAPI on uvicorn): one event loop serves every
connection, so a slow or idle client holds a socket, not a thread. Limits: a body limit (413), a
deadline to receive the body (408), a deadline for the headers and one for a client that stops
reading its answer, uvicorn's keep-alive timeout and connection cap (503 past it), a cap on requests running or waiting (503 with ``Retry-After``), and with an API key every
``/v1`` route wants ``Authorization: Bearer KEY`` (401); ``/health`` and ``/metrics`` stay open.
Parsing and tokenizing run in the thread pool; a client that goes away cancels its generation.

Must not: call the model or touch the session (that is the engine thread's), or let one request
stop another: every refusal is an OpenAI-style error body, every failure fails one request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mtpspec import openai_api, playground
from mtpspec.engine import Engine
from mtpspec.kv_cache import CacheFullError
from mtpspec.openai_api import APIError, CompletionRequest, ServedModel
from mtpspec.scheduler import EngineFailure, Scheduler, ServerBusyError, Ticket
from mtpspec.sequence import FinishEvent, GenerationResult, TokenEvent

ROUTES = ("/", "/static", "/health", "/metrics", "/v1/models", "/v1/completions",
          "/v1/chat/completions")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_size: int = 8
    draft_k: int = 4
    max_verify_rows: int | None = None  # cap on rows x (drafts + 1) per pass (see batch)
    spec: str = "none"  # for /v1/models and logs only
    max_waiting: int = 256          # requests waiting for a row beyond the batch; 503 past it
    max_connections: int = 512      # open connections and in-flight requests (uvicorn); 503 past it
    max_body_bytes: int = 4 << 20   # 413 past it
    body_timeout_s: float = 30.0    # 408 when the body takes longer to arrive
    keep_alive_s: float = 5.0       # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris)
    write_timeout_s: float = 60.0   # a client that takes no bytes of its answer this long is cut
    default_max_tokens: int = 256
    api_key: str | None = None      # None: no auth
    log_requests: bool = False
    watchdog_s: float = 0.5         # how often the engine thread is checked


class MTPServer:
    """The HTTP server plus what its handlers share: the served model and the scheduler.
    ``start`` binds it; ``serve_forever`` runs it (in any thread); ``shutdown`` stops it."""

    def __init__(self, engine: Engine, model_name: str, config: ServeConfig):
        if engine.tokenizer is None:
            raise ValueError("serving needs the model's tokenizer")
        self.config = config
        self.socket = socket.create_server((config.host, config.port), reuse_port=False,
                                           backlog=2048)
        session = engine.session(config.max_batch_size, config.draft_k, config.max_verify_rows)
        self.scheduler = Scheduler(session, config.max_waiting, config.watchdog_s)
        self.model = ServedModel(name=model_name, tokenizer=engine.tokenizer,
                                 context=session.max_len,
                                 max_new_tokens_for=session.max_new_tokens_for,
                                 draft_k=session.max_draft_k,
                                 default_max_tokens=config.default_max_tokens)
        self.started = int(time.time())
        self.app = build_app(self)
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, lifespan="off", log_level="info" if config.log_requests else "warning",
            access_log=config.log_requests, timeout_keep_alive=max(1, int(config.keep_alive_s)),
            limit_concurrency=config.max_connections, timeout_graceful_shutdown=2,
            http=_header_deadline(config.header_timeout_s)))
        self._stopped = threading.Event()
        self._running = False

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._running = True
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._uvicorn.should_exit = True
        if self._running:
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.scheduler.close()

    def count(self, path: str, status: int) -> None:
        """Count an answered request (unknown paths share one label)."""
        if path.startswith("/v1/models/"):
            path = "/v1/models"
        elif path.startswith("/static/"):
            path = "/static"
        self.scheduler.metrics.count_request(path if path in ROUTES else "other", status)


def build_app(server: MTPServer) -> FastAPI:
    """The FastAPI app of ``server``: routes, auth and error shapes."""
    app = FastAPI(title="mtpspec", docs_url=None, redoc_url=None, openapi_url=None)
    config = server.config

    def error(err: APIError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status, headers=headers)

    app.add_middleware(_Gate, server=server)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
        message = (f"no route {request.method} {request.url.path}" if err.status_code in (404, 405)
                   else str(err.detail))
        return error(APIError(err.status_code, message, code=code))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect):
        return Response(status_code=499)  # nobody reads it: the client left mid-body

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return error(APIError(500, f"internal error: {type(err).__name__}", kind="server_error",
                              code="internal_error"))

    @app.get("/health")
    async def health():
        if not server.scheduler.alive:
            return JSONResponse({"status": "engine_dead", "restarts": server.scheduler.restarts},
                                status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(server.scheduler.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def card() -> dict:
        return {"id": server.model.name, "object": "model", "created": server.started,
                "owned_by": "mtpspec", "context_length": server.model.context,
                "speculative": {"method": config.spec, "draft_k": server.model.draft_k},
                "chat_template": server.model.tokenizer.chat_template is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != server.model.name:
            raise APIError(404, f"The model {name!r} does not exist", param="model",
                           code="model_not_found")
        return card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(server, request, chat=True)

    playground.add_routes(app)
    return app


def _header_deadline(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a deadline for a request's headers: from the connection (or
    the first byte after a response) until the headers are complete. uvicorn closes idle
    keep-alive connections itself but waits forever on a client that trickles or never sends
    its headers."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # a new request starts: keep the first deadline, do not extend it
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # its headers are in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if (self.cycle is None or self.cycle.response_complete) and not \
                    self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


class _SlowReader(Exception):
    """The client took none of its answer within the write timeout."""


class _Gate:
    """ASGI middleware: the API key on ``/v1`` routes (401 before anything is read), the
    request counter (by path and status), and the write timeout: a client that stops reading
    its answer (a stream backs up into the socket) has its connection closed."""

    def __init__(self, app, server: MTPServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, key = scope["path"], self.server.config.api_key
        if key is not None and path.startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not _authorized(header, key):
                err = APIError(401, "Incorrect API key provided; send it as 'Authorization: "
                                    "Bearer KEY'", code="invalid_api_key")
                await JSONResponse(err.body, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                self.server.count(path, 401)
                return

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.server.count(path, message["status"])
            try:
                await asyncio.wait_for(send(message), self.server.config.write_timeout_s)
            except TimeoutError:
                raise _SlowReader() from None
        try:
            await self.app(scope, receive, counted)
        except* _SlowReader:
            pass  # the response is unfinished: uvicorn closes the connection


def _authorized(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _read_body(server: MTPServer, request: Request) -> bytes:
    """The body, within the size limit (413) and the time limit (408)."""
    limit = server.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise APIError(400, "invalid Content-Length", code="invalid_request")
    if declared is not None and (len(declared) > 15 or int(declared) > limit):  # unread
        raise APIError(413, f"request body of {declared} bytes exceeds {limit}",
                       code="request_too_large")
    parts: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
            parts.append(part)
    try:
        await asyncio.wait_for(collect(), server.config.body_timeout_s)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within "
                            f"{server.config.body_timeout_s:g} s", code="request_timeout") from None
    body = b"".join(parts)
    if not body:
        raise APIError(400, "the request has no body", code="invalid_json")
    return body


def _check(server: MTPServer, raw: bytes, chat: bool) -> CompletionRequest:
    """Parse and tokenize (in a pool thread: tokenizing a long prompt takes a while)."""
    return openai_api.parse_request(openai_api.parse_body(raw), chat, server.model)


async def _generate(server: MTPServer, request: Request, chat: bool) -> Response:
    raw = await _read_body(server, request)
    parsed = await run_in_threadpool(_check, server, raw, chat)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # (choice index, event)
    tickets: list[Ticket] = []
    try:
        for index in range(parsed.n):
            deliver = lambda event, i=index: loop.call_soon_threadsafe(  # noqa: E731
                events.put_nowait, (i, event))
            tickets.append(server.scheduler.submit(parsed.prompt_ids, parsed.choice_options(index),
                                                   deliver))
    except (ServerBusyError, CacheFullError, ValueError) as err:
        for ticket in tickets:
            server.scheduler.cancel(ticket)
        if isinstance(err, ServerBusyError):
            return JSONResponse(APIError(503, str(err), code="server_busy",
                                         kind="server_error").body,
                                status_code=503, headers={"Retry-After": "1"})
        code = "context_length_exceeded" if isinstance(err, CacheFullError) else None
        raise APIError(400, str(err), code=code) from None
    if parsed.stream:
        return StreamingResponse(_stream(server, parsed, tickets, events),
                                 headers={"Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache"})
    results: list[GenerationResult | None] = [None] * parsed.n
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while any(r is None for r in results):
            getting = asyncio.ensure_future(events.get())
            await asyncio.wait((getting, gone), return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                return Response(status_code=499)  # nobody reads it: the client left
            index, event = getting.result()
            if isinstance(event, EngineFailure):
                raise APIError(500, event.message, kind="server_error", code="engine_error")
            if isinstance(event, FinishEvent):
                results[index] = event.result
    finally:
        gone.cancel()
        for index, ticket in enumerate(tickets):
            if results[index] is None:
                server.scheduler.cancel(ticket)
    body = openai_api.completion(parsed, openai_api.new_id(chat), server.model.name, results,
                                 server.model.tokenizer)
    return JSONResponse(body)


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(server: MTPServer, parsed: CompletionRequest, tickets: list[Ticket],
                  events: asyncio.Queue) -> AsyncIterator[bytes]:
    """SSE events of a streamed request; cancels its generations if the client goes away."""
    ident, name, tokenizer = openai_api.new_id(parsed.chat), server.model.name, server.model.tokenizer
    results: list[GenerationResult | None] = [None] * parsed.n
    held: list[list] = [[] for _ in range(parsed.n)]  # logprob entries not yet sent, per choice
    tokens: list[list] = [[] for _ in range(parsed.n)]  # include_draft entries not yet sent
    sse = lambda payload: b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"  # noqa: E731
    try:
        if parsed.chat:
            for index in range(parsed.n):
                yield sse(openai_api.chunk(parsed, ident, name, None, first=True, index=index))
        while any(r is None for r in results):
            index, event = await events.get()
            if isinstance(event, EngineFailure):
                yield sse(APIError(500, event.message, kind="server_error",
                                   code="engine_error").body)
                break
            if isinstance(event, TokenEvent):
                if event.logprob is not None:
                    held[index].append(event.logprob)
                if parsed.include_draft and event.token_id >= 0:
                    tokens[index].append(openai_api.token_entry(event.token_id, event.from_draft,
                                                                event.drafted))
                if event.text:
                    logprobs = openai_api.logprobs_body(parsed, tokenizer, held[index])
                    held[index] = []
                    yield sse(openai_api.chunk(parsed, ident, name, event.text, index=index,
                                               logprobs=logprobs, tokens=tokens[index]))
                    tokens[index] = []
            elif isinstance(event, FinishEvent):
                results[index] = event.result
                logprobs = (openai_api.logprobs_body(parsed, tokenizer, held[index])
                            if held[index] else None)
                yield sse(openai_api.chunk(parsed, ident, name, None, event.result.finish_reason,
                                           index=index, logprobs=logprobs, tokens=tokens[index]))
        if parsed.include_usage and all(r is not None for r in results):
            yield sse(openai_api.usage_chunk(parsed, ident, name, results))
        yield b"data: [DONE]\n\n"
    finally:
        for index, ticket in enumerate(tickets):
            if results[index] is None:
                server.scheduler.cancel(ticket)


def start(engine: Engine, model_name: str, config: ServeConfig) -> MTPServer:
    """Bind (port 0: any free port) and return the server; call ``serve_forever`` on it."""
    server = MTPServer(engine, model_name, config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"mtpspec: serve: warning: listening on {config.host} without --api-key",
              file=sys.stderr)
    return server
