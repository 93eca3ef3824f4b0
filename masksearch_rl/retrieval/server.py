"""HTTP retrieval server, a drop-in for Search-R1's ``POST /retrieve`` (and for verl's former search tool).

Why a server: the index is loaded once and shared by every rollout worker, data generator and evaluator over HTTP,
instead of once per process. Requests from concurrent clients are merged into batches by
:class:`~masksearch_rl.retrieval.batching.MicroBatcher`; HTTP is spoken by :mod:`masksearch_rl.retrieval.http`
(limits on header and body size, deadlines for slow and idle clients).

Request: ``{"queries": [str, ...], "topk": int (optional; 0 or null = the default), "return_scores": bool
(default false), "exclude": {"ids": [str, ...], "texts": [str, ...]} (optional, our extension)}``.
Response: ``{"result": [[hit, ...] per query]}`` where, as in Search-R1, a hit is ``{"document": doc, "score": float}``
when ``return_scores`` is true and the bare ``doc`` when it is false; ``doc`` is ``{"id", "title", "text",
"contents"}`` (title and text split from the ``"Title"\\ntext`` contents). An empty ``queries`` list gets
``{"result": []}``. A request may carry any number of queries up to ``max_queries`` (Search-R1's client sends a
whole rollout batch in one POST); the batcher searches them ``max_batch`` at a time.

``exclude`` hides passages from every query of the request (a RAMP item's source passage, so that searching the
masked text does not return the answer); the rule is :class:`~masksearch_rl.retrieval.exclusion.SearchExclusion`'s.
The server retrieves ``topk + len(ids) + a margin`` hits, drops the hidden ones and returns at most ``topk``.

With a token configured, ``/retrieve``, ``/docs`` and ``/openapi.json`` need ``Authorization: Bearer <token>``;
``/health`` stays open for load balancers (it shows no passages). Several processes on one port: see
:mod:`masksearch_rl.retrieval.workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from masksearch_rl.corpus.passage import split_contents
from masksearch_rl.records import RetrievedDoc, RetrieveResponse, ScoredDoc
from masksearch_rl.retrieval.batching import BatcherClosed, MicroBatcher
from masksearch_rl.retrieval.exclusion import ExclusionError, SearchExclusion
from masksearch_rl.retrieval.http import HttpApp, HttpLimits, HttpServer, Request, Response
from masksearch_rl.retrieval.types import DEFAULT_TOPK, Hit, Retriever

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Limits and behaviour of the retrieval server. ``token_env`` is the *name* of the variable holding the token."""

    default_topk: int = DEFAULT_TOPK
    max_topk: int = 50
    max_query_chars: int = 2048
    max_queries: int = 16384  # per request; Search-R1's client sends a whole rollout batch (e.g. 512 x 5) at once
    max_batch: int = 64  # queries per retriever call; longer requests are searched in pieces of this size
    max_exclude: int = 32  # the most ids, and the most texts, one request's ``exclude`` may carry
    batch_wait_ms: float = 2.0  # longest wait for company, only while company is expected (see batching)
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    request_timeout_s: float = 15.0  # a request must arrive whole this long after its first byte
    idle_timeout_s: float = 75.0  # keep-alive connections idle this long are closed
    token_env: str | None = None
    index_kind: str | None = None  # shown by /health; taken from ``retriever.kind`` when unset

    def __post_init__(self) -> None:
        for name in ("default_topk", "max_topk", "max_query_chars", "max_queries", "max_batch", "max_exclude",
                     "max_body_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms",):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"ServerConfig.default_topk ({self.default_topk}) exceeds max_topk ({self.max_topk})")

    def http_limits(self) -> HttpLimits:
        return HttpLimits(max_header_bytes=self.max_header_bytes, max_body_bytes=self.max_body_bytes,
                          request_timeout_s=self.request_timeout_s, idle_timeout_s=self.idle_timeout_s)


def read_token(token_env: str | None) -> str | None:
    """The bearer token from the environment variable named ``token_env`` (None when auth is off)."""
    if not token_env:
        return None
    token = os.environ.get(token_env, "")
    if not token:
        raise ValueError(f"token_env is {token_env!r} but the environment variable {token_env} is unset or empty")
    return token


def exposure_warning(host: str, token_env: str | None) -> str | None:
    """A warning when ``host`` is reachable from other machines and no token guards the server, else None."""
    if token_env or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"serving on {host or 'all interfaces'}, reachable from other machines, WITHOUT a token: anyone who can "
            f"reach it can read the corpus. Set --token-env (clients send 'Authorization: Bearer <token>') or bind "
            f"127.0.0.1.")


# ------------------------------------------------------------------------------------------- request validation
class InvalidRequest(ValueError):
    """A ``/retrieve`` body that breaks the schema; ``errors`` holds one ``{field, msg, type}`` per problem."""

    def __init__(self, errors: list[dict[str, str]]):
        super().__init__("; ".join(f"{e['field']}: {e['msg']}" for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class RetrieveRequest:
    """A valid ``/retrieve`` body; ``exclusion`` is None when the request hides nothing."""

    queries: list[str]
    topk: int
    return_scores: bool
    exclusion: SearchExclusion | None = None


def parse_retrieve_request(body: bytes, config: ServerConfig) -> RetrieveRequest:
    """The :class:`RetrieveRequest` of a ``/retrieve`` body, or :class:`InvalidRequest` listing every problem.

    Why by hand, not a pydantic model: building a model per request was a large share of the server's CPU per
    request, and the schema is four fields. The messages follow pydantic's wording (field and limit named);
    unknown fields are ignored (inside ``exclude`` they are an error: a misspelt key would silently hide nothing).
    As in Search-R1: an empty query string gets no hits, an empty list an empty result, and a ``topk`` of 0 or null
    the default.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest([{"field": "body", "msg": f"JSON decode error: {err}", "type": "json_invalid"}]) from None
    if not isinstance(payload, dict):
        raise InvalidRequest([{"field": "body", "type": "model_attributes_type",
                               "msg": "Input should be a valid dictionary or object to extract fields from"}])
    errors: list[dict[str, str]] = []
    queries = payload.get("queries")
    if queries is None and "queries" not in payload:
        errors.append({"field": "queries", "msg": "Field required", "type": "missing"})
    elif not isinstance(queries, list):
        errors.append({"field": "queries", "msg": "Input should be a valid list", "type": "list_type"})
    elif len(queries) > config.max_queries:
        errors.append({"field": "queries", "type": "too_long", "msg": f"List should have at most "
                       f"{config.max_queries} items after validation, not {len(queries)}"})
    else:
        limit = config.max_query_chars
        for i, query in enumerate(queries):
            if type(query) is not str:
                errors.append({"field": f"queries.{i}", "msg": "Input should be a valid string", "type": "string_type"})
            elif len(query) > limit:
                errors.append({"field": f"queries.{i}", "msg": f"String should have at most {limit} characters",
                               "type": "string_too_long"})
    topk = payload.get("topk")
    if topk is None or (topk == 0 and not isinstance(topk, bool)):
        topk = config.default_topk
    elif isinstance(topk, bool) or not isinstance(topk, (int, float)):
        errors.append({"field": "topk", "msg": "Input should be a valid integer", "type": "int_type"})
    elif isinstance(topk, float) and not (math.isfinite(topk) and topk.is_integer()):
        errors.append({"field": "topk", "msg": "Input should be a valid integer, got a number with a fractional part",
                       "type": "int_from_float"})
    elif topk < 0:
        errors.append({"field": "topk", "msg": "Input should be greater than or equal to 0",
                       "type": "greater_than_equal"})
    elif topk > config.max_topk:
        errors.append({"field": "topk", "msg": f"Input should be less than or equal to {config.max_topk}",
                       "type": "less_than_equal"})
    return_scores = payload.get("return_scores", False)
    if type(return_scores) is not bool:
        errors.append({"field": "return_scores", "msg": "Input should be a valid boolean", "type": "bool_type"})
    exclusion = None
    try:
        exclusion = SearchExclusion.from_json(payload.get("exclude"))
    except ExclusionError as err:
        errors.append({"field": err.path, "msg": err.msg, "type": err.type})
    for key in ("ids", "texts") if exclusion is not None else ():
        count = len(getattr(exclusion, key))
        if count > config.max_exclude:
            errors.append({"field": f"exclude.{key}", "type": "too_long", "msg": f"List should have at most "
                           f"{config.max_exclude} items after validation, not {count}"})
    if errors:
        raise InvalidRequest(errors)
    return RetrieveRequest(queries, int(topk), return_scores, exclusion)


def hit_document(hit: Hit) -> RetrievedDoc:
    """A hit as Search-R1's server returns it: id, title and text split from contents, and contents itself."""
    title, text = split_contents(hit.contents)
    return {"id": hit.id, "title": title, "text": text, "contents": hit.contents}


def _json(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps(content), headers=headers or {})


# ------------------------------------------------------------------------------------------------------- app
class RetrievalApp(HttpApp):
    """The routes of the retrieval server over one retriever; the batcher starts and drains with the app."""

    def __init__(self, retriever: Retriever, config: ServerConfig | None = None):
        super().__init__()
        self.retriever = retriever
        self.config = config = config or ServerConfig()
        token = read_token(config.token_env)
        self._expected_auth = f"bearer {token}".encode() if token is not None else None
        self.batcher = MicroBatcher(retriever.search, max_batch=config.max_batch, wait_ms=config.batch_wait_ms)
        self.index_kind = config.index_kind or getattr(retriever, "kind", None) or type(retriever).__name__
        self.started = time.time()
        self.empty_results = 0  # queries answered with no hit at all (shown by /health)
        self._empty_warned_at = -math.inf
        self.route("POST", "/retrieve", self.retrieve)
        self.route("GET", "/health", self.health)
        self.route("GET", "/openapi.json", self.openapi)
        self.route("GET", "/docs", self.docs)

    async def startup(self) -> None:
        # One search before reporting ready: JIT-compiled kernels and the first pages of a memory-mapped index
        # load now, not inside a client's first request (which could time out).
        await asyncio.to_thread(self.retriever.search, ["warm up"], 1)
        await self.batcher.start()
        logger.info("retrieval server ready: %d passages, index %s, pid %d", len(self.retriever), self.index_kind,
                    os.getpid())

    async def shutdown(self) -> None:
        await self.batcher.close()
        logger.info("retrieval server drained: %s", dict(self.batcher.stats))

    def authorized(self, request: Request) -> bool:
        if self._expected_auth is None:
            return True
        supplied = request.headers.get("authorization", "").strip().encode()
        scheme, _, value = supplied.partition(b" ")
        return secrets.compare_digest(scheme.lower() + b" " + value.strip(), self._expected_auth)

    @staticmethod
    def unauthorized() -> Response:
        return _json(401, {"detail": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
                     headers={"www-authenticate": "Bearer"})

    async def retrieve(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        try:
            parsed = parse_retrieve_request(request.body, self.config)
        except InvalidRequest as err:
            # One readable line per problem; the offending input is not echoed back (a query can be megabytes).
            return _json(422, {"detail": str(err), "errors": err.errors})
        queries, topk, exclusion = parsed.queries, parsed.topk, parsed.exclusion
        try:
            results = await self.batcher.search(queries, topk if exclusion is None else exclusion.fetch_k(topk))
        except BatcherClosed as err:
            return _json(503, {"detail": str(err)})
        except Exception as err:  # noqa: BLE001 - the caller gets the cause, the server keeps serving
            logger.error("retrieval failed for %d queries: %s: %s", len(queries), type(err).__name__, err)
            return _json(500, {"detail": f"retriever failed: {type(err).__name__}: {err}"})
        if exclusion is not None:
            results = [exclusion.keep(hits, topk) for hits in results]
        self._count_empty(queries, results)
        payload: list[list[ScoredDoc | RetrievedDoc]]
        if parsed.return_scores:
            payload = [[ScoredDoc(document=hit_document(hit), score=float(hit.score)) for hit in hits]
                       for hits in results]
        else:
            payload = [[hit_document(hit) for hit in hits] for hits in results]
        response: RetrieveResponse = {"result": payload}
        return Response(200, orjson.dumps(response))

    def _count_empty(self, queries: list[str], results: list[list[Hit]]) -> None:
        """Count queries that found nothing; a request whose every (non-blank) query found nothing is logged as a
        warning, at most once a minute: an index that does not match its traffic must not pass as a flat reward."""
        empty = sum(1 for hits in results if not hits)
        if not empty:
            return
        self.empty_results += empty
        asked = sum(1 for query in queries if query.strip())
        now = time.monotonic()
        if asked and empty == len(results) and now - self._empty_warned_at >= 60.0:
            self._empty_warned_at = now
            logger.warning("a request's %d queries all found no passage (%d queries without hits so far, of %d "
                           "served); is the index the one its clients expect?", len(queries), self.empty_results,
                           self.batcher.stats["queries"])

    async def health(self, request: Request) -> Response:
        # Open without a token so load balancers and launch scripts can probe readiness; it reveals no passages.
        batcher = self.batcher
        return _json(200, {
            "status": "ok",
            "num_passages": len(self.retriever),
            "index_kind": self.index_kind,
            "pid": os.getpid(),  # which worker answered, with several workers
            "queue_depth": batcher.queue_depth,
            "in_flight": batcher.in_flight,
            "served": {**{key: batcher.stats[key] for key in ("requests", "queries", "batches", "errors")},
                       "empty_results": self.empty_results},
            "uptime_s": round(time.time() - self.started, 3),
            "limits": {k: v for k, v in asdict(self.config).items() if k not in ("token_env", "index_kind")},
        })

    async def openapi(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        return _json(200, openapi_schema(self.config))

    async def docs(self, request: Request) -> Response:
        if not self.authorized(request):
            return self.unauthorized()
        html = (f"<!doctype html><html><head><title>MaskSearch-RL retrieval server</title></head><body>"
                f"<h1>MaskSearch-RL retrieval server</h1><p>POST /retrieve, GET /health. "
                f"Schema: <a href=\"/openapi.json\">/openapi.json</a>.</p><pre>{__doc__}</pre></body></html>")
        return Response(200, html.encode(), content_type="text/html; charset=utf-8")


def openapi_schema(config: ServerConfig) -> dict[str, Any]:
    """The OpenAPI document of ``/retrieve`` and ``/health``, with this server's limits."""
    doc = {"type": "object", "properties": {k: {"type": "string"} for k in ("id", "title", "text", "contents")}}
    request = {
        "type": "object", "required": ["queries"],
        "properties": {
            "queries": {"type": "array", "maxItems": config.max_queries,
                        "items": {"type": "string", "maxLength": config.max_query_chars}},
            "topk": {"type": ["integer", "null"], "minimum": 0, "maximum": config.max_topk,
                     "description": f"0 or null: {config.default_topk}"},
            "return_scores": {"type": "boolean", "default": False},
            "exclude": {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "string"}},
                                                         "texts": {"type": "array", "items": {"type": "string"}}}},
        },
    }
    hit = {"oneOf": [doc, {"type": "object", "properties": {"document": doc, "score": {"type": "number"}}}]}
    response = {"type": "object", "properties": {"result": {"type": "array", "items": {"type": "array",
                                                                                       "items": hit}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "MaskSearch-RL retrieval server", "version": "1"},
        "paths": {
            "/retrieve": {"post": {
                "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                "responses": {"200": {"description": "hits per query",
                                      "content": {"application/json": {"schema": response}}},
                              "401": {"description": "token missing or wrong"},
                              "413": {"description": "body too large"},
                              "422": {"description": "invalid request"}},
                "security": [{"bearer": []}] if config.token_env else [],
            }},
            "/health": {"get": {"responses": {"200": {"description": "status, counters and limits"}}}},
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def create_app(retriever: Retriever, config: ServerConfig | None = None) -> RetrievalApp:
    """The retrieval app serving ``retriever``; run it with :func:`run_server` or :func:`running_server`."""
    return RetrievalApp(retriever, config)


def freeze_loaded_objects() -> None:
    """Exclude everything allocated so far (the loaded index) from the garbage collector's scans.

    Why: a loaded index holds many long-lived Python objects (its vocabulary). Every full collection walks them all
    while the event loop waits (~50 ms at 100k passages), and under load full collections come every few seconds:
    at 64 clients on 2 cores they stretched p99 latency from ~20 ms to 90-230 ms. Objects made later are collected
    as usual.
    """
    import gc

    gc.collect()
    gc.freeze()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (cheaper per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve_app(app: RetrievalApp, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 8000,
              on_ready=None, stop_signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Serve ``app`` in this thread until one of ``stop_signals``, then answer what is in progress and return."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop.set)
    server = HttpServer(app, app.config.http_limits())

    async def main() -> None:
        await server.start(sock=sock, host=host, port=port)
        if on_ready is not None:
            on_ready(server.port)
        await stop.wait()
        await server.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def run_server(retriever: Retriever, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in this process until interrupted (Ctrl-C / SIGTERM drain the batcher before exiting)."""
    freeze_loaded_objects()
    serve_app(create_app(retriever, config), host=host, port=port,
              on_ready=lambda bound: logger.info("serving http://%s:%d", host, bound))


@contextlib.contextmanager
def running_server(app: RetrievalApp, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` in a background thread; yields its base URL (``http://host:port``).

    ``port=0`` lets the OS pick a free port, so parallel tests never collide. Used by tests and by tools that
    need a throwaway server in-process; on exit the server shuts down gracefully (the batcher drains). Any other
    ASGI app (a test's stand-in server written with FastAPI) runs under uvicorn.
    """
    if not isinstance(app, HttpApp):
        with _running_asgi(app, host, port, timeout_s) as url:
            yield url
        return
    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        loop = new_event_loop()
        state["loop"] = loop
        server = HttpServer(app, getattr(app, "config", ServerConfig()).http_limits())
        stop = asyncio.Event()
        state["stop"] = stop

        async def main() -> None:
            try:
                await server.start(host=host, port=port)
            except BaseException as err:
                state["error"] = err
                ready.set()
                raise
            state["port"] = server.port
            ready.set()
            await stop.wait()
            await server.stop()

        try:
            loop.run_until_complete(main())
        except BaseException:  # noqa: BLE001 - reported to the caller through state["error"]
            pass
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"retrieval-server-{host}:{port}", daemon=True)
    thread.start()
    if not ready.wait(timeout_s) or "error" in state:
        raise RuntimeError(f"retrieval server did not start on {host}:{port}: {state.get('error')!r}")
    try:
        yield f"http://{host}:{state['port']}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout_s)


@contextlib.contextmanager
def _running_asgi(app: Any, host: str, port: int, timeout_s: float) -> Iterator[str]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout_s:.0f}s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


def serve_workers(*args: Any, **kwargs: Any) -> int:
    """Several server processes on one port; see :func:`masksearch_rl.retrieval.workers.serve_workers`."""
    from masksearch_rl.retrieval.workers import serve_workers as serve

    return serve(*args, **kwargs)
