"""HTTP retrieval server, compatible with Search-R1's ``POST /retrieve`` (and verl's former search tool).

Why a server: the index (BM25 matrices, a FAISS index, a dense encoder) is loaded once and shared by every rollout
worker, data generator and evaluator over HTTP, instead of once per process. Requests from concurrent clients are
merged into batches by :class:`~masksearch_rl.retrieval.batching.MicroBatcher`.

Request: ``{"queries": [str, ...], "topk": int (optional), "return_scores": bool (default false)}``.
Response: ``{"result": [[hit, ...] per query]}`` where, as in Search-R1, a hit is
``{"document": {"id", "contents"}, "score": float}`` when ``return_scores`` is true and the bare document
``{"id", "contents"}`` when it is false.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint's annotations at runtime, and the
# request model is built inside create_app (its limits come from the config), so it must be a real object.
import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, StringConstraints

from masksearch_rl.retrieval.batching import BatcherClosed, MicroBatcher
from masksearch_rl.retrieval.types import Hit, Retriever

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Limits and behaviour of the retrieval server. ``token_env`` is the *name* of the variable holding the token."""

    default_topk: int = 3
    max_topk: int = 50
    max_query_chars: int = 2048
    max_batch: int = 64  # queries per retriever call; also the most queries one request may carry
    batch_wait_ms: float = 2.0
    token_env: str | None = None
    index_kind: str | None = None  # shown by /health; taken from ``retriever.kind`` when unset

    def __post_init__(self) -> None:
        for name in ("default_topk", "max_topk", "max_query_chars", "max_batch"):
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


def _request_model(config: ServerConfig) -> type[BaseModel]:
    """The request schema with this server's limits baked in, so pydantic reports the field and the limit."""
    # An empty query is allowed (as in Search-R1): an agent's empty <search></search> gets no hits, not an error.
    query = Annotated[StrictStr, StringConstraints(max_length=config.max_query_chars)]

    class RetrieveRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        queries: list[query] = Field(min_length=1, max_length=config.max_batch)
        topk: int | None = Field(default=None, ge=1, le=config.max_topk)
        return_scores: StrictBool = False

    return RetrieveRequest


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem (``queries.3: String should have at most 2048 characters``).

    The offending input is not echoed back: a rejected query can be megabytes long.
    """
    errors = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        errors.append({"field": ".".join(loc) or "body", "msg": error.get("msg", ""), "type": error.get("type", "")})
    detail = "; ".join(f"{e['field']}: {e['msg']}" for e in errors)
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})


def create_app(retriever: Retriever, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``retriever``; the micro-batcher starts and drains with the app's lifespan."""
    config = config or ServerConfig()
    token = read_token(config.token_env)
    batcher = MicroBatcher(retriever.search, max_batch=config.max_batch, wait_ms=config.batch_wait_ms)
    index_kind = config.index_kind or getattr(retriever, "kind", None) or type(retriever).__name__
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # One search before reporting ready: JIT-compiled kernels (bm25s/numba) and the first pages of a
        # memory-mapped index load now, not inside a client's first request (which could time out).
        await asyncio.to_thread(retriever.search, ["warm up"], 1)
        await batcher.start()
        logger.info("retrieval server ready: %d passages, index %s", len(retriever), index_kind)
        try:
            yield
        finally:
            await batcher.close()
            logger.info("retrieval server drained: %s", dict(batcher.stats))

    app = FastAPI(title="MaskSearch-RL retrieval server", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.state.batcher = batcher
    app.state.config = config
    RetrieveRequest = _request_model(config)

    async def check_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(supplied.strip().encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post("/retrieve", dependencies=[Depends(check_token)])
    async def retrieve(body: RetrieveRequest) -> JSONResponse:  # type: ignore[valid-type]
        topk = body.topk or config.default_topk
        try:
            results = await batcher.search(body.queries, topk)
        except BatcherClosed as err:
            return JSONResponse(status_code=503, content={"detail": str(err)})
        except Exception as err:  # noqa: BLE001 - the caller gets the cause, the server keeps serving
            logger.exception("retrieval failed for %d queries", len(body.queries))
            return JSONResponse(
                status_code=500, content={"detail": f"retriever failed: {type(err).__name__}: {err}"}
            )
        if body.return_scores:
            payload = [[_scored(hit) for hit in hits] for hits in results]
        else:
            payload = [[hit.to_search_r1(return_score=False)["document"] for hit in hits] for hits in results]
        return JSONResponse({"result": payload})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # Open without a token so load balancers and launch scripts can probe readiness; it reveals no passages.
        return {
            "status": "ok",
            "num_passages": len(retriever),
            "index_kind": index_kind,
            "queue_depth": batcher.queue_depth,
            "in_flight": batcher.in_flight,
            "served": {key: batcher.stats[key] for key in ("requests", "queries", "batches", "errors")},
            "uptime_s": round(time.time() - started, 3),
            "limits": {k: v for k, v in asdict(config).items() if k not in ("token_env", "index_kind")},
        }

    return app


def _scored(hit: Hit) -> dict[str, Any]:
    record = hit.to_search_r1(return_score=True)
    record["score"] = float(record["score"])  # numpy floats are not JSON-serialisable
    return record


def run_server(retriever: Retriever, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM drain the batcher before exiting)."""
    import uvicorn

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
