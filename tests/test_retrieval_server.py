"""The retrieval server (Search-R1 /retrieve over real HTTP on 127.0.0.1), its micro-batcher and its async client."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from masksearch_rl.corpus.passage import format_contents
from masksearch_rl.retrieval.batching import BatcherClosed, MicroBatcher
from masksearch_rl.retrieval.client import RetrievalServerBackend
from masksearch_rl.retrieval.server import ServerConfig, create_app, hit_document, running_server
from masksearch_rl.retrieval.types import Hit, SearchBackend, SearchError

NUM_DOCS = 40


class ToyRetriever:
    """Scores passage i by the query tokens it shares; ``topicN`` finds passage N first. Records every batch."""

    kind = "toy"

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None):
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.docs = [
            Hit(f"doc{i}", format_contents(f"Title {i}", f"text about topic{i} and common words"), 0.0)
            for i in range(NUM_DOCS)
        ]

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.batches.append(len(queries))
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_on and any(self.fail_on in q for q in queries):
                raise RuntimeError(f"cannot search for {self.fail_on!r}")
            results = []
            for query in queries:
                words = set(query.lower().split())
                scored = [
                    Hit(doc.id, doc.contents, float(len(words & set(doc.contents.lower().split()))))
                    for doc in self.docs
                ]
                scored.sort(key=lambda h: (-h.score, int(h.id[3:])))
                results.append(scored[:topk])
            return results
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture(scope="module")
def toy():
    return ToyRetriever()


@pytest.fixture(scope="module")
def server_url(toy):
    with running_server(create_app(toy, ServerConfig(max_topk=50, max_batch=64))) as url:
        yield url


def free_dead_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- request shape
def test_retrieve_with_scores_round_trip(server_url):
    response = httpx.post(
        f"{server_url}/retrieve", json={"queries": ["topic7", "topic12 text"], "topk": 4, "return_scores": True}
    )
    assert response.status_code == 200
    result = response.json()["result"]
    assert len(result) == 2 and [len(hits) for hits in result] == [4, 4]
    first = result[0][0]
    assert set(first) == {"document", "score"}
    assert first["document"] == {"id": "doc7", "title": "Title 7", "text": "text about topic7 and common words",
                                 "contents": '"Title 7"\ntext about topic7 and common words'}
    assert result[1][0]["document"]["id"] == "doc12"
    scores = [hit["score"] for hit in result[0]]
    assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)


def test_retrieve_without_scores_returns_bare_documents_like_search_r1(server_url):
    response = httpx.post(f"{server_url}/retrieve", json={"queries": ["topic3"], "topk": 2})
    assert response.status_code == 200
    hits = response.json()["result"][0]
    assert hits[0] == {"id": "doc3", "title": "Title 3", "text": "text about topic3 and common words",
                       "contents": '"Title 3"\ntext about topic3 and common words'}
    assert all("score" not in hit and "document" not in hit for hit in hits)


@pytest.mark.parametrize("topk", [{}, {"topk": None}, {"topk": 0}])
def test_topk_defaults_when_omitted_null_or_zero_like_search_r1(server_url, topk):
    response = httpx.post(f"{server_url}/retrieve", json={"queries": ["topic1"], "return_scores": True, **topk})
    assert response.status_code == 200
    assert len(response.json()["result"][0]) == ServerConfig().default_topk


def test_empty_query_list_gets_an_empty_result_like_search_r1(server_url):
    response = httpx.post(f"{server_url}/retrieve", json={"queries": [], "topk": 3, "return_scores": True})
    assert response.status_code == 200 and response.json() == {"result": []}


async def test_a_whole_rollout_batch_in_one_request_is_searched_in_bounded_pieces():
    """Search-R1's client posts every query of a rollout step at once (e.g. 512 prompts x 5 = 2,560)."""
    retriever = ToyRetriever()
    with running_server(create_app(retriever, ServerConfig(max_batch=64))) as url:
        queries = [f"topic{i % NUM_DOCS}" for i in range(2560)]
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(f"{url}/retrieve", json={"queries": queries, "topk": 3,
                                                                   "return_scores": True})
    assert response.status_code == 200
    result = response.json()["result"]
    assert [hits[0]["document"]["id"] for hits in result] == [f"doc{i % NUM_DOCS}" for i in range(2560)]
    assert all(len(hits) == 3 for hits in result)
    assert max(retriever.batches) <= 64 and sum(retriever.batches[1:]) == 2560  # [0]: the warm-up search


def test_empty_query_string_is_allowed_like_search_r1(server_url):
    response = httpx.post(f"{server_url}/retrieve", json={"queries": ["", "topic4"], "topk": 2})
    assert response.status_code == 200
    assert [len(hits) for hits in response.json()["result"]] == [2, 2]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"topk": 3}, "queries", "Field required"),
        ({"queries": ["ok", 5]}, "queries.1", "valid string"),
        ({"queries": "topic1"}, "queries", "valid list"),
        ({"queries": ["x"], "topk": -1}, "topk", "greater than or equal to 0"),
        ({"queries": ["x"], "topk": 51}, "topk", "less than or equal to 50"),
        ({"queries": ["x" * 2049]}, "queries.0", "at most 2048 characters"),
        ({"queries": ["x"] * 16385}, "queries", "at most 16384 items"),
        ({"queries": ["x"], "return_scores": "yes"}, "return_scores", "valid boolean"),
        ({"queries": ["x"], "exclude": ["doc1"]}, "exclude", "valid dictionary"),
        ({"queries": ["x"], "exclude": {"ids": "doc1"}}, "exclude.ids", "valid list"),
        ({"queries": ["x"], "exclude": {"ids": ["doc1", 2]}}, "exclude.ids.1", "valid string"),
        ({"queries": ["x"], "exclude": {"texts": [" "]}}, "exclude.texts.0", "at least 1 non-whitespace"),
        ({"queries": ["x"], "exclude": {"text": ["x" * 200]}}, "exclude.text", "Extra inputs are not permitted"),
        ({"queries": ["x"], "exclude": {"ids": ["x"] * 33}}, "exclude.ids", "at most 32 items"),
    ],
)
def test_bad_requests_get_422_naming_field_and_limit(server_url, body, field, message):
    response = httpx.post(f"{server_url}/retrieve", json=body)
    assert response.status_code == 422
    data = response.json()
    assert any(e["field"] == field and message in e["msg"] for e in data["errors"]), data
    assert f"{field}: " in data["detail"] and message in data["detail"]
    assert "x" * 100 not in response.text  # the rejected input is not echoed back


@pytest.fixture(scope="module")
def server_with_duplicate_url():
    """The toy index plus doc 7 again under another id (title changed, text in capitals): an exact duplicate."""
    toy = ToyRetriever()
    toy.docs.append(Hit("dup107", format_contents("Copy", "TEXT ABOUT TOPIC7  AND COMMON WORDS"), 0.0))
    with running_server(create_app(toy, ServerConfig(max_topk=50, max_batch=64))) as url:
        yield url, toy


def test_exclude_hides_the_source_and_its_duplicates_and_keeps_topk(server_with_duplicate_url):
    url, toy = server_with_duplicate_url
    body = {"queries": ["topic7 text", "topic3"], "topk": 4, "return_scores": True}
    plain = httpx.post(f"{url}/retrieve", json=body).json()["result"]
    assert [h["document"]["id"] for h in plain[0][:2]] == ["doc7", "dup107"]  # the source first, then its copy
    exclude = {"ids": ["doc7"], "texts": ["text about topic7 and common words"]}
    hidden = httpx.post(f"{url}/retrieve", json={**body, "exclude": exclude}).json()["result"]
    assert [len(hits) for hits in hidden] == [4, 4]
    assert not {"doc7", "dup107"} & {h["document"]["id"] for hits in hidden for h in hits}  # every query of it
    assert [h["document"]["id"] for h in hidden[0]] == [h.id for h in toy.search(["topic7 text"], 6)[0][2:]]
    # Without the field the answer is the retriever's own top-k, exactly as before the field existed.
    expected = [[{"document": hit_document(h), "score": h.score} for h in hits]
                for hits in toy.search(body["queries"], 4)]
    assert plain == expected


async def test_client_sends_exclusion_and_filters_servers_that_ignore_it(server_with_duplicate_url):
    from masksearch_rl.retrieval.exclusion import SearchExclusion

    exclusion = SearchExclusion(ids=("doc7",), texts=("text about topic7 and common words",))
    backend = RetrievalServerBackend(server_with_duplicate_url[0])
    try:
        hits = (await backend.search(["topic7 text"], 3, exclusion))[0]
    finally:
        await backend.aclose()
    assert len(hits) == 3 and not {"doc7", "dup107"} & {h.id for h in hits}

    ignoring = FastAPI()  # a Search-R1 server: knows nothing of "exclude" and returns the source anyway

    @ignoring.post("/retrieve")
    async def retrieve(request: dict) -> dict:
        assert request["exclude"] == {"ids": ["doc7"], "texts": ["text about topic7 and common words"]}
        return {"result": [[{"document": {"id": "doc7", "contents": "x"}, "score": 2.0},
                            {"document": {"id": "doc9", "contents": "other"}, "score": 1.0}]]}

    with running_server(ignoring) as url:
        backend = RetrievalServerBackend(url)
        try:
            hits = (await backend.search(["topic7"], 2, exclusion))[0]
        finally:
            await backend.aclose()
    assert [h.id for h in hits] == ["doc9"]


def test_health_reports_index_and_counters(server_url):
    httpx.post(f"{server_url}/retrieve", json={"queries": ["topic1", "topic2"]})
    health = httpx.get(f"{server_url}/health").json()
    assert health["status"] == "ok"
    assert health["num_passages"] == NUM_DOCS
    assert health["index_kind"] == "toy"
    assert health["queue_depth"] == 0
    assert health["served"]["requests"] >= 1 and health["served"]["queries"] >= 2
    assert health["limits"]["max_topk"] == 50


# ------------------------------------------------------------------------------------------------------ auth
def test_bearer_token_auth(monkeypatch):
    monkeypatch.setenv("TEST_RETRIEVAL_TOKEN", "s3cret")
    app = create_app(ToyRetriever(), ServerConfig(token_env="TEST_RETRIEVAL_TOKEN"))
    body = {"queries": ["topic1"]}
    with running_server(app) as url:
        missing = httpx.post(f"{url}/retrieve", json=body)
        wrong = httpx.post(f"{url}/retrieve", json=body, headers={"Authorization": "Bearer nope"})
        right = httpx.post(f"{url}/retrieve", json=body, headers={"Authorization": "Bearer s3cret"})
        health = httpx.get(f"{url}/health")
    assert missing.status_code == 401 and "bearer token" in missing.json()["detail"]
    assert wrong.status_code == 401
    assert right.status_code == 200 and right.json()["result"][0][0]["id"] == "doc1"
    assert health.status_code == 200


def test_token_env_naming_an_unset_variable_fails_at_start(monkeypatch):
    monkeypatch.delenv("TEST_RETRIEVAL_TOKEN_UNSET", raising=False)
    with pytest.raises(ValueError, match="TEST_RETRIEVAL_TOKEN_UNSET"):
        create_app(ToyRetriever(), ServerConfig(token_env="TEST_RETRIEVAL_TOKEN_UNSET"))


async def test_client_sends_token(monkeypatch):
    monkeypatch.setenv("TEST_RETRIEVAL_TOKEN", "tok")
    with running_server(create_app(ToyRetriever(), ServerConfig(token_env="TEST_RETRIEVAL_TOKEN"))) as url:
        good = RetrievalServerBackend(url, token_env="TEST_RETRIEVAL_TOKEN")
        monkeypatch.setenv("TEST_RETRIEVAL_TOKEN", "other")
        bad = RetrievalServerBackend(url, token_env="TEST_RETRIEVAL_TOKEN", max_retries=0)
        try:
            assert (await good.search(["topic5"], 1))[0][0].id == "doc5"
            with pytest.raises(SearchError, match="HTTP 401"):
                await bad.search(["topic5"], 1)
        finally:
            await good.aclose()
            await bad.aclose()


# ---------------------------------------------------------------------------------------------- micro-batching
async def test_concurrent_requests_are_batched_and_split_back_correctly():
    retriever = ToyRetriever(delay_s=0.02)
    with running_server(create_app(retriever, ServerConfig(max_batch=16, batch_wait_ms=5))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def one(i: int) -> dict:
                topk = 1 + i % 3  # different topk in one batch: each request still gets its own
                r = await client.post("/retrieve", json={"queries": [f"topic{i}"], "topk": topk, "return_scores": True})
                assert r.status_code == 200
                return {"i": i, "topk": topk, "hits": r.json()["result"][0]}

            answers = await asyncio.gather(*(one(i) for i in range(NUM_DOCS)))
    for answer in answers:
        assert len(answer["hits"]) == answer["topk"]
        assert answer["hits"][0]["document"]["id"] == f"doc{answer['i']}"
    assert max(retriever.batches) > 1, retriever.batches
    assert max(retriever.batches) <= 16
    assert len(retriever.batches) < NUM_DOCS
    assert retriever.max_active == 1  # one batch in flight at a time


async def test_retriever_error_fails_only_the_affected_requests():
    retriever = ToyRetriever(delay_s=0.01, fail_on="boom")
    with running_server(create_app(retriever, ServerConfig(batch_wait_ms=20))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            queries = [f"topic{i}" if i % 4 else f"boom {i}" for i in range(16)]
            responses = await asyncio.gather(*(client.post("/retrieve", json={"queries": [q]}) for q in queries))
            after = await client.post("/retrieve", json={"queries": ["topic9"]})
            health = (await client.get("/health")).json()
    assert max(retriever.batches) > 1  # the failures really shared batches with good requests
    for query, response in zip(queries, responses, strict=True):
        if query.startswith("boom"):
            assert response.status_code == 500
            assert "retriever failed" in response.json()["detail"] and "boom" in response.json()["detail"]
        else:
            assert response.status_code == 200, response.text
            assert response.json()["result"][0][0]["id"] == f"doc{query[5:]}"
    assert after.status_code == 200
    assert health["served"]["errors"] == 4


async def test_batcher_respects_max_batch_and_drains_on_close():
    sizes: list[int] = []

    def slow_search(queries: list[str], topk: int) -> list[list[Hit]]:
        sizes.append(len(queries))
        time.sleep(0.01)
        return [[Hit(q, q, 1.0)] * topk for q in queries]

    batcher = MicroBatcher(slow_search, max_batch=5, wait_ms=50)
    await batcher.start()
    tasks = [asyncio.create_task(batcher.search([f"q{i}a", f"q{i}b"], 2)) for i in range(12)]
    await asyncio.sleep(0)  # let every request reach the queue
    await batcher.close()  # must answer all 12 before returning
    results = [task.result() for task in tasks]
    assert [r[0][0].id for r in results] == [f"q{i}a" for i in range(12)]
    assert all(len(hits) == 2 for r in results for hits in r)
    assert max(sizes) <= 5 and sum(sizes) == 24
    assert batcher.queue_depth == 0
    with pytest.raises(BatcherClosed):
        await batcher.search(["late"], 1)


async def test_a_lone_client_never_waits_for_company_but_a_crowd_is_batched():
    """Adaptive waiting: with a 300 ms allowance, one client alone is answered at once; eight clients that come back
    after each answer are gathered into one batch per round."""
    sizes: list[int] = []

    def search(queries: list[str], topk: int) -> list[list[Hit]]:
        sizes.append(len(queries))
        return [[Hit(q, q, 1.0)] for q in queries]

    batcher = MicroBatcher(search, max_batch=64, wait_ms=300)
    await batcher.start()
    try:
        alone = []
        for i in range(10):
            began = time.perf_counter()
            assert (await batcher.search([f"q{i}"], 1))[0][0].id == f"q{i}"
            alone.append(time.perf_counter() - began)
        assert max(alone) < 0.1, alone  # far below the 300 ms allowance: nobody to wait for
        assert sizes == [1] * 10
        sizes.clear()

        async def client(n: int) -> None:
            for j in range(5):
                assert (await batcher.search([f"c{n}-{j}"], 1))[0][0].id == f"c{n}-{j}"

        await asyncio.gather(*(client(n) for n in range(8)))
        assert sum(sizes) == 40 and len(sizes) <= 10, sizes  # ~one batch of 8 per round, not 40 batches of 1
    finally:
        await batcher.close()


def test_server_shutdown_answers_requests_in_flight():
    retriever = ToyRetriever(delay_s=0.5)
    app = create_app(retriever, ServerConfig(batch_wait_ms=50))
    batcher = app.batcher
    with ThreadPoolExecutor(4) as pool:
        with running_server(app) as url:
            post = functools.partial(httpx.post, f"{url}/retrieve", timeout=30)
            futures = [pool.submit(post, json={"queries": [f"topic{i}"]}) for i in range(4)]
            deadline = time.monotonic() + 20
            while batcher.queue_depth + batcher.in_flight + batcher.stats["queries"] < 4:  # all four arrived
                assert time.monotonic() < deadline, "requests never reached the server"
                time.sleep(0.01)
            assert batcher.queue_depth + batcher.in_flight > 0  # shutdown starts with work still pending
        responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["result"][0][0]["id"] for r in responses] == [f"doc{i}" for i in range(4)]


async def test_many_clients_many_requests_without_errors(server_url, toy):
    """64 concurrent clients send 500 requests in total; every one succeeds with its own right answer."""
    backend = RetrievalServerBackend(server_url, concurrency=64, timeout_s=30)
    next_request = iter(range(500))
    errors: list[BaseException] = []

    async def worker() -> None:
        for i in next_request:
            n = i % NUM_DOCS
            try:
                hits = await backend.search([f"topic{n}", f"topic{(n + 1) % NUM_DOCS}"], 3)
                assert [h[0].id for h in hits] == [f"doc{n}", f"doc{(n + 1) % NUM_DOCS}"]
            except BaseException as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

    start = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(64))), timeout=60)
    finally:
        await backend.aclose()
    elapsed = time.monotonic() - start
    assert errors == []
    assert elapsed < 30, f"500 requests took {elapsed:.1f}s"
    assert backend.stats["requests"] == 500


# ------------------------------------------------------------------------------------------------------ client
def flaky_app(fail_times: int, status: int) -> tuple[FastAPI, list[int]]:
    """A /retrieve that answers ``status`` ``fail_times`` times, then a valid Search-R1 response."""
    calls: list[int] = []
    app = FastAPI()

    @app.post("/retrieve")
    async def retrieve(body: dict) -> JSONResponse:
        calls.append(1)
        if len(calls) <= fail_times:
            return JSONResponse(status_code=status, content={"detail": f"failure {len(calls)}"})
        hits = [[{"document": {"id": f"id-{q}", "contents": f'"T"\n{q}'}, "score": 2.5}] for q in body["queries"]]
        return JSONResponse({"result": hits})

    return app, calls


async def test_client_retries_5xx_then_succeeds():
    app, calls = flaky_app(fail_times=2, status=503)
    with running_server(app) as url:
        backend = RetrievalServerBackend(url, max_retries=3, backoff_s=0.01, max_backoff_s=0.05)
        try:
            hits = await backend.search(["a", "b"], 1)
        finally:
            await backend.aclose()
    assert len(calls) == 3
    assert [h[0].id for h in hits] == ["id-a", "id-b"]
    assert hits[0][0].title == "T" and hits[0][0].score == 2.5


async def test_client_does_not_retry_4xx():
    app, calls = flaky_app(fail_times=10, status=400)
    with running_server(app) as url:
        backend = RetrievalServerBackend(url + "/retrieve", max_retries=3, backoff_s=0.01)
        try:
            with pytest.raises(SearchError, match=r"rejected the request: HTTP 400: failure 1"):
                await backend.search(["a"], 1)
        finally:
            await backend.aclose()
    assert len(calls) == 1


async def test_client_gives_up_after_bounded_retries():
    app, calls = flaky_app(fail_times=10, status=500)
    with running_server(app) as url:
        backend = RetrievalServerBackend(url, max_retries=2, backoff_s=0.01, max_backoff_s=0.02)
        try:
            with pytest.raises(SearchError, match=r"failed after 3 attempt\(s\): RetryableHTTPError: HTTP 500"):
                await backend.search(["a"], 1)
        finally:
            await backend.aclose()
    assert len(calls) == 3


async def test_client_dead_port_raises_search_error_quickly():
    url = f"http://127.0.0.1:{free_dead_port()}"
    backend = RetrievalServerBackend(url, max_retries=2, backoff_s=0.05, max_backoff_s=0.1, timeout_s=2)
    start = time.monotonic()
    try:
        with pytest.raises(SearchError) as info:
            await backend.search(["a"], 1)
    finally:
        await backend.aclose()
    assert time.monotonic() - start < 5
    assert url in str(info.value) and "ConnectError" in str(info.value)


async def test_client_splits_long_query_lists(server_url):
    backend = RetrievalServerBackend(server_url, max_queries_per_request=7)
    try:
        assert isinstance(backend, SearchBackend)
        queries = [f"topic{i % NUM_DOCS}" for i in range(100)]
        hits = await backend.search(queries, 2)
        assert await backend.search([], 2) == []
        health = await backend.health()
    finally:
        await backend.aclose()
    assert [h[0].id for h in hits] == [f"doc{i % NUM_DOCS}" for i in range(100)]
    assert backend.stats["requests"] == 15  # ceil(100 / 7)
    assert health["num_passages"] == NUM_DOCS


# ------------------------------------------------------------------------------------------------- real index
def _index_module():
    return pytest.importorskip("masksearch_rl.retrieval.index", reason="index.py (build_index/load_index) missing")


@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory) -> Path:
    index = _index_module()
    root = tmp_path_factory.mktemp("bm25")
    corpus = root / "corpus.jsonl"
    topics = ["volcano", "penguin", "saxophone", "glacier", "cathedral", "submarine", "orchid", "telescope"]
    import json

    with open(corpus, "w") as handle:
        for i, topic in enumerate(topics):
            text = f"The {topic} is the subject of passage {i}. It has nothing to do with the others."
            handle.write(json.dumps({"id": f"p{i}", "contents": format_contents(topic.title(), text)}) + "\n")
    return Path(index.build_index(corpus, root / "index", kind="bm25"))


async def test_server_over_real_bm25_index(bm25_index):
    index = _index_module()
    retriever = index.load_index(bm25_index)
    with running_server(create_app(retriever, ServerConfig())) as url:
        backend = RetrievalServerBackend(url, timeout_s=120)  # first search may compile numba kernels
        try:
            hits = await backend.search(["penguin", "where is the telescope"], 2)
            health = await backend.health()
        finally:
            await backend.aclose()
    assert hits[0][0].id == "p1" and hits[0][0].title == "Penguin"
    assert hits[1][0].id == "p7"
    assert health["num_passages"] == 8


def test_serve_command_end_to_end(bm25_index, tmp_path):
    """``serve`` in a subprocess: it answers /retrieve, then exits cleanly on SIGINT."""
    port = free_dead_port()
    script = (
        "import typer\n"
        "from masksearch_rl.retrieval import serve_cli\n"
        "app = typer.Typer()\n"
        "app.callback()(lambda: None)\n"
        "serve_cli.register(app)\n"
        "app()\n"
    )
    env = {**os.environ, "TEST_SERVE_TOKEN": "abc"}
    args = [sys.executable, "-c", script, "serve", "--index", str(bm25_index), "--port", str(port)]
    log = tmp_path / "serve.log"  # a file, not a pipe: nobody reads a pipe while we wait, and it could fill up
    with open(log, "w") as handle:
        proc = subprocess.Popen(args + ["--token-env", "TEST_SERVE_TOKEN"], env=env, stderr=handle, stdout=handle)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.1)
        # Generous timeout: a cold numba cache compiles bm25s' kernels on the first search (10-25 s on 2 cores).
        response = httpx.post(
            f"{url}/retrieve", json={"queries": ["glacier"], "topk": 1}, headers={"Authorization": "Bearer abc"},
            timeout=120,
        )
        assert response.json()["result"][0][0]["id"] == "p3"
        assert httpx.get(f"{url}/health").json()["index_kind"] == "bm25"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0, log.read_text()
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"serve did not exit on SIGINT:\n{log.read_text()}") from None


def test_serve_command_rejects_bad_arguments_before_loading(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from masksearch_rl.retrieval import serve_cli

    app = typer.Typer()
    app.callback()(lambda: None)
    serve_cli.register(app)
    monkeypatch.delenv("TEST_SERVE_TOKEN_UNSET", raising=False)
    unset = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--token-env", "TEST_SERVE_TOKEN_UNSET"])
    assert unset.exit_code != 0 and "TEST_SERVE_TOKEN_UNSET" in unset.output
    too_big = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--default-topk", "60"])
    assert too_big.exit_code != 0 and "exceeds max_topk" in too_big.output
    no_index = CliRunner().invoke(app, ["serve", "--index", str(tmp_path)])  # a directory without a manifest
    assert no_index.exit_code != 0 and "--index" in no_index.output


async def test_make_backend_local_loads_index(bm25_index):
    from masksearch_rl.retrieval.web import make_backend

    backend = make_backend({"type": "local", "index_dir": str(bm25_index)})
    try:
        hits = await backend.search(["orchid"], 1)
    finally:
        await backend.aclose()
    assert hits[0][0].id == "p6"


# ------------------------------------------------------------------------------------------- request parsing
def test_malformed_json_and_non_object_bodies_get_422(server_url):
    bad_json = httpx.post(f"{server_url}/retrieve", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["errors"][0]["field"] == "body"
    not_object = httpx.post(f"{server_url}/retrieve", json=["topic1"])
    assert not_object.status_code == 422 and "valid dictionary" in not_object.json()["detail"]
    fractional = httpx.post(f"{server_url}/retrieve", json={"queries": ["x"], "topk": 2.5})
    assert fractional.status_code == 422 and "topk: " in fractional.json()["detail"]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from masksearch_rl.retrieval.server import InvalidRequest, parse_retrieve_request  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 100) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    queries=st.one_of(st.lists(st.text(max_size=14), max_size=6), _json_values),
    topk=st.one_of(st.none(), st.integers(-3, 12), _json_values),
    return_scores=st.one_of(st.booleans(), _json_values),
    drop=st.sets(st.sampled_from(["queries", "topk", "return_scores"])),
)
def test_parse_retrieve_request_accepts_exactly_the_schema(queries, topk, return_scores, drop):
    import json

    config = ServerConfig(max_topk=10, max_query_chars=12, max_queries=5, default_topk=3)
    fields = {"queries": queries, "topk": topk, "return_scores": return_scores}
    body = {k: v for k, v in fields.items() if k not in drop}
    valid = (
        "queries" in body and isinstance(queries, list) and len(queries) <= 5
        and all(isinstance(q, str) and len(q) <= 12 for q in queries)
        and ("topk" not in body or topk is None
             or (not isinstance(topk, bool) and isinstance(topk, (int, float)) and float(topk).is_integer()
                 and 0 <= topk <= 10))
        and ("return_scores" not in body or isinstance(return_scores, bool))
    )
    try:
        parsed = parse_retrieve_request(json.dumps(body).encode(), config)
        parsed_queries, parsed_topk, parsed_scores = parsed.queries, parsed.topk, parsed.return_scores
    except InvalidRequest as err:
        assert not valid, (body, err.errors)
        assert err.errors and all(e["field"] and e["msg"] and e["type"] for e in err.errors)
        assert str(err) == "; ".join(f"{e['field']}: {e['msg']}" for e in err.errors)
        return
    assert valid, body
    assert parsed_queries == queries
    assert parsed_topk == (int(topk) or 3 if body.get("topk") is not None else 3) and isinstance(parsed_topk, int)
    assert parsed_scores is body.get("return_scores", False)
    assert parsed.exclusion is None  # no "exclude" field: nothing hidden, as before the field existed


# ---------------------------------------------------------------------------------------------- several workers
def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"serve did not come up:\n{log.read_text()}"
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))  # a zombie is gone


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="several workers need SO_REUSEPORT")
def test_serve_with_workers_shares_the_port_answers_identically_and_stops_all(bm25_index, tmp_path):
    """``serve --workers 2``: both processes answer on one port with the single-process results; SIGTERM stops all."""
    index = _index_module()
    expected = index.load_index(bm25_index).search(["glacier", "the orchid and the penguin", ""], 3)
    port = free_dead_port()
    script = (
        "import typer\n"
        "from masksearch_rl.retrieval import serve_cli\n"
        "app = typer.Typer()\n"
        "app.callback()(lambda: None)\n"
        "serve_cli.register(app)\n"
        "app()\n"
    )
    args = [sys.executable, "-c", script, "serve", "--index", str(bm25_index), "--port", str(port), "--workers", "2"]
    log = tmp_path / "serve.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(args, stderr=handle, stdout=handle)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        pids = set()
        for _ in range(40):  # a fresh connection each time: the kernel spreads them over the workers
            pids.add(httpx.get(f"{url}/health").json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2 and proc.pid not in pids, pids
        body = {"queries": ["glacier", "the orchid and the penguin", ""], "topk": 3, "return_scores": True}
        for _ in range(6):
            result = httpx.post(f"{url}/retrieve", json=body, timeout=60).json()["result"]
            assert [[(h["document"]["id"], h["document"]["contents"], h["score"]) for h in hits] for hits in result] \
                == [[(h.id, h.contents, h.score) for h in hits] for hits in expected]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"serve --workers did not exit on SIGTERM:\n{log.read_text()}") from None
    assert code == 0, log.read_text()
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_pid_alive(pid) for pid in pids), f"workers {pids} outlived the supervisor"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
