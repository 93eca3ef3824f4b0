"""Web search backends (Serper, SerpAPI, Google Custom Search) behind the same interface as the local index.

Why: MaskSearch builds CoT trajectories and evaluates on open-web QA (FreshQA, Bamboogle) with a real search engine,
while RL rollouts use the local index. Both speak :class:`~masksearch_rl.retrieval.types.SearchBackend`, so switching
is a config change (:func:`make_backend`). Web APIs are slow, metered and rate-limited, so every call here has a
timeout, bounded retries with backoff on 429/5xx/connection errors, a rate limit, a concurrency limit and an on-disk
cache keyed by ``(backend, query, topk)`` — a repeated query costs nothing. API keys are read only from the
environment variable whose *name* the config holds.

Each API is a small object that knows how to build its request and read its response (:class:`SerperApi`,
:class:`SerpApi`, :class:`GoogleCseApi`); :class:`WebSearchBackend` does the shared plumbing around it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any, Protocol

import httpx
from aiolimiter import AsyncLimiter

from masksearch_rl.corpus.passage import format_contents
from masksearch_rl.loop_local import LoopLocal
from masksearch_rl.retrieval.client import (
    RetrievalServerBackend,
    RetryableHTTPError,
    describe_error,
    http_retrying,
    read_secret,
)
from masksearch_rl.retrieval.exclusion import SearchExclusion
from masksearch_rl.retrieval.types import Hit, LocalBackend, SearchBackend, SearchError

logger = logging.getLogger(__name__)


class _RedactKeys(logging.Filter):
    """httpx logs every request URL at INFO; SerpAPI and Google CSE carry the key in it. Mask known keys."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(key in message for key in self.keys):
            for key in self.keys:
                message = message.replace(key, "***")
            record.msg, record.args = message, ()
        return True


_REDACT = _RedactKeys()
logging.getLogger("httpx").addFilter(_REDACT)


# ---------------------------------------------------------------------------------------------------------- APIs
@dataclass
class WebResult:
    title: str
    link: str
    snippet: str


class WebApi(Protocol):
    """How one search API is called and read; no I/O of its own."""

    name: str
    default_url: str
    default_key_env: str

    def request(self, url: str, query: str, num: int, key: str) -> dict[str, Any]:
        """Keyword arguments for ``httpx.AsyncClient.request``."""
        ...

    def parse(self, payload: Any) -> list[WebResult]:
        ...


def _results(payload: Any, list_key: str, api: str) -> list[dict]:
    """The result list under ``list_key``; an API ``error`` field becomes a :class:`SearchError`."""
    if not isinstance(payload, dict):
        raise SearchError(f"{api}: response is not a JSON object")
    items = payload.get(list_key)
    if items is None:
        error = payload.get("error")
        if error and "results" not in str(error).lower():  # "...hasn't returned any results" just means none
            raise SearchError(f"{api}: API error: {str(error)[:300]}")
        return []
    if not isinstance(items, list):
        raise SearchError(f"{api}: '{list_key}' is not a list")
    return [item for item in items if isinstance(item, dict)]


def _web_result(item: dict, link_key: str = "link") -> WebResult | None:
    link = item.get(link_key)
    if not link:
        return None
    return WebResult(title=str(item.get("title") or ""), link=str(link), snippet=str(item.get("snippet") or ""))


class SerperApi:
    """google.serper.dev: POST JSON ``{"q", "num"}`` with header ``X-API-KEY`` → ``organic[{title, link, snippet}]``."""

    name = "serper"
    default_url = "https://google.serper.dev/search"
    default_key_env = "SERPER_API_KEY"

    def request(self, url: str, query: str, num: int, key: str) -> dict[str, Any]:
        return {"method": "POST", "url": url, "json": {"q": query, "num": num}, "headers": {"X-API-KEY": key}}

    def parse(self, payload: Any) -> list[WebResult]:
        return [r for r in map(_web_result, _results(payload, "organic", self.name)) if r]


class SerpApi:
    """serpapi.com: GET ``search.json?q&api_key&engine=google&num`` → ``organic_results[{title, link, snippet}]``."""

    name = "serpapi"
    default_url = "https://serpapi.com/search.json"
    default_key_env = "SERPAPI_API_KEY"

    def request(self, url: str, query: str, num: int, key: str) -> dict[str, Any]:
        return {"method": "GET", "url": url, "params": {"q": query, "api_key": key, "engine": "google", "num": num}}

    def parse(self, payload: Any) -> list[WebResult]:
        return [r for r in map(_web_result, _results(payload, "organic_results", self.name)) if r]


@dataclass
class GoogleCseApi:
    """Google Custom Search JSON API: GET ``customsearch/v1?key&cx&q&num`` (num at most 10) → ``items``.

    ``cx`` (the search engine id) is not secret, but it is per account, so it may also come from ``cx_env``.
    """

    cx: str | None = None
    cx_env: str = "GOOGLE_CSE_CX"
    name = "google_cse"
    default_url = "https://www.googleapis.com/customsearch/v1"
    default_key_env = "GOOGLE_CSE_API_KEY"
    max_num = 10  # the API rejects num > 10; deeper results need paging, which we do not spend quota on

    def __post_init__(self) -> None:
        self.cx = self.cx or os.environ.get(self.cx_env) or None
        if not self.cx:
            raise SearchError(f"google_cse: no search engine id: pass cx or set the environment variable {self.cx_env}")

    def request(self, url: str, query: str, num: int, key: str) -> dict[str, Any]:
        params = {"key": key, "cx": self.cx, "q": query, "num": min(num, self.max_num)}
        return {"method": "GET", "url": url, "params": params}

    def parse(self, payload: Any) -> list[WebResult]:
        return [r for r in map(_web_result, _results(payload, "items", self.name)) if r]


# ------------------------------------------------------------------------------------------------------- backend
@dataclass
class WebSearchConfig:
    """Plumbing settings shared by the web APIs. ``api_key_env`` is the *name* of the variable holding the key."""

    api_key_env: str | None = None  # None: the API's default (SERPER_API_KEY, SERPAPI_API_KEY, GOOGLE_CSE_API_KEY)
    base_url: str | None = None  # None: the public endpoint; tests point this at a local fake
    timeout_s: float = 15.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 20.0
    concurrency: int = 8
    rate_per_s: float = 5.0  # requests per second, averaged over one second
    cache_dir: str | None = None
    cache_ttl_s: float | None = None  # None: cached results never expire

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.concurrency < 1 or self.rate_per_s <= 0:
            raise ValueError("WebSearchConfig needs timeout_s > 0, max_retries >= 0, concurrency >= 1, rate_per_s > 0")


class WebSearchBackend:
    """A :class:`~masksearch_rl.retrieval.types.SearchBackend` over one web search API; one API call per query.

    With an exclusion, each call asks for :meth:`SearchExclusion.fetch_k` results and the hidden ones are dropped
    after the cache (which keeps the API's own answer): pages containing the source passage, and snippets quoting
    at least ``MIN_QUOTE_CHARS`` characters of it (the rule is :meth:`SearchExclusion.excludes`).
    """

    def __init__(self, api: WebApi, config: WebSearchConfig | None = None):
        self.api = api
        self.config = config or WebSearchConfig()
        self.name = api.name
        self.url = self.config.base_url or api.default_url
        self.key_env = self.config.api_key_env or api.default_key_env
        self._key = read_secret(self.key_env, f"{api.name} web search")
        if self._key:
            _REDACT.keys.add(self._key)
        self.stats: Counter = Counter()
        self._cache = None
        if self.config.cache_dir:
            import diskcache

            self._cache = diskcache.Cache(self.config.cache_dir)
        # Semaphores, limiters and connection pools belong to one event loop; keep one set per running loop.
        self._per_loop: LoopLocal[tuple[asyncio.Semaphore, AsyncLimiter, httpx.AsyncClient]] = LoopLocal(
            self._new_resources
        )

    def _new_resources(self) -> tuple[asyncio.Semaphore, AsyncLimiter, httpx.AsyncClient]:
        cfg = self.config
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)),
            limits=httpx.Limits(max_connections=cfg.concurrency),
        )
        limiter = AsyncLimiter(1, 1.0 / cfg.rate_per_s)  # one request per 1/rate s: no burst at start-up
        return asyncio.Semaphore(cfg.concurrency), limiter, client

    def _resources(self) -> tuple[asyncio.Semaphore, AsyncLimiter, httpx.AsyncClient]:
        return self._per_loop.get()

    async def search(
        self, queries: list[str], topk: int, exclusion: SearchExclusion | None = None
    ) -> list[list[Hit]]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        num = topk if exclusion is None else exclusion.fetch_k(topk)
        outcomes = await asyncio.gather(*(self.search_one(q, num) for q in queries), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        results: list[list[Hit]] = list(outcomes)  # type: ignore[arg-type]
        return results if exclusion is None else [exclusion.keep(hits, topk) for hits in results]

    async def search_one(self, query: str, topk: int) -> list[Hit]:
        cache_key = (self.name, query, topk)
        if self._cache is not None:
            cached = self._cache.get(cache_key)
            if cached is not None:
                self.stats["cache_hits"] += 1
                return _to_hits(cached)
        results = (await self._call(query, topk))[:topk]
        records = [{"title": r.title, "link": r.link, "snippet": r.snippet} for r in results]
        if self._cache is not None:
            self._cache.set(cache_key, records, expire=self.config.cache_ttl_s)
        return _to_hits(records)

    async def _call(self, query: str, topk: int) -> list[WebResult]:
        semaphore, limiter, client = self._resources()
        cfg = self.config
        attempts = cfg.max_retries + 1
        retrying = http_retrying(cfg.max_retries, cfg.backoff_s, cfg.max_backoff_s)
        try:
            async for attempt in retrying:
                with attempt:
                    # The slot is released while backing off, so a query waiting to retry holds no slot.
                    async with semaphore, limiter:
                        self.stats["calls"] += 1
                        response = await client.request(**self.api.request(self.url, query, topk, self._key))
                    if response.status_code == 429 or response.status_code >= 500:
                        self.stats["retryable_errors"] += 1
                        raise RetryableHTTPError(response.status_code, self._redact(response.text[:300]))
                    if response.status_code >= 400:
                        hint = f" (check ${self.key_env})" if response.status_code in (401, 403) else ""
                        raise SearchError(
                            f"{self.name} at {self.url}: HTTP {response.status_code}{hint}: "
                            f"{self._redact(response.text[:300])}"
                        )
                    return self.api.parse(response.json())
        except SearchError:
            self.stats["errors"] += 1
            raise
        except (httpx.HTTPError, RetryableHTTPError, ValueError) as err:
            self.stats["errors"] += 1
            raise SearchError(
                f"{self.name} at {self.url} failed after {attempts} attempt(s): {self._redact(describe_error(err))}"
            ) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _redact(self, text: str) -> str:
        """Keys travel in query strings (SerpAPI, Google); never let one reach a log or an exception."""
        return text.replace(self._key, "***") if self._key else text

    async def aclose(self) -> None:
        await self._per_loop.aclose(lambda resources: resources[2].aclose())
        if self._cache is not None:
            self._cache.close()


def _to_hits(records: list[dict]) -> list[Hit]:
    """Rank order → score 1, 1/2, 1/3 …: web APIs give no relevance scores, only an order."""
    return [
        Hit(id=r["link"], contents=format_contents(r["title"], r["snippet"]), score=1.0 / (rank + 1))
        for rank, r in enumerate(records)
    ]


# ------------------------------------------------------------------------------------------------------- factory
WEB_APIS = {"serper": SerperApi, "serpapi": SerpApi, "google_cse": GoogleCseApi}
BACKEND_TYPES = ("local", "server", *WEB_APIS)


def make_backend(config: dict[str, Any] | str, **overrides: Any) -> SearchBackend:
    """Build a search backend from a config dict (``{"type": ..., **options}``) or a bare type name.

    - ``local``: ``index_dir`` (loaded with ``masksearch_rl.retrieval.index.load_index``) or a ready ``retriever``;
      other keys are passed to ``load_index`` as overrides.
    - ``server``: ``url`` plus :class:`~masksearch_rl.retrieval.client.RetrievalServerBackend` options.
    - ``serper`` / ``serpapi`` / ``google_cse``: :class:`WebSearchConfig` fields (``google_cse`` also ``cx``,
      ``cx_env``).

    Unknown keys fail here, at start-up, naming the key.
    """
    options = {"type": config} if isinstance(config, str) else dict(config)
    options.update(overrides)
    kind = options.pop("type", None) or options.pop("name", None)
    if kind not in BACKEND_TYPES:
        raise ValueError(f"search backend type must be one of {list(BACKEND_TYPES)}, got {kind!r}")
    if kind == "local":
        retriever = options.pop("retriever", None)
        if retriever is None:
            if "index_dir" not in options:
                raise ValueError("local search backend needs 'index_dir' (or a 'retriever' object)")
            from masksearch_rl.retrieval.index import load_index

            retriever = load_index(options.pop("index_dir"), **options)
        elif options:
            raise ValueError(f"unknown option(s) for local search backend with a retriever: {sorted(options)}")
        return LocalBackend(retriever)
    if kind == "server":
        if "url" not in options:
            raise ValueError("server search backend needs 'url' (e.g. http://127.0.0.1:8000)")
        try:
            return RetrievalServerBackend(**options)
        except TypeError as err:
            raise ValueError(f"bad option for server search backend: {err}") from err
    api_options = {k: options.pop(k) for k in ("cx", "cx_env") if k in options}
    if api_options and kind != "google_cse":
        raise ValueError(f"option(s) {sorted(api_options)} only apply to google_cse, not {kind}")
    known = {f.name for f in fields(WebSearchConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown option(s) for {kind} search backend: {sorted(unknown)}; known: {sorted(known)}")
    return WebSearchBackend(WEB_APIS[kind](**api_options), WebSearchConfig(**options))
