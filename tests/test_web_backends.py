"""Web search backends against a local fake of each API (real HTTP on 127.0.0.1; no real web calls)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from masksearch_rl.retrieval.client import RetrievalServerBackend
from masksearch_rl.retrieval.server import running_server
from masksearch_rl.retrieval.types import Hit, LocalBackend, SearchBackend, SearchError
from masksearch_rl.retrieval.web import (
    GoogleCseApi,
    SerpApi,
    SerperApi,
    WebSearchBackend,
    WebSearchConfig,
    make_backend,
)

KEY = "test-key-123"
KEY_ENV = "TEST_WEB_SEARCH_KEY"


@dataclass
class FakeState:
    """What the fake API does next and what it saw."""

    fail_with: list[int] = field(default_factory=list)  # statuses to answer, in order, before succeeding
    delay_s: float = 0.0
    body: dict | None = None  # replaces the normal answer
    calls: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


STATE = FakeState()


def _results(query: str, num: int, link_key: str = "link") -> list[dict]:
    return [
        {"title": f"{query} title {i}", link_key: f"https://example.org/{query}/{i}", "snippet": f"about {query} {i}"}
        for i in range(num)
    ]


async def _answer(request: Request, api: str, key: str | None, query: str, num: int, list_key: str) -> JSONResponse:
    state = STATE  # bound at entry: a straggler from an earlier test (timed out client-side) keeps to its own state
    state.calls.append({"api": api, "query": query, "num": num, "params": dict(request.query_params)})
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if key != KEY:
            return JSONResponse(status_code=401, content={"message": "Unauthorized."})
        if state.fail_with:
            status = state.fail_with.pop(0)
            return JSONResponse(status_code=status, content={"error": f"status {status} (key was {key})"})
        if state.body is not None:
            return JSONResponse(state.body)
        return JSONResponse({list_key: _results(query, num), "searchParameters": {"q": query}})
    finally:
        state.in_flight -= 1


def fake_app() -> FastAPI:
    app = FastAPI()

    @app.post("/serper/search")
    async def serper(request: Request) -> JSONResponse:
        body = await request.json()
        return await _answer(request, "serper", request.headers.get("x-api-key"), body["q"], body["num"], "organic")

    @app.get("/serpapi/search.json")
    async def serpapi(request: Request, q: str, api_key: str, engine: str, num: int) -> JSONResponse:
        assert engine == "google"
        return await _answer(request, "serpapi", api_key, q, num, "organic_results")

    @app.get("/cse/customsearch/v1")
    async def cse(request: Request, key: str, cx: str, q: str, num: int) -> JSONResponse:
        if num > 10 or cx != "engine-1":
            return JSONResponse(status_code=400, content={"error": {"message": "Invalid argument"}})
        return await _answer(request, "google_cse", key, q, num, "items")

    return app


PATHS = {"serper": "/serper/search", "serpapi": "/serpapi/search.json", "google_cse": "/cse/customsearch/v1"}


@pytest.fixture(scope="module")
def fake_url():
    with running_server(fake_app()) as url:
        yield url


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    global STATE
    STATE = FakeState()
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("TEST_CSE_CX", "engine-1")


def backend_for(kind: str, fake_url: str, **config) -> WebSearchBackend:
    """A backend of ``kind`` pointed at the fake, with fast retries unless the test says otherwise."""
    options = {"api_key_env": KEY_ENV, "base_url": fake_url + PATHS[kind], "backoff_s": 0.01, "max_backoff_s": 0.02,
               "rate_per_s": 1000.0, "timeout_s": 5.0, **config}
    api = {"serper": SerperApi(), "serpapi": SerpApi(), "google_cse": GoogleCseApi(cx_env="TEST_CSE_CX")}[kind]
    return WebSearchBackend(api, WebSearchConfig(**options))


KINDS = ["serper", "serpapi", "google_cse"]


@pytest.mark.parametrize("kind", KINDS)
async def test_results_parse_to_hits(kind, fake_url):
    backend = backend_for(kind, fake_url)
    try:
        assert isinstance(backend, SearchBackend) and backend.name == kind
        results = await backend.search(["volcano", "penguin"], 3)
    finally:
        await backend.aclose()
    assert [len(hits) for hits in results] == [3, 3]
    first = results[0][0]
    assert first == Hit(id="https://example.org/volcano/0", contents='"volcano title 0"\nabout volcano 0', score=1.0)
    assert first.title == "volcano title 0" and first.text == "about volcano 0"
    assert [h.score for h in results[1]] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert sorted(c["query"] for c in STATE.calls) == ["penguin", "volcano"]
    assert all(c["num"] == 3 for c in STATE.calls)


async def test_google_cse_caps_num_at_ten(fake_url):
    backend = backend_for("google_cse", fake_url)
    try:
        hits = (await backend.search(["orchid"], 25))[0]
    finally:
        await backend.aclose()
    assert len(hits) == 10 and STATE.calls[0]["num"] == 10
    assert STATE.calls[0]["params"]["cx"] == "engine-1"


@pytest.mark.parametrize("kind", KINDS)
def test_missing_key_variable_is_a_clear_error(kind, fake_url, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(SearchError, match=f"{kind}.*environment variable {KEY_ENV} is unset"):
        backend_for(kind, fake_url)


def test_default_key_variable_names(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(SearchError, match="SERPER_API_KEY"):
        WebSearchBackend(SerperApi())
    monkeypatch.delenv("GOOGLE_CSE_CX", raising=False)
    with pytest.raises(SearchError, match="GOOGLE_CSE_CX"):
        GoogleCseApi()


async def test_wrong_key_is_not_retried_and_not_leaked(fake_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong-key-456")
    backend = backend_for("serpapi", fake_url)
    try:
        with pytest.raises(SearchError, match=rf"HTTP 401 \(check \${KEY_ENV}\)") as info:
            await backend.search(["q"], 2)
    finally:
        await backend.aclose()
    assert len(STATE.calls) == 1
    assert "wrong-key-456" not in str(info.value)


async def test_timeout_gives_search_error_after_bounded_retries(fake_url):
    STATE.delay_s = 1.0
    backend = backend_for("serper", fake_url, timeout_s=0.2, max_retries=2)
    start = time.monotonic()
    try:
        with pytest.raises(SearchError, match=r"serper at .* failed after 3 attempt\(s\): ReadTimeout"):
            await backend.search(["slow"], 2)
    finally:
        await backend.aclose()
    assert time.monotonic() - start < 3
    assert len(STATE.calls) == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_5xx_then_success_is_retried(kind, fake_url):
    STATE.fail_with = [500, 503]
    backend = backend_for(kind, fake_url, max_retries=3)
    try:
        hits = (await backend.search(["glacier"], 2))[0]
    finally:
        await backend.aclose()
    assert len(STATE.calls) == 3
    assert hits[0].id == "https://example.org/glacier/0"


async def test_429_is_retried_with_backoff_then_gives_up(fake_url):
    STATE.fail_with = [429]
    backend = backend_for("serpapi", fake_url, max_retries=2)
    try:
        assert len((await backend.search(["a"], 1))[0]) == 1
        assert len(STATE.calls) == 2
        STATE.fail_with = [429, 429, 429, 429]
        with pytest.raises(SearchError, match=r"failed after 3 attempt\(s\).*HTTP 429") as info:
            await backend.search(["b"], 1)
    finally:
        await backend.aclose()
    assert len(STATE.calls) == 5
    assert KEY not in str(info.value) and "***" in str(info.value)  # the fake echoes the key; it is redacted


async def test_cache_hit_makes_no_second_call(fake_url, tmp_path):
    backend = backend_for("serper", fake_url, cache_dir=str(tmp_path / "cache"))
    try:
        first = await backend.search(["saxophone"], 3)
        again = await backend.search(["saxophone"], 3)
        assert again == first and len(STATE.calls) == 1
        assert backend.stats["cache_hits"] == 1
        await backend.search(["saxophone"], 2)  # another topk is another key
        assert len(STATE.calls) == 2
    finally:
        await backend.aclose()
    reopened = backend_for("serper", fake_url, cache_dir=str(tmp_path / "cache"))  # survives a restart
    try:
        assert await reopened.search(["saxophone"], 3) == first
    finally:
        await reopened.aclose()
    assert len(STATE.calls) == 2


async def test_failures_are_not_cached(fake_url, tmp_path):
    STATE.fail_with = [400]
    backend = backend_for("serper", fake_url, cache_dir=str(tmp_path / "cache"))
    try:
        with pytest.raises(SearchError, match="HTTP 400"):
            await backend.search(["x"], 1)
        assert len((await backend.search(["x"], 1))[0]) == 1
    finally:
        await backend.aclose()
    assert len(STATE.calls) == 2


SOURCE = ("Vukadrind is the capital of Dovryvru. It was founded in 1733 and at the last census it had 3,215,168 "
          "inhabitants, most of them in the old town.")
LIST_KEYS = {"serper": "organic", "serpapi": "organic_results", "google_cse": "items"}


@pytest.mark.parametrize("kind", KINDS)
async def test_exclusion_drops_pages_holding_the_source_and_snippets_quoting_it(kind, fake_url):
    from masksearch_rl.retrieval.exclusion import SearchExclusion

    snippets = [
        f"Wikipedia mirror. {SOURCE.upper()} See also: Dovryvru.",  # holds the whole passage (case ignored)
        f"Mar 5, 2021 ... {SOURCE[38:110]} ...",  # quotes 72 characters of it
        "Dovryvru is a country with a long coast and many islands.",
        f"{SOURCE[:30]} ...",  # a quote too short to count: kept
        "Vukadrind hosts a music festival every autumn.",
    ]
    STATE.body = {LIST_KEYS[kind]: [{"title": f"page {i}", "link": f"https://example.org/{i}", "snippet": snippet}
                                    for i, snippet in enumerate(snippets)]}
    exclusion = SearchExclusion(ids=("0",), texts=(SOURCE,))
    backend = backend_for(kind, fake_url)
    try:
        hidden = (await backend.search(["vukadrind founded"], 3, exclusion))[0]
        plain = (await backend.search(["vukadrind founded"], 3))[0]
    finally:
        await backend.aclose()
    assert [h.id for h in hidden] == ["https://example.org/2", "https://example.org/3", "https://example.org/4"]
    assert [h.score for h in hidden] == [pytest.approx(1 / 3), 0.25, 0.2]  # the API's own ranks
    assert [h.id for h in plain] == [f"https://example.org/{i}" for i in range(3)]  # unchanged without it
    assert [c["num"] for c in STATE.calls] == [exclusion.fetch_k(3), 3]  # asked for more to keep topk


async def test_concurrency_limit_is_respected(fake_url):
    STATE.delay_s = 0.1
    backend = backend_for("serper", fake_url, concurrency=3)
    try:
        results = await backend.search([f"q{i}" for i in range(12)], 1)
    finally:
        await backend.aclose()
    assert [hits[0].id for hits in results] == [f"https://example.org/q{i}/0" for i in range(12)]
    assert STATE.max_in_flight == 3


async def test_rate_limit_spaces_calls(fake_url):
    backend = backend_for("serper", fake_url, rate_per_s=20.0, concurrency=10)
    start = time.monotonic()
    try:
        await backend.search([f"r{i}" for i in range(9)], 1)
    finally:
        await backend.aclose()
    assert time.monotonic() - start >= 0.35  # 9 calls at 20/s need ~0.4 s


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": "Google hasn't returned any results for this query."}, []),
        ({"searchParameters": {"q": "x"}}, []),
        ({"organic_results": [{"title": "no link"}, {"title": "T", "link": "https://x", "snippet": "s"}]}, ["https://x"]),
    ],
)
async def test_serpapi_empty_and_partial_answers(fake_url, body, expected):
    STATE.body = body
    backend = backend_for("serpapi", fake_url)
    try:
        hits = (await backend.search(["x"], 5))[0]
    finally:
        await backend.aclose()
    assert [h.id for h in hits] == expected


async def test_api_error_field_is_a_search_error(fake_url):
    STATE.body = {"error": "Your account has run out of searches."}
    backend = backend_for("serpapi", fake_url)
    try:
        with pytest.raises(SearchError, match="serpapi: API error: Your account has run out"):
            await backend.search(["x"], 5)
    finally:
        await backend.aclose()
    assert len(STATE.calls) == 1


# ---------------------------------------------------------------------------------------------------- factory
class OneDocRetriever:
    def __len__(self) -> int:
        return 1

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        return [[Hit("d", f'"T"\n{q}', 1.0)] for q in queries]


async def test_make_backend_builds_each_type(fake_url, tmp_path):
    local = make_backend({"type": "local", "retriever": OneDocRetriever()})
    assert isinstance(local, LocalBackend) and (await local.search(["hi"], 1))[0][0].text == "hi"
    server = make_backend({"type": "server", "url": "http://127.0.0.1:9", "timeout_s": 1})
    assert isinstance(server, RetrievalServerBackend) and server.url == "http://127.0.0.1:9/retrieve"
    await server.aclose()
    for kind in KINDS:
        config = {"type": kind, "api_key_env": KEY_ENV, "base_url": fake_url + PATHS[kind], "rate_per_s": 1000.0}
        if kind == "google_cse":
            config["cx"] = "engine-1"
        backend = make_backend(config, cache_dir=str(tmp_path / kind))
        try:
            assert backend.name == kind
            assert (await backend.search(["made"], 1))[0][0].id == "https://example.org/made/0"
        finally:
            await backend.aclose()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("bing", "must be one of"),
        ({"type": "serper", "api_key_env": KEY_ENV, "timeout": 3}, r"unknown option\(s\) for serper.*'timeout'"),
        ({"type": "serper", "api_key_env": KEY_ENV, "cx": "e"}, "only apply to google_cse"),
        ({"type": "server"}, "needs 'url'"),
        ({"type": "server", "url": "http://x", "retries": 2}, "bad option for server"),
        ({"type": "local"}, "needs 'index_dir'"),
    ],
)
def test_make_backend_rejects_bad_config(config, message):
    with pytest.raises(ValueError, match=message):
        make_backend(config)


async def test_key_in_query_string_is_masked_in_httpx_logs(fake_url, caplog):
    backend = backend_for("serpapi", fake_url)
    try:
        with caplog.at_level("INFO", logger="httpx"):
            await backend.search(["logged"], 1)
    finally:
        await backend.aclose()
    assert STATE.calls[0]["params"]["api_key"] == KEY  # the key did travel in the URL
    messages = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert messages and all(KEY not in m for m in messages) and any("api_key=***" in m for m in messages)
