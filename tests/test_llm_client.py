"""LLMClient against a real HTTP server on 127.0.0.1 (FastAPI + uvicorn in a thread) that misbehaves on request.

The server's behaviour is chosen by the request's ``model`` field: ``ok``, ``always-429``, ``flaky-503`` (fails
twice, then answers), ``slow`` (answers after 3 s), ``bad-request`` (400), ``wait`` (answers after 0.1 s, for the
concurrency check), ``trickle`` (sends one byte every 0.1 s, forever), ``huge`` / ``huge-stream`` (a 2 MB reply,
with / without a Content-Length), ``null-content``, ``non-utf8``, ``prose``. It counts hits per model and the most
``wait`` requests in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from masksearch_rl.llm import LLMClient, LLMConfig, LLMError, set_endpoint_gate

FAST_RETRY = {"retry-after-ms": "20"}  # the SDK honours it: keeps the retry tests fast


class FakeChatServer:
    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            model = body["model"]
            self.hits[model] = self.hits.get(model, 0) + 1
            self.auth.append(request.headers.get("authorization"))
            counted = model == "wait"  # abandoned "slow" requests may still be sleeping: count only these
            self.in_flight += counted
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if model == "always-429":
                    return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers=FAST_RETRY)
                if model.startswith("flaky-503") and self.hits[model] <= 2:
                    return JSONResponse({"error": {"message": "overloaded"}}, status_code=503, headers=FAST_RETRY)
                if model == "bad-request":
                    return JSONResponse({"error": {"message": "no such model"}}, status_code=400)
                if model == "slow":
                    await asyncio.sleep(3)
                if model == "wait":
                    await asyncio.sleep(0.1)
                if model == "trickle":
                    return StreamingResponse(_trickle(), media_type="application/json")
                if model == "huge":
                    return _completion(model, "x" * 2_000_000)
                if model == "huge-stream":
                    blob = json.dumps(_completion(model, "x" * 2_000_000)).encode()
                    return StreamingResponse(iter([blob[i : i + 65536] for i in range(0, len(blob), 65536)]))
                if model == "null-content":
                    reply = _completion(model, "")
                    reply["choices"][0]["message"]["content"] = None
                    return reply
                if model == "non-utf8":
                    blob = json.dumps(_completion(model, "caf\u00e9")).encode().replace(b"caf", b"caf\xff")
                    return Response(blob, media_type="application/json")
                if model == "prose":
                    return _completion(model, "I think the entities are Paris and 1889.")
                text = "echo: " + body["messages"][-1]["content"]
                return _completion(model, text)
            finally:
                self.in_flight -= counted

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def _trickle():
    while True:  # whitespace is valid JSON padding: a client that times reads only would wait forever
        yield b" "
        await asyncio.sleep(0.1)


def _completion(model: str, text: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.fixture(scope="module")
def server():
    with FakeChatServer() as running:
        yield running


def _client(server: FakeChatServer, model: str, **kw) -> LLMClient:
    return LLMClient(LLMConfig(base_url=server.base_url, model=model, api_key_env="TEST_FAKE_LLM_KEY", **kw))


def _ask(client: LLMClient, content: str = "hello") -> str:
    async def run() -> str:
        try:
            return await client.chat([{"role": "user", "content": content}])
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_answer_and_key_from_env(server, monkeypatch):
    monkeypatch.setenv("TEST_FAKE_LLM_KEY", "sk-test-123")
    assert _ask(_client(server, "ok"), "hi") == "echo: hi"
    assert server.auth[-1] == "Bearer sk-test-123"


def test_cache_hit_makes_no_second_call(server, tmp_path):
    model = "ok-cached"
    first = _client(server, model, cache_dir=str(tmp_path / "cache"))
    assert _ask(first, "same question") == "echo: same question"
    assert _ask(first, "same question") == "echo: same question"
    assert server.hits[model] == 1
    assert first.stats["cache_hits"] == 1 and first.stats["calls"] == 1
    # The cache is on disk: a new client (a new process, in real life) does not call either.
    second = _client(server, model, cache_dir=str(tmp_path / "cache"))
    assert _ask(second, "same question") == "echo: same question"
    assert server.hits[model] == 1
    # A different request is a different key.
    assert _ask(second, "other question") == "echo: other question"
    assert server.hits[model] == 2


def test_429_is_retried_a_bounded_number_of_times(server):
    client = _client(server, "always-429", max_retries=2)
    with pytest.raises(LLMError, match="HTTP 429"):
        _ask(client)
    assert server.hits["always-429"] == 3  # one call + two retries, then give up
    assert client.stats["http_429"] == 3 and client.stats["errors"] == 1


def test_5xx_is_retried_until_success(server):
    client = _client(server, "flaky-503", max_retries=3)
    assert _ask(client, "x") == "echo: x"
    assert server.hits["flaky-503"] == 3
    assert client.stats["http_503"] == 2 and client.stats["http_200"] == 1


def test_client_errors_are_not_retried(server):
    client = _client(server, "bad-request", max_retries=3)
    with pytest.raises(LLMError, match="HTTP 400"):
        _ask(client)
    assert server.hits["bad-request"] == 1


def test_timeout_raises_llm_error(server):
    client = _client(server, "slow", timeout_s=0.3, max_retries=1)
    started = time.monotonic()
    with pytest.raises(LLMError, match="timed out"):
        _ask(client)
    assert time.monotonic() - started < 2.9  # gave up well before the server would have answered
    assert server.hits["slow"] == 2
    assert client.stats["timeouts"] == 1


def test_unreachable_endpoint_raises_llm_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    client = LLMClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, timeout_s=2))
    with pytest.raises(LLMError, match=f"127.0.0.1:{port}"):
        _ask(client)


def test_concurrency_limit_is_respected(server):
    client = _client(server, "wait", concurrency=4)
    server.max_in_flight = 0

    async def run() -> list[str]:
        try:
            return await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}]) for i in range(20)))
        finally:
            await client.aclose()

    started = time.monotonic()
    replies = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert replies == [f"echo: {i}" for i in range(20)]
    assert server.max_in_flight == 4  # saturated, never exceeded
    assert client.stats["max_in_flight"] == 4
    assert elapsed >= 0.5  # 20 calls / 4 at a time * 0.1 s each


def test_client_survives_successive_event_loops(server):
    client = _client(server, "ok")
    for i in range(2):  # each asyncio.run is a new loop: the client makes new per-loop resources
        assert asyncio.run(client.chat([{"role": "user", "content": f"loop {i}"}])) == f"echo: loop {i}"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="concurrency"):
        LLMConfig(concurrency=0)
    with pytest.raises(ValueError, match="unknown LLM config"):
        LLMConfig.from_dict({"modle": "x"})


def test_a_trickling_endpoint_cannot_hold_a_call_past_its_deadline(server):
    client = _client(server, "trickle", timeout_s=0.5, max_retries=1)
    started = time.monotonic()
    with pytest.raises(LLMError, match="timed out: no complete reply within 0.5 s"):
        _ask(client)
    assert time.monotonic() - started < 2.5  # two attempts of 0.5 s, plus one backoff
    assert server.hits["trickle"] == 2 and client.stats["timeouts"] == 1


@pytest.mark.parametrize("model", ["huge", "huge-stream"])
def test_a_reply_over_the_size_cap_is_refused(server, model):
    client = _client(server, model, max_reply_bytes=1_000_000, max_retries=2)
    with pytest.raises(LLMError, match="larger than max_reply_bytes=1,000,000"):
        _ask(client)
    assert server.hits[model] == 1  # not retried: the same request would get the same reply
    assert _ask(_client(server, model, max_reply_bytes=4_000_000)) == "x" * 2_000_000


@pytest.mark.parametrize(("model", "error"), [("null-content", r"without text \(content is null\)"),
                                               ("non-utf8", "not JSON \\(or not UTF-8\\)")])
def test_unusable_replies_raise_and_are_never_cached(server, tmp_path, model, error):
    client = _client(server, model, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):
        with pytest.raises(LLMError, match=error):
            _ask(client)
    assert server.hits[model] == 2 and client.stats["cache_hits"] == 0


def test_the_cache_stores_json_and_never_unpickles(server, tmp_path):
    import pickle

    import diskcache

    cache_dir = tmp_path / "cache"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    client = _client(server, "ok", cache_dir=str(cache_dir))
    key = client.cache_key([{"role": "user", "content": "q"}], {"temperature": 0.0, "max_tokens": 1024})
    with diskcache.Cache(str(cache_dir)) as old:  # a cache written by the old client (or by someone else)
        old.set(key, Payload())
    with sqlite3.connect(cache_dir / "responses.sqlite3") as db:
        db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO cache VALUES (?, ?)", ("other", pickle.dumps(Payload()).hex()))
    assert _ask(client, "q") == "echo: q" and not marker.exists()
    with sqlite3.connect(cache_dir / "responses.sqlite3") as db:
        [(value,)] = db.execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchall()
    assert json.loads(value) == {"text": "echo: q", "finish_reason": "stop", "stop_reason": None}
    assert _ask(_client(server, "ok", cache_dir=str(cache_dir)), "q") == "echo: q"
    assert server.hits["ok"] >= 1 and not marker.exists()


def test_prose_that_the_caller_cannot_use_is_not_cached(server, tmp_path):
    client = _client(server, "prose", cache_dir=str(tmp_path / "cache"))

    async def run() -> str:
        try:
            return await client.chat([{"role": "user", "content": "q"}], accept=lambda text: text.startswith("["))
        finally:
            await client.aclose()

    assert asyncio.run(run()).startswith("I think") and asyncio.run(run()).startswith("I think")
    assert server.hits["prose"] == 2  # asked again: the unusable reply was not stored


def test_every_attempt_passes_the_process_gate_and_the_rate_limit(server):
    events = []

    class Gate:
        async def acquire(self, endpoint):
            events.append(("acquire", endpoint))
            return len(events)

        async def release(self, lease):
            events.append(("release", lease))

    set_endpoint_gate(Gate())
    try:
        client = _client(server, "flaky-503-gated", max_retries=3)
        assert _ask(client, "x") == "echo: x"
    finally:
        set_endpoint_gate(None)
    assert [kind for kind, _ in events] == ["acquire", "release"] * 3  # two 503s and the answer: three requests
    assert events[0][1] == server.base_url and server.hits["flaky-503-gated"] == 3

    client = _client(server, "ok-rated", rate_per_s=10)

    async def run() -> None:
        try:
            await asyncio.gather(*(client.chat([{"role": "user", "content": str(i)}]) for i in range(5)))
        finally:
            await client.aclose()

    started = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - started >= 0.35  # five requests evenly spaced at 10/s
