"""HTTP retrieval server, compatible with Search-R1's ``POST /retrieve`` (and verl's former search tool).

Why a server: the index (BM25 matrices, a FAISS index, a dense encoder) is loaded once and shared by every rollout
worker, data generator and evaluator over HTTP, instead of once per process. Requests from concurrent clients are
merged into batches by :class:`~masksearch_rl.retrieval.batching.MicroBatcher`.

Request: ``{"queries": [str, ...], "topk": int (optional), "return_scores": bool (default false),
"exclude": {"ids": [str, ...], "texts": [str, ...]} (optional, our extension)}``.
Response: ``{"result": [[hit, ...] per query]}`` where, as in Search-R1, a hit is
``{"document": {"id", "contents"}, "score": float}`` when ``return_scores`` is true and the bare document
``{"id", "contents"}`` when it is false.

``exclude`` hides passages from every query of the request (a RAMP item's source passage, so that searching the
masked text does not return the answer); the rule is :class:`~masksearch_rl.retrieval.exclusion.SearchExclusion`'s.
The server retrieves ``topk + len(ids) + a margin`` hits, drops the hidden ones and returns at most ``topk``.
A request without it is answered exactly as before.

Scaling out: ``serve --workers N`` (:func:`serve_workers`) runs N server processes on one port (SO_REUSEPORT: the
kernel spreads connections over them). Each memory-maps the same index files, so the page cache holds one copy;
each warms up before it listens, and the port answers only once all N are ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from masksearch_rl.retrieval.batching import BatcherClosed, MicroBatcher
from masksearch_rl.retrieval.exclusion import ExclusionError, SearchExclusion
from masksearch_rl.retrieval.types import Retriever

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Limits and behaviour of the retrieval server. ``token_env`` is the *name* of the variable holding the token."""

    default_topk: int = 3
    max_topk: int = 50
    max_query_chars: int = 2048
    max_batch: int = 64  # queries per retriever call; also the most queries one request may carry
    max_exclude: int = 32  # the most ids, and the most texts, one request's ``exclude`` may carry
    batch_wait_ms: float = 2.0
    token_env: str | None = None
    index_kind: str | None = None  # shown by /health; taken from ``retriever.kind`` when unset

    def __post_init__(self) -> None:
        for name in ("default_topk", "max_topk", "max_query_chars", "max_batch", "max_exclude"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"ServerConfig.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"ServerConfig.default_topk ({self.default_topk}) exceeds max_topk ({self.max_topk})")


def read_token(token_env: str | None) -> str | None:
    """The bearer token from the environment variable named ``token_env`` (None when auth is off)."""
    if not token_env:
        return None
    token = os.environ.get(token_env, "")
    if not token:
        raise ValueError(f"token_env is {token_env!r} but the environment variable {token_env} is unset or empty")
    return token


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
    An empty query string is allowed (as in Search-R1): an agent's empty ``<search></search>`` gets no hits, not an
    error.
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
    elif not queries:
        errors.append({"field": "queries", "msg": "List should have at least 1 item after validation, not 0",
                       "type": "too_short"})
    elif len(queries) > config.max_batch:
        errors.append({"field": "queries", "type": "too_long", "msg": f"List should have at most {config.max_batch} "
                                                                      f"items after validation, not {len(queries)}"})
    else:
        limit = config.max_query_chars
        for i, query in enumerate(queries):
            if type(query) is not str:
                errors.append({"field": f"queries.{i}", "msg": "Input should be a valid string", "type": "string_type"})
            elif len(query) > limit:
                errors.append({"field": f"queries.{i}", "msg": f"String should have at most {limit} characters",
                               "type": "string_too_long"})
    topk = payload.get("topk")
    if topk is None:
        topk = config.default_topk
    elif isinstance(topk, bool) or not isinstance(topk, (int, float)):
        errors.append({"field": "topk", "msg": "Input should be a valid integer", "type": "int_type"})
    elif isinstance(topk, float) and not (math.isfinite(topk) and topk.is_integer()):
        errors.append({"field": "topk", "msg": "Input should be a valid integer, got a number with a fractional part",
                       "type": "int_from_float"})
    elif topk < 1:
        errors.append({"field": "topk", "msg": "Input should be greater than or equal to 1",
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


def _json(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def create_app(retriever: Retriever, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``retriever``; the micro-batcher starts and drains with the app's lifespan.

    ``/retrieve`` is a plain Starlette route (body parsed with orjson and checked by
    :func:`parse_retrieve_request`, response encoded with orjson): the hot path skips FastAPI's dependency and
    model machinery, which cost more CPU per request than the BM25 search itself.
    """
    config = config or ServerConfig()
    token = read_token(config.token_env)
    expected_auth = f"bearer {token}".encode() if token is not None else None
    batcher = MicroBatcher(retriever.search, max_batch=config.max_batch, wait_ms=config.batch_wait_ms)
    index_kind = config.index_kind or getattr(retriever, "kind", None) or type(retriever).__name__
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # One search before reporting ready: JIT-compiled kernels (bm25s/numba) and the first pages of a
        # memory-mapped index load now, not inside a client's first request (which could time out).
        await asyncio.to_thread(retriever.search, ["warm up"], 1)
        await batcher.start()
        logger.info("retrieval server ready: %d passages, index %s, pid %d", len(retriever), index_kind, os.getpid())
        try:
            yield
        finally:
            await batcher.close()
            logger.info("retrieval server drained: %s", dict(batcher.stats))

    app = FastAPI(title="MaskSearch-RL retrieval server", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.config = config

    def authorized(request: Request) -> bool:
        if expected_auth is None:
            return True
        supplied = request.headers.get("authorization", "").strip().encode()
        scheme, _, value = supplied.partition(b" ")
        return secrets.compare_digest(scheme.lower() + b" " + value.strip(), expected_auth)

    async def retrieve(request: Request) -> Response:
        if not authorized(request):
            return _json(401, {"detail": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
                         headers={"WWW-Authenticate": "Bearer"})
        try:
            parsed = parse_retrieve_request(await request.body(), config)
        except InvalidRequest as err:
            # One readable line per problem; the offending input is not echoed back (a query can be megabytes).
            return _json(422, {"detail": str(err), "errors": err.errors})
        queries, topk, exclusion = parsed.queries, parsed.topk, parsed.exclusion
        try:
            results = await batcher.search(queries, topk if exclusion is None else exclusion.fetch_k(topk))
        except BatcherClosed as err:
            return _json(503, {"detail": str(err)})
        except Exception as err:  # noqa: BLE001 - the caller gets the cause, the server keeps serving
            logger.exception("retrieval failed for %d queries", len(queries))
            return _json(500, {"detail": f"retriever failed: {type(err).__name__}: {err}"})
        if exclusion is not None:
            results = [exclusion.keep(hits, topk) for hits in results]
        if parsed.return_scores:
            payload = [[{"document": {"id": hit.id, "contents": hit.contents}, "score": float(hit.score)}
                        for hit in hits] for hits in results]
        else:
            payload = [[{"id": hit.id, "contents": hit.contents} for hit in hits] for hits in results]
        return Response(orjson.dumps({"result": payload}), media_type="application/json")

    app.add_route("/retrieve", retrieve, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        # Open without a token so load balancers and launch scripts can probe readiness; it reveals no passages.
        return _json(200, {
            "status": "ok",
            "num_passages": len(retriever),
            "index_kind": index_kind,
            "pid": os.getpid(),  # which worker answered, with ``serve --workers N``
            "queue_depth": batcher.queue_depth,
            "in_flight": batcher.in_flight,
            "served": {key: batcher.stats[key] for key in ("requests", "queries", "batches", "errors")},
            "uptime_s": round(time.time() - started, 3),
            "limits": {k: v for k, v in asdict(config).items() if k not in ("token_env", "index_kind")},
        })

    return app


def freeze_loaded_objects() -> None:
    """Exclude everything allocated so far (the loaded index) from the garbage collector's scans.

    Why: a loaded index holds many long-lived Python objects (its vocabulary: ~120k objects at 100k passages, more
    at 1M). Every full collection walks them all while the event loop waits (~50 ms at 100k passages), and under
    load full collections come every few seconds: at 64 clients on 2 cores they stretched p99 latency from ~20 ms
    to 90-230 ms. Objects made later are collected as usual.
    """
    import gc

    gc.collect()
    gc.freeze()


def run_server(retriever: Retriever, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM drain the batcher before exiting)."""
    import uvicorn

    freeze_loaded_objects()
    uvicorn.run(create_app(retriever, config), host=host, port=port, log_level="info", access_log=False)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 20.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``http://host:port``).

    ``port=0`` lets the OS pick a free port, so parallel tests never collide. Used by tests and by tools that
    need a throwaway server in-process; on exit the server shuts down gracefully (the batcher drains).
    """
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
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)


# ------------------------------------------------------------------------------------------------ several workers
_WORKER_STOP_CODES = (0, -signal.SIGTERM, -signal.SIGINT)  # uvicorn re-raises the signal after a graceful exit


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_main(index_dir: str, config: ServerConfig, host: str, port: int, threads: int, number: int,
                 ready: Any, go: Any) -> None:
    """One worker: load and warm up the index, bind the shared port, report ready, wait for the go, serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops workers (SIGTERM), also on Ctrl-C
    os.environ["NUMBA_NUM_THREADS"] = str(threads)  # before numba loads: no pool of all the machine's cores each
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bm25s probes JAX at import: never grab GPU memory per worker
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker{number} %(name)s: %(message)s")
    import uvicorn

    from masksearch_rl.retrieval.index import load_index, read_manifest

    try:
        kind = read_manifest(index_dir)["kind"]
        retriever = load_index(index_dir, **({"n_threads": threads} if kind in ("bm25", "hybrid") else {}))
        retriever.search(["warm up"], 1)  # compile kernels, touch the index pages before taking connections
        app = create_app(retriever, config)
        sock = _reuseport_socket(host, port)
        freeze_loaded_objects()
    except BaseException as err:
        ready.put((number, os.getpid(), f"{type(err).__name__}: {err}"))
        raise
    ready.put((number, os.getpid(), None))
    go.wait()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


def serve_workers(index_dir: str | os.PathLike, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
                  workers: int = 2, threads_per_worker: int | None = None, startup_timeout_s: float = 600.0) -> int:
    """Serve ``index_dir`` from ``workers`` processes on one port until SIGINT/SIGTERM; returns an exit code.

    Why processes: one Python process answers at most a few thousand HTTP requests a second whatever the index
    costs; N processes behind one SO_REUSEPORT port scale that with the cores, while the memory-mapped index
    is shared through the page cache. The supervisor holds the port (bound, not listening) so a clash fails
    fast, starts the workers, lets them listen only once every one is warm, and on a signal stops them all
    (each drains its batcher). A worker that dies takes the others down (exit code 1): restarts are the job
    of whatever runs the server (systemd, Kubernetes, slurm).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise RuntimeError("serving with several workers needs SO_REUSEPORT (Linux)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads_per_worker or max(1, cores // workers)
    holder = _reuseport_socket(host, port)  # reserves the port (and picks one when port is 0)
    port = holder.getsockname()[1]
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    ready, go = context.Queue(), context.Event()
    procs = [
        context.Process(target=_worker_main, name=f"retrieval-worker-{i}", daemon=False,
                        args=(str(index_dir), config, host, port, threads, i, ready, go))
        for i in range(workers)
    ]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for proc in procs:
            proc.start()
        code = _await_ready(procs, ready, stop, startup_timeout_s)
        if code == 0 and not stop.is_set():
            go.set()
            logger.info("%d workers (%d kernel threads each) serving http://%s:%d", workers, threads, host, port)
            while not stop.is_set():
                dead = [proc for proc in procs if proc.exitcode is not None]
                if dead:
                    logger.error("worker %s exited with code %s: stopping the others", dead[0].name, dead[0].exitcode)
                    code = 1
                    break
                multiprocessing.connection.wait([proc.sentinel for proc in procs], timeout=0.5)
    finally:
        _stop_workers(procs)
        holder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0 and any(proc.exitcode not in _WORKER_STOP_CODES for proc in procs):
        code = 1
    logger.info("all %d workers stopped (exit codes %s)", workers, [proc.exitcode for proc in procs])
    return code


def _await_ready(procs: list, ready: Any, stop: threading.Event, timeout_s: float) -> int:
    """0 once every worker reported ready; 1 if one failed, died or the wait timed out (or on a stop signal)."""
    import queue

    pending = {i for i in range(len(procs))}
    deadline = time.monotonic() + timeout_s
    while pending and not stop.is_set():
        try:
            number, pid, error = ready.get(timeout=0.5)
        except queue.Empty:
            dead = [procs[i] for i in pending if procs[i].exitcode is not None]
            if dead:
                logger.error("worker %s exited with code %s while starting", dead[0].name, dead[0].exitcode)
                return 1
            if time.monotonic() > deadline:
                logger.error("workers %s not ready after %.0fs", sorted(pending), timeout_s)
                return 1
            continue
        if error is not None:
            logger.error("worker %d (pid %d) failed to start: %s", number, pid, error)
            return 1
        pending.discard(number)
        logger.info("worker %d (pid %d) ready", number, pid)
    return 0


def _stop_workers(procs: list, timeout_s: float = 30.0) -> None:
    """SIGTERM every live worker (graceful: in-flight requests are answered), then wait; kill stragglers."""
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        if proc.pid is not None:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                logger.warning("worker %s did not stop in %.0fs: killing it", proc.name, timeout_s)
                proc.kill()
                proc.join()
