"""LLMClient against a real HTTP server on 127.0.0.1 (FastAPI + uvicorn in a thread) that misbehaves on request.

The server's behaviour is chosen by the request's ``model`` field: ``ok``, ``always-429``, ``flaky-503`` (fails
twice, then answers), ``slow`` (answers after 3 s), ``bad-request`` (400), ``wait`` (answers after 0.1 s, for the
concurrency check). It counts hits per model and the most ``wait`` requests in flight at once.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from masksearch_rl.llm import LLMClient, LLMConfig, LLMError

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
                if model == "flaky-503" and self.hits[model] <= 2:
                    return JSONResponse({"error": {"message": "overloaded"}}, status_code=503, headers=FAST_RETRY)
                if model == "bad-request":
                    return JSONResponse({"error": {"message": "no such model"}}, status_code=400)
                if model == "slow":
                    await asyncio.sleep(3)
                if model == "wait":
                    await asyncio.sleep(0.1)
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
