"""The retrieval server under abusive or broken clients (raw sockets on 127.0.0.1): size limits, slow and idle
clients, clients that leave mid-request, auth on every page that shows the API, the exposure warning, and a worker
killed with SIGKILL under ``serve --workers``."""

from __future__ import annotations

import json
import logging
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
import psutil
import pytest

from masksearch_rl.corpus.passage import format_contents
from masksearch_rl.retrieval.server import ServerConfig, create_app, exposure_warning, running_server
from masksearch_rl.retrieval.types import Hit


class SlowRetriever:
    """passage i mentions ``topicI``; each search sleeps ``delay_s``."""

    kind = "toy"

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.docs = [Hit(f"doc{i}", format_contents(f"T{i}", f"about topic{i}"), 0.0) for i in range(20)]

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        if self.delay_s and queries != ["warm up"]:
            time.sleep(self.delay_s)
        return [[Hit(d.id, d.contents, 1.0) for d in self.docs if d.contents.endswith(q)][:topk] for q in queries]


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def raw_request(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes (or ``timeout``)."""
    with socket.create_connection(host_port(url), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def post_head(length: int, extra: str = "") -> bytes:
    return (f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode()


# ------------------------------------------------------------------------------------------------------ limits
def test_oversized_bodies_are_refused_from_their_length_without_being_buffered():
    config = ServerConfig(max_body_bytes=1024 * 1024)
    app = create_app(SlowRetriever(), config)
    rss_before = psutil.Process().memory_info().rss
    with running_server(app) as url:
        def send_big(_: int) -> int:  # declares 100 MB, then really sends 20 MB of it
            with socket.create_connection(host_port(url), timeout=10) as sock:
                sock.sendall(post_head(100_000_000))
                try:
                    for _ in range(20):
                        sock.sendall(b"x" * 1_000_000)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                try:
                    return status_of(sock.recv(4096))
                except ConnectionResetError:
                    return -1

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(send_big, range(8)))
        ok = httpx.post(f"{url}/retrieve", json={"queries": ["topic3"]})
    assert all(status in (413, -1) for status in statuses) and 413 in statuses, statuses
    assert psutil.Process().memory_info().rss - rss_before < 64 * 2**20
    assert ok.status_code == 200 and ok.json()["result"][0][0]["id"] == "doc3"


def test_chunked_body_over_the_limit_gets_413():
    with running_server(create_app(SlowRetriever(), ServerConfig(max_body_bytes=1000))) as url:
        chunk = b"x" * 800
        head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        answer = raw_request(url, head + (b"320\r\n" + chunk + b"\r\n") * 3 + b"0\r\n\r\n")
    assert status_of(answer) == 413 and b"exceeds 1000 bytes" in answer


def test_oversized_headers_get_431_and_a_body_at_the_limit_is_served():
    with running_server(create_app(SlowRetriever(), ServerConfig(max_header_bytes=4096))) as url:
        huge = raw_request(url, post_head(2, "X-Padding: " + "a" * 8000 + "\r\n") + b"{}")
        endless = raw_request(url, b"GET /health HTTP/1.1\r\nX-Padding: " + b"a" * 20000)  # never finishes a line
        body = json.dumps({"queries": ["topic1"]}).encode()
        fine = raw_request(url, post_head(len(body), "Connection: close\r\n") + body)
    assert status_of(huge) == 431 and status_of(endless) == 431
    assert status_of(fine) == 200 and b"doc1" in fine


# ------------------------------------------------------------------------------------------- slow and idle clients
def test_slowloris_neither_blocks_other_clients_nor_holds_its_sockets():
    config = ServerConfig(request_timeout_s=1.0)
    with running_server(create_app(SlowRetriever(), config)) as url:
        slow = [socket.create_connection(host_port(url), timeout=5) for _ in range(50)]
        stop = threading.Event()

        def trickle() -> None:  # headers one byte at a time, never finished
            for sock in slow:
                sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                for sock in slow:
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        pass
                time.sleep(0.1)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=url, timeout=5) as client:
                latencies = []
                for i in range(20):
                    began = time.perf_counter()
                    response = client.post("/retrieve", json={"queries": [f"topic{i}"]})
                    latencies.append(time.perf_counter() - began)
                    assert response.status_code == 200
            assert max(latencies) < 0.5, latencies
            time.sleep(1.5)  # past the request deadline: the server answered 408 and closed each slow socket
            answers = []
            for sock in slow:
                sock.settimeout(2)
                try:
                    answers.append(sock.recv(4096))
                except OSError:
                    answers.append(b"reset")
        finally:
            stop.set()
            thread.join()
            for sock in slow:
                sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") or a in (b"", b"reset") for a in answers), answers[:3]
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 40


def test_idle_keep_alive_connections_are_closed():
    with running_server(create_app(SlowRetriever(), ServerConfig(idle_timeout_s=0.5))) as url:
        with socket.create_connection(host_port(url), timeout=5) as sock:
            body = json.dumps({"queries": ["topic2"]}).encode()
            sock.sendall(post_head(len(body)) + body)
            first = sock.recv(65536)
            time.sleep(1.0)
            after = sock.recv(65536)  # the server closed the idle connection: end of stream
    assert status_of(first) == 200 and after == b""


def test_client_that_disconnects_mid_request_costs_one_log_line(caplog):
    app = create_app(SlowRetriever(delay_s=0.4), ServerConfig())
    with running_server(app) as url:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            body = json.dumps({"queries": ["topic5"]}).encode()
            with socket.create_connection(host_port(url), timeout=5) as sock:
                sock.sendall(post_head(len(body)) + body)
                time.sleep(0.1)  # the request is being searched
            time.sleep(0.8)
            after = httpx.post(f"{url}/retrieve", json={"queries": ["topic6"]})
    records = [r for r in caplog.records if r.name.startswith("masksearch_rl")
               and r.levelno >= logging.INFO and "disconnect" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert after.status_code == 200


# ------------------------------------------------------------------------------------------------------ auth
def test_token_guards_docs_and_openapi_but_not_health(monkeypatch):
    monkeypatch.setenv("TEST_HARDEN_TOKEN", "s3cret")
    with running_server(create_app(SlowRetriever(), ServerConfig(token_env="TEST_HARDEN_TOKEN"))) as url:
        auth = {"Authorization": "Bearer s3cret"}
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(url + path, headers=auth).status_code == 200
        schema = httpx.get(url + "/openapi.json", headers=auth).json()
        assert "/retrieve" in schema["paths"] and schema["paths"]["/retrieve"]["post"]["security"] == [{"bearer": []}]
        assert httpx.get(url + "/health").status_code == 200
    with running_server(create_app(SlowRetriever(), ServerConfig())) as url:  # no token: open, as before
        assert httpx.get(url + "/openapi.json").status_code == 200 and httpx.get(url + "/docs").status_code == 200


@pytest.mark.parametrize(("host", "token", "warns"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False), ("127.0.0.2", None, False),
    ("0.0.0.0", None, True), ("10.1.2.3", None, True), ("::", None, True), ("myhost.example", None, True),
    ("", None, True), ("0.0.0.0", "TOKEN_VAR", False),
])
def test_exposure_warning(host, token, warns):
    assert (exposure_warning(host, token) is not None) is warns


def test_serve_warns_before_loading_when_exposed_without_token(tmp_path, caplog):
    import typer
    from typer.testing import CliRunner

    from masksearch_rl.retrieval import serve_cli

    app = typer.Typer()
    app.callback()(lambda: None)
    serve_cli.register(app)
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code != 0  # tmp_path is no index: it stops there, after warning, before binding anything
    assert any("WITHOUT a token" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--host", "127.0.0.1"])
    assert not any("WITHOUT a token" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------- a worker killed
@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    from masksearch_rl.retrieval.index import build_index

    root = tmp_path_factory.mktemp("harden-index")
    with open(root / "corpus.jsonl", "w") as handle:
        for i, topic in enumerate(["volcano", "penguin", "glacier", "orchid"]):
            handle.write(json.dumps({"id": f"p{i}", "contents": format_contents(topic, f"the {topic} {i}")}) + "\n")
    return build_index(root / "corpus.jsonl", root / "index", show_progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_pids(url: str, tries: int = 60) -> set[int]:
    pids = set()
    for _ in range(tries):  # a fresh connection each time: the kernel spreads them over the workers
        try:
            pids.add(httpx.get(f"{url}/health", timeout=5).json()["pid"])
        except httpx.TransportError:
            pass
    return pids


def test_killed_worker_is_replaced_and_the_service_keeps_answering(small_index, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    args = [sys.executable, "-m", "masksearch_rl.cli", "serve", "--index", str(small_index), "--port", str(port),
            "--workers", "2"]
    with open(log, "w") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=handle)
    try:
        deadline = time.monotonic() + 120
        while len(pids := _worker_pids(url, 10)) < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        answered, failures = 0, 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # every request on a fresh connection; the survivor answers meanwhile
            try:
                response = httpx.post(f"{url}/retrieve", json={"queries": ["glacier"], "topk": 1}, timeout=10)
                answered += response.status_code == 200 and response.json()["result"][0][0]["id"] == "p2"
            except httpx.TransportError:
                failures += 1
            current = _worker_pids(url, 10)
            if len(current) == 2 and victim not in current:
                break
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()  # the supervisor is still serving
        assert len(current) == 2 and victim not in current, (current, log.read_text())
        assert answered >= 1 and failures <= 2, (answered, failures)
        assert "starting a replacement" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()


# ------------------------------------------------------------------------------------------- empty results
def test_searches_that_find_nothing_show_in_health_and_warn_once(caplog):
    with running_server(create_app(SlowRetriever(), ServerConfig())) as url:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # a rollout whose every query misses the index
                response = httpx.post(f"{url}/retrieve", json={"queries": ["nothing here", "nor here"]})
                assert response.status_code == 200 and response.json()["result"] == [[], []]
            mixed = httpx.post(f"{url}/retrieve", json={"queries": ["topic1", "missing"]}).json()["result"]
        served = httpx.get(f"{url}/health").json()["served"]
    assert [len(hits) for hits in mixed] == [1, 0]
    assert served["empty_results"] == 7 and served["queries"] == 8
    warnings = [r for r in caplog.records if "found no passage" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
