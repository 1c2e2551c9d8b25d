"""OpenAI-compatible HTTP server over the engine: ``mtpspec serve``.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (whole responses, or with
``"stream": true`` Server-Sent Events ending in ``data: [DONE]``, plus a usage chunk when
``stream_options.include_usage``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus text). Request checking and response bodies are ``openai_api``'s; decoding is a
``BatchSession`` driven by the ``Scheduler``'s one engine thread, so concurrent requests decode
together, each accepting its own number of drafted tokens per step.

The standard library's ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive,
chunked streaming) keeps the server free of dependencies. A handler thread only parses, tokenizes
and waits on its ticket's queue; while it waits it watches its socket, so a client that goes away
(mid-stream or not) cancels its generation and frees its batch row.

Must not: call the model or touch the session (that is the engine thread's), or let one bad
request take the server down: every refusal is a 4xx with an OpenAI-style error body.
"""
from __future__ import annotations

import json
import queue
import select
import socket
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mtpspec import openai_api
from mtpspec.engine import Engine
from mtpspec.kv_cache import CacheFullError
from mtpspec.openai_api import APIError, CompletionRequest, ServedModel
from mtpspec.scheduler import EngineFailure, Scheduler, ServerBusyError, Ticket
from mtpspec.sequence import FinishEvent

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
GENERATE_ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 4 << 20
POLL_S = 0.2  # how often a waiting handler checks that its client is still there


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_size: int = 8
    draft_k: int = 4
    max_verify_rows: int | None = None  # cap on rows x (drafts + 1) per pass (see batch)
    spec: str = "none"  # for /v1/models and logs only
    max_waiting: int = 256
    default_max_tokens: int = 256
    log_requests: bool = False


class MTPServer(ThreadingHTTPServer):
    """The HTTP server plus what its handlers share: the served model and the scheduler."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, engine: Engine, model_name: str, config: ServeConfig):
        if engine.tokenizer is None:
            raise ValueError("serving needs the model's tokenizer")
        self.config = config
        session = engine.session(config.max_batch_size, config.draft_k, config.max_verify_rows)
        self.scheduler = Scheduler(session, config.max_waiting)
        self.model = ServedModel(name=model_name, tokenizer=engine.tokenizer,
                                 context=session.max_len,
                                 max_new_tokens_for=session.max_new_tokens_for,
                                 draft_k=session.max_draft_k,
                                 default_max_tokens=config.default_max_tokens)
        self.started = int(time.time())
        super().__init__((config.host, config.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.scheduler.close()

    def metrics_count(self, path: str, status: int) -> None:
        """Count an answered request (unknown paths share one label)."""
        path = path.split("?", 1)[0]
        if path.startswith("/v1/models/"):
            path = "/v1/models"
        self.scheduler.metrics.count_request(path if path in ROUTES else "other", status)

    def metrics_text(self) -> str:
        scheduler = self.scheduler
        session = scheduler.session
        return scheduler.metrics.render({
            "requests_running": ("gauge", "Sequences in the batch now.", scheduler.running),
            "requests_waiting": ("gauge", "Sequences waiting for a batch row.", scheduler.waiting),
            "batch_steps_total": ("counter", "Batched target passes after prefill.", session.steps),
            "batch_rows_total": ("counter", "Rows summed over batched target passes "
                                 "(divided by batch_steps_total: the mean batch size).",
                                 session.row_steps),
            "max_batch_size": ("gauge", "Sequences decoded together at most.",
                               session.max_batch_size),
        })


class ClientGone(Exception):
    """The client closed its connection."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mtpspec"
    server: MTPServer

    # --- routing -------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/metrics":
            self._send(200, self.server.metrics_text().encode(), "text/plain; version=0.0.4")
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.server.model.name}":
            self._send_json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            self._error(APIError(404, f"The model {path[len('/v1/models/'):]!r} does not exist",
                                 param="model", code="model_not_found"))
        elif path in GENERATE_ROUTES:
            self._error(APIError(405, f"{path} takes POST", code="method_not_allowed"))
        else:
            self._error(APIError(404, f"no route {path}", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in GENERATE_ROUTES:
            known = path in ROUTES or path.startswith("/v1/models/")
            self._error(APIError(405 if known else 404, f"no POST route {path}",
                                 code="method_not_allowed" if known else "not_found"))
            return
        try:
            body = openai_api.parse_body(self._read_body())
            request = openai_api.parse_request(body, path.endswith("/chat/completions"),
                                               self.server.model)
            ticket = self.server.scheduler.submit(request.prompt_ids, request.options)
        except APIError as err:
            self._error(err)
            return
        except CacheFullError as err:
            self._error(APIError(400, str(err), code="context_length_exceeded"))
            return
        except ServerBusyError as err:
            self._error(APIError(503, str(err), code="server_busy", kind="server_error"))
            return
        except ValueError as err:
            self._error(APIError(400, str(err)))
            return
        self._checked = time.monotonic()
        try:
            if request.stream:
                self._stream(request, ticket)
            else:
                self._whole(request, ticket)
        except (ClientGone, ConnectionError, socket.timeout):
            self.server.scheduler.cancel(ticket)
            self.close_connection = True

    def _model_card(self) -> dict:
        return {"id": self.server.model.name, "object": "model", "created": self.server.started,
                "owned_by": "mtpspec", "context_length": self.server.model.context,
                "speculative": {"method": self.server.config.spec,
                                "draft_k": self.server.model.draft_k}}

    # --- generation ------------------------------------------------------------------------------

    def _next_event(self, ticket: Ticket):
        """The ticket's next event; raises ClientGone if the client disconnects meanwhile
        (checked every POLL_S seconds, also while events keep arriving)."""
        while True:
            now = time.monotonic()
            if now - self._checked >= POLL_S:
                self._checked = now
                if self._client_gone():
                    raise ClientGone()
            try:
                return ticket.events.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def _client_gone(self) -> bool:
        """True when the peer closed the connection (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _whole(self, request: CompletionRequest, ticket: Ticket) -> None:
        while True:
            event = self._next_event(ticket)
            if isinstance(event, EngineFailure):
                self._error(APIError(500, event.message, kind="server_error", code="engine_error"))
                return
            if isinstance(event, FinishEvent):
                ident = openai_api.new_id(request.chat)
                self._send_json(200, openai_api.completion(request, ident, self.server.model.name,
                                                           event.result))
                return

    def _stream(self, request: CompletionRequest, ticket: Ticket) -> None:
        ident, name = openai_api.new_id(request.chat), self.server.model.name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.server.metrics_count(self.path, 200)
        if request.chat:
            self._event(openai_api.chunk(request, ident, name, None, first=True))
        while True:
            event = self._next_event(ticket)
            if isinstance(event, EngineFailure):
                self._event(APIError(500, event.message, kind="server_error",
                                     code="engine_error").body)
                break
            if isinstance(event, FinishEvent):
                result = event.result
                self._event(openai_api.chunk(request, ident, name, None, result.finish_reason))
                if request.include_usage:
                    self._event(openai_api.usage_chunk(request, ident, name, result))
                break
            if event.text:
                self._event(openai_api.chunk(request, ident, name, event.text))
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _event(self, payload: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (empty: the last one)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # --- plumbing --------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length", code="length_required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise APIError(400, "invalid Content-Length", code="invalid_request") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is left unread
            raise APIError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}",
                           code="request_too_large")
        if length <= 0:
            raise APIError(400, "the request has no body", code="invalid_json")
        return self.rfile.read(length)

    def _error(self, err: APIError) -> None:
        self._send_json(err.status, err.body)

    def _send_json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.server.metrics_count(getattr(self, "path", ""), status)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, unknown method) in OpenAI's shape."""
        self.close_connection = True
        try:
            self._error(APIError(code, message or "bad request", code="bad_request"))
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        if self.server.config.log_requests:
            sys.stderr.write(f"mtpspec: serve: {self.address_string()} {format % args}\n")


def start(engine: Engine, model_name: str, config: ServeConfig) -> MTPServer:
    """Bind (port 0: any free port) and return the server; call ``serve_forever`` on it."""
    return MTPServer(engine, model_name, config)
