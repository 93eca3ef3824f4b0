"""A small HTTP/1.1 server (asyncio + httptools) for the retrieval service's handful of routes.

Why not uvicorn + Starlette: per request, the ASGI machinery (scope, receive/send coroutines, middleware, routing,
response objects) cost more CPU than a BM25 search, which capped a 2-core server at a few thousand requests a
second; and uvicorn's httptools path has no limit on header size and no deadline for reading a request, so a client
that sends its headers a byte a minute (slowloris) holds its connection forever. Here each connection is one
:class:`asyncio.Protocol` that reads a request under hard limits (:class:`HttpLimits`), calls the route's handler
and writes the answer:

- headers larger than ``max_header_bytes`` -> 431; a body larger than ``max_body_bytes`` -> 413, refused from its
  ``Content-Length`` before it is read; bodies buffered across all connections beyond ``max_buffered_bytes`` -> 503;
- a request not fully read ``request_timeout_s`` after its first byte -> 408 and the connection is closed; a
  keep-alive connection idle for ``idle_timeout_s`` is closed; at most ``max_connections`` are open at once;
- a client that disconnects before its answer is ready costs one log line, and its pending work is cancelled.

One request per connection is handled at a time, so pipelined requests are answered in order. Reading goes on
while a request is answered (so that a client that closes its socket is noticed at once: an end of stream means
the client left, half-closed connections are not kept for their answer); reading pauses only while
``MAX_PIPELINED`` complete requests wait behind it. Handlers are ``async def handler(request: Request) -> Response``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

logger = logging.getLogger(__name__)

MAX_PIPELINED = 16  # complete requests queued behind the one being answered before reading pauses


@dataclass
class HttpLimits:
    """Per-connection and per-server limits; every one of them is what stops a class of abusive or broken client."""

    max_header_bytes: int = 16 * 1024  # request line + headers
    max_body_bytes: int = 16 * 1024 * 1024
    max_buffered_bytes: int = 256 * 1024 * 1024  # request bodies held by all connections together
    request_timeout_s: float = 15.0  # from a request's first byte to its last
    idle_timeout_s: float = 75.0  # keep-alive connection with no request in progress
    max_connections: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_buffered_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"HttpLimits.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HttpLimits.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    client: str


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class HttpApp:
    """Routes plus start-up/shut-down hooks: what :class:`HttpServer` serves."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    async def startup(self) -> None:
        """Called once before the server accepts connections."""

    async def shutdown(self) -> None:
        """Called once after the last request was answered."""


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


_STATUS_LINES = {status: _status_line(status) for status in (200, 400, 401, 404, 405, 408, 413, 422, 431, 500, 503)}
_JSON_HEADERS = b"content-type: application/json\r\n"


def encode_response(response: Response, keep_alive: bool) -> bytes:
    """The bytes of an HTTP/1.1 response (Content-Length framing)."""
    status_line = _STATUS_LINES.get(response.status) or _status_line(response.status)
    parts = [status_line]
    if response.content_type == "application/json":
        parts.append(_JSON_HEADERS)
    else:
        parts.append(f"content-type: {response.content_type}\r\n".encode("latin-1"))
    for name, value in response.headers.items():
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"content-length: %d\r\n\r\n" % len(response.body))
    parts.append(response.body)
    return b"".join(parts)


def _error(status: int, detail: str) -> Response:
    import orjson

    return Response(status, orjson.dumps({"detail": detail}))


class _Connection(asyncio.Protocol):
    """One client connection: read a request under the limits, run its handler, write the answer, repeat."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.limits = server.limits
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = "?"
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None  # the handler of the request being answered
        self.pipelined: deque[tuple[Request, bool]] = deque()  # complete requests waiting for their turn
        self.closing = False
        self._new_request()
        self.reading = False  # a request has begun arriving and is not complete yet

    def _new_request(self) -> None:
        self.header_bytes = 0  # bytes received while the headers were incomplete
        self.parsed_header_bytes = 0  # request line and header fields parsed so far
        self.headers_done = False
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    # ------------------------------------------------------------------------------------------- connection
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        if len(self.server.connections) > self.limits.max_connections:
            logger.warning("refusing %s: %d connections open (max_connections)", self.client,
                           len(self.server.connections))
            self._fail(503, "too many connections")
            return
        self._arm(self.limits.idle_timeout_s, self._idle_timeout)

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self._release_body()
        self._disarm()
        self.pipelined.clear()
        if self.task is not None and not self.task.done():
            logger.info("client %s disconnected before its answer was ready; its request is dropped", self.client)
            self.task.cancel()
        self.transport = None

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle_timeout(self) -> None:
        self.timer = None
        if self.transport is not None and not self.reading and self.task is None:
            self.transport.close()

    def _request_timeout(self) -> None:
        self.timer = None
        if self.reading:
            logger.info("client %s: request not complete %.0fs after its first byte; closing", self.client,
                        self.limits.request_timeout_s)
            self._fail(408, f"request not received within {self.limits.request_timeout_s:g}s")

    def _fail(self, status: int, detail: str) -> None:
        """Answer ``status`` and close: the rest of the connection's input cannot be trusted or is not wanted."""
        self._release_body()
        self.reading = False
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_response(_error(status, detail), keep_alive=False))
            self.transport.close()

    def _release_body(self) -> None:
        self.server.buffered_bytes -= len(self.body)
        self.body = bytearray()

    # ------------------------------------------------------------------------------------------- reading
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.headers_done:
            self.header_bytes += len(data)  # may include the first body bytes of the same packet
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as err:
            if not self.closing:
                self._fail(400, f"malformed HTTP request: {err}")
            return
        if self.reading and not self.headers_done and self.header_bytes > self.limits.max_header_bytes:
            self._fail(431, f"request headers exceed {self.limits.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        self.reading = True
        if self.task is None:  # a pipelined request's clock starts when its turn comes
            self._arm(self.limits.request_timeout_s, self._request_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.parsed_header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        self.parsed_header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.parsed_header_bytes > self.limits.max_header_bytes:  # all of them came in one packet
            self._fail(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
            raise httptools.HttpParserError("headers too large")
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            self._fail(413, f"request body of {int(length)} bytes exceeds {self.limits.max_body_bytes} bytes")
            raise httptools.HttpParserError("body too large")
        if self.headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.limits.max_body_bytes:
            self._fail(413, f"request body exceeds {self.limits.max_body_bytes} bytes")
            raise httptools.HttpParserError("body too large")
        if self.server.buffered_bytes + len(body) > self.limits.max_buffered_bytes:
            self._fail(503, "server busy: too many request bytes buffered; retry later")
            raise httptools.HttpParserError("server buffer full")
        self.body += body
        self.server.buffered_bytes += len(body)

    def on_message_complete(self) -> None:
        self.reading = False
        method = self.parser.get_method().decode("latin-1")
        path = httptools.parse_url(self.url).path.decode("latin-1") if self.url else "/"
        request = Request(method, path, self.headers, bytes(self.body), self.client)
        keep_alive = self.parser.should_keep_alive()
        self._release_body()
        self._new_request()
        if self.task is not None:
            self.pipelined.append((request, keep_alive))
            if len(self.pipelined) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()  # resumed once the queue is answered
            return
        self._disarm()
        # Reading goes on while the handler runs: a closed socket is only noticed by reading it, so pausing here
        # would hide a client that leaves mid-request until its answer is written (no log line, no cancellation).
        self.task = self.loop.create_task(self._answer(request, keep_alive))

    # ------------------------------------------------------------------------------------------- answering
    async def _answer(self, request: Request, keep_alive: bool) -> None:
        while True:
            try:
                response = await self.server.dispatch(request)
            except asyncio.CancelledError:
                return
            transport = self.transport
            if transport is None or transport.is_closing():
                self.task = None
                return
            keep_alive = keep_alive and not self.server.stopping
            transport.write(encode_response(response, keep_alive))
            if not keep_alive:
                self.task = None
                transport.close()
                return
            if not self.pipelined:
                break
            request, keep_alive = self.pipelined.popleft()
        self.task = None
        if self.reading:  # the next request has begun arriving meanwhile
            self._arm(self.limits.request_timeout_s, self._request_timeout)
        else:
            self._arm(self.limits.idle_timeout_s, self._idle_timeout)
        transport.resume_reading()


class HttpServer:
    """Serves an :class:`HttpApp` on a listening socket; :meth:`stop` answers what is in progress, then closes."""

    def __init__(self, app: HttpApp, limits: HttpLimits | None = None):
        self.app = app
        self.limits = limits or HttpLimits()
        self.connections: set[_Connection] = set()
        self.buffered_bytes = 0
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None

    async def dispatch(self, request: Request) -> Response:
        handler = self.app.routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _, path in self.app.routes):
                return _error(405, f"method {request.method} not allowed on {request.path}")
            return _error(404, f"no route {request.path}")
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - one request fails, the server keeps serving
            logger.exception("handler for %s %s failed", request.method, request.path)
            return _error(500, f"internal error: {type(err).__name__}")

    async def start(self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        """Run the app's start-up, then listen (on ``sock`` if given, else on ``host:port``)."""
        self.loop = asyncio.get_running_loop()
        await self.app.startup()
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=4096)
        else:
            self._server = await self.loop.create_server(lambda: _Connection(self), host=host, port=port,
                                                         backlog=4096, reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``grace_s``), close the rest, run shut-down."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):  # idle keep-alive connections: nothing to wait for
            if conn.task is None and not conn.reading and conn.transport is not None:
                conn.transport.close()
        deadline = self.loop.time() + grace_s
        while any(conn.task is not None for conn in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self.app.shutdown()


async def serve_forever(app: HttpApp, stop: asyncio.Event, limits: HttpLimits | None = None,
                        sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0,
                        on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until ``stop`` is set, then stop gracefully."""
    server = HttpServer(app, limits)
    await server.start(sock=sock, host=host, port=port)
    if on_ready is not None:
        on_ready(server.port)
    await stop.wait()
    await server.stop()
