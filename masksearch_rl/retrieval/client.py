"""Async client for our retrieval server (or any Search-R1-compatible ``/retrieve`` endpoint).

Why: the agent loop issues many small searches concurrently from one event loop. It needs one shared connection
pool, a cap on in-flight requests, a timeout, bounded retries with backoff for the failures that are worth retrying
(5xx, dropped connections, timeouts — not 4xx, which will fail the same way again) and, when it finally gives up,
an error that says which server failed and why.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from masksearch_rl.loop_local import LoopLocal
from masksearch_rl.records import RetrieveRequest
from masksearch_rl.retrieval.exclusion import SearchExclusion
from masksearch_rl.retrieval.types import Hit, SearchError


class RetryableHTTPError(Exception):
    """A response worth retrying (5xx, 429); kept apart from ``httpx`` errors so the retry policy stays explicit."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


def is_retryable(err: BaseException) -> bool:
    """Connection errors and timeouts (``httpx.TransportError``) and 5xx/429 responses are retried."""
    return isinstance(err, (httpx.TransportError, RetryableHTTPError))


def http_retrying(max_retries: int, backoff_s: float, max_backoff_s: float) -> AsyncRetrying:
    """Bounded retries with jittered exponential backoff, on :func:`is_retryable` errors only (4xx fail at once)."""
    return AsyncRetrying(
        stop=stop_after_attempt(max_retries + 1),
        wait=wait_exponential_jitter(initial=backoff_s, max=max_backoff_s),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )


def describe_error(err: BaseException) -> str:
    """A short cause for messages; ``httpx`` timeouts often have an empty ``str()``."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_secret(env_var: str | None, what: str) -> str | None:
    """Value of the environment variable named ``env_var``; a clear error when it is named but unset."""
    if not env_var:
        return None
    value = os.environ.get(env_var, "")
    if not value:
        raise SearchError(f"{what}: environment variable {env_var} is unset or empty (it must hold the key/token)")
    return value


class RetrievalServerBackend:
    """:class:`~masksearch_rl.retrieval.types.SearchBackend` over HTTP to a ``/retrieve`` endpoint.

    ``url`` is the server's base URL (``http://127.0.0.1:8000``) or the full ``.../retrieve`` URL. Lists longer
    than ``max_queries_per_request`` are split into several requests (the server caps queries per request).
    An exclusion is sent as the request's ``exclude`` field, and applied again to the answer: a Search-R1 server
    ignores the field, and the hidden passage must not come back from one either (fewer hits then).
    """

    name = "server"

    def __init__(
        self,
        url: str,
        token_env: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        concurrency: int = 64,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_queries_per_request: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if max_retries < 0 or concurrency < 1 or max_queries_per_request < 1 or timeout_s <= 0:
            raise ValueError("need max_retries >= 0, concurrency >= 1, max_queries_per_request >= 1, timeout_s > 0")
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.base_url = self.url[: -len("/retrieve")]
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_queries_per_request = max_queries_per_request
        self.stats: Counter = Counter()
        token = read_secret(token_env, f"retrieval server {self.url}")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._transport = transport
        # Connection pools and semaphores belong to one event loop; keep one pair per running loop.
        self._per_loop: LoopLocal[tuple[asyncio.Semaphore, httpx.AsyncClient]] = LoopLocal(self._new_resources)

    def _new_resources(self) -> tuple[asyncio.Semaphore, httpx.AsyncClient]:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            headers=self._headers,
            transport=self._transport,
        )
        return asyncio.Semaphore(self.concurrency), client

    def _resources(self) -> tuple[asyncio.Semaphore, httpx.AsyncClient]:
        return self._per_loop.get()

    async def search(
        self, queries: list[str], topk: int, exclusion: SearchExclusion | None = None
    ) -> list[list[Hit]]:
        queries = list(queries)
        if not queries:
            return []
        step = self.max_queries_per_request
        chunks = [queries[i : i + step] for i in range(0, len(queries), step)]
        if len(chunks) == 1:
            return await self._search_chunk(chunks[0], topk, exclusion)
        parts = await asyncio.gather(*(self._search_chunk(chunk, topk, exclusion) for chunk in chunks))
        return [hits for part in parts for hits in part]

    async def _search_chunk(
        self, queries: list[str], topk: int, exclusion: SearchExclusion | None
    ) -> list[list[Hit]]:
        payload: RetrieveRequest = {"queries": queries, "topk": topk, "return_scores": True}
        if exclusion is not None:
            payload["exclude"] = exclusion.to_json()
        data = await self._post(payload)
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise SearchError(
                f"retrieval server {self.url}: malformed response (expected 'result' with {len(queries)} lists)"
            )
        try:
            results = [[_parse_hit(item) for item in hits] for hits in result]
        except (KeyError, TypeError, ValueError) as err:
            raise SearchError(
                f"retrieval server {self.url}: malformed hit in response ({describe_error(err)})"
            ) from err
        return results if exclusion is None else [exclusion.keep(hits, topk) for hits in results]

    async def _post(self, payload: RetrieveRequest) -> Any:
        semaphore, client = self._resources()
        attempts = self.max_retries + 1
        retrying = http_retrying(self.max_retries, self.backoff_s, self.max_backoff_s)
        try:
            async for attempt in retrying:
                with attempt:
                    async with semaphore:  # held per attempt, not while backing off
                        self.stats["requests"] += 1
                        response = await client.post(self.url, json=payload)
                    if response.status_code >= 500 or response.status_code == 429:
                        self.stats["retryable_errors"] += 1
                        raise RetryableHTTPError(response.status_code, _detail(response))
                    if response.status_code >= 400:
                        raise SearchError(
                            f"retrieval server {self.url} rejected the request: HTTP {response.status_code}: "
                            f"{_detail(response)}"
                        )
                    return response.json()
        except SearchError:
            self.stats["errors"] += 1
            raise
        except (httpx.HTTPError, RetryableHTTPError, ValueError) as err:
            self.stats["errors"] += 1
            raise SearchError(
                f"retrieval server {self.url} failed after {attempts} attempt(s): {describe_error(err)}"
            ) from err
        raise AssertionError("unreachable")  # pragma: no cover

    async def health(self) -> dict[str, Any]:
        """``GET /health`` (no retries: callers use it to poll readiness)."""
        _, client = self._resources()
        try:
            response = await client.get(self.base_url + "/health")
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as err:
            raise SearchError(f"retrieval server {self.base_url}/health: {describe_error(err)}") from err

    async def aclose(self) -> None:
        """Close this loop's connections (other loops' pools are dropped, see :class:`LoopLocal`)."""
        await self._per_loop.aclose(lambda resources: resources[1].aclose())


def _parse_hit(item: Any) -> Hit:
    """A Search-R1 hit: ``{"document": {...}, "score": x}``, or a bare document when the server sent no scores."""
    document = item.get("document", item)
    return Hit(id=str(document["id"]), contents=str(document["contents"]), score=float(item.get("score", 0.0)))


def _detail(response: httpx.Response) -> str:
    """The server's ``detail`` message, or the start of the body."""
    try:
        data = response.json()
        if isinstance(data, dict) and "detail" in data:
            return str(data["detail"])[:500]
    except ValueError:
        pass
    return response.text[:500]
