"""Drop-in contract: what Search-R1's client and verl's former search tool send to ``POST /retrieve`` and read back
from it, replayed against our retrieval server over HTTP on 127.0.0.1.

The clients are not imported (neither project is a dependency) and their code is not copied: the helpers below are
our own, written from reading upstream, and send the same request (same library, ``requests``, so the same bytes on
the wire) and read the answer through the same keys and the same string handling:

- Search-R1 (github.com/PeterGriffinJin/Search-R1 @ a14dc3a, ``search_r1/llm_agent/generation.py``,
  ``LLMGenerationManager.batch_search`` / ``_batch_search`` / ``_passages2string``): one POST holding every active
  rollout's query, ``{"queries", "topk": config.topk, "return_scores": true}``, then ``response.json()["result"]``
  (a 422 body has no ``result``: the trainer dies on a KeyError) and, per hit, ``hit["document"]["contents"]`` cut
  at its first newline into title and text, rendered ``Doc {n}(Title: {title}) {text}\\n``. (Upstream sets no
  timeout; ours does.)
- verl (github.com/volcengine/verl @ df4bbfc, ``verl/tools/utils/search_r1_like_utils.py``, removed in 0.8.0):
  ``call_search_api`` posts the same payload with JSON ``Content-Type``/``Accept`` headers and a 30 s timeout,
  retries 500/502/503/504 and raises on any other 4xx/5xx; ``perform_single_search_batch`` reads
  ``.get("result", [])``, renders each query's hits ``Doc {n} (Title: {title})\\n{text}`` separated by blank lines
  (stripped), joins the queries with ``\\n---\\n`` and counts ``len(hits)`` per query; an empty ``result`` is
  "no_results".
"""

from __future__ import annotations

import json
import threading

import pytest
import requests

from masksearch_rl.corpus.passage import format_contents
from masksearch_rl.retrieval.server import ServerConfig, create_app, running_server
from masksearch_rl.retrieval.types import Hit


class TitledRetriever:
    """passage i is ``"Title i"\\ntext about topici``; ``topicN`` finds passage N first; ``nothing`` finds none."""

    kind = "toy"

    def __init__(self) -> None:
        self.docs = [Hit(f"{i}", format_contents(f"Title {i}", f"text about topic{i} and more"), 0.0)
                     for i in range(50)]
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        with self.lock:
            self.batches.append(len(queries))
        results = []
        for query in queries:
            words = set(query.split())
            scored = [Hit(d.id, d.contents, float(len(words & set(d.contents.split())))) for d in self.docs]
            scored = [h for h in scored if h.score > 0]
            scored.sort(key=lambda h: (-h.score, int(h.id)))
            results.append(scored[:topk])
        return results


@pytest.fixture(scope="module")
def server():
    retriever = TitledRetriever()
    with running_server(create_app(retriever, ServerConfig())) as url:
        yield url + "/retrieve", retriever


def split_title(contents: str) -> tuple[str, str]:
    """Both clients: the first line of ``contents`` is the title (its quotes kept), the other lines the text."""
    title, _, text = contents.partition("\n")
    return title, text


# ------------------------------------------------------------------------------------------ Search-R1's client
def searchr1_batch_search(search_url: str, topk: int, queries: list[str]) -> list[str]:
    """Search-R1's request and its reading of the answer: one rendered string per query."""
    answer = requests.post(search_url, json={"queries": queries, "topk": topk, "return_scores": True},
                           timeout=60).json()
    rendered = []
    for hits in answer["result"]:  # a KeyError on an error body, as upstream
        docs = [split_title(hit["document"]["contents"]) for hit in hits]
        rendered.append("".join(f"Doc {n}(Title: {title}) {text}\n" for n, (title, text) in enumerate(docs, 1)))
    return rendered


def test_searchr1_client_whole_rollout_batch_in_one_post(server):
    """Search-R1's trainer posts every active rollout's query at once: 512 prompts x 5 responses."""
    url, retriever = server
    queries = [f"topic{i % 50}" for i in range(2560)]
    texts = searchr1_batch_search(url, 3, queries)
    assert len(texts) == 2560
    assert texts[7].startswith('Doc 1(Title: "Title 7") text about topic7 and more\n')
    assert max(retriever.batches) <= ServerConfig().max_batch  # searched in bounded pieces


def test_searchr1_client_edge_cases(server):
    url, _ = server
    assert searchr1_batch_search(url, 3, []) == []  # no active rollout searched this turn
    assert searchr1_batch_search(url, 0, ["text topic3"])[0].count("Doc ") == 3  # topk 0: the server's default
    assert searchr1_batch_search(url, 3, ["", "nothing here"]) == ["", ""]  # no hits: empty text, no crash


def test_searchr1_server_document_shape(server):
    """The real server's hits: ``title`` (first line, quotes stripped), ``text`` (the rest) and ``contents``."""
    url, _ = server
    bare = requests.post(url, json={"queries": ["topic4"], "topk": 1}, timeout=30).json()["result"][0][0]
    assert bare == {"id": "4", "title": "Title 4", "text": "text about topic4 and more",
                    "contents": '"Title 4"\ntext about topic4 and more'}
    scored = requests.post(url, json={"queries": ["topic4"], "topk": 1, "return_scores": True}, timeout=30).json()
    assert scored["result"][0][0]["document"] == bare and isinstance(scored["result"][0][0]["score"], float)


# ------------------------------------------------------------------------------------ verl's former search tool
RETRIED_STATUSES = (500, 502, 503, 504)


def verl_search(url: str, queries: list[str], topk: int = 3) -> tuple[str, dict]:
    """verl's request (one attempt; upstream retries the statuses above with growing sleeps) and its reading of the
    answer: the tool's JSON text and the metadata fields it derives (``status``, ``total_results``)."""
    response = requests.post(url, json={"queries": queries, "topk": topk, "return_scores": True}, timeout=30,
                             headers={"Content-Type": "application/json", "Accept": "application/json"})
    if response.status_code in RETRIED_STATUSES:
        return (json.dumps({"result": f"Search error: HTTP {response.status_code}"}),
                {"status": "api_error", "total_results": 0})
    response.raise_for_status()  # any other error status: not retried
    per_query = response.json().get("result", [])
    if not per_query:
        return json.dumps({"result": "No search results found."}), {"status": "no_results", "total_results": 0}
    blocks = []
    for hits in per_query:
        docs = [split_title(hit["document"]["contents"]) for hit in hits]
        blocks.append("".join(f"Doc {n} (Title: {title})\n{text}\n\n" for n, (title, text) in enumerate(docs, 1))
                      .strip())
    total = sum(len(hits) for hits in per_query)
    return json.dumps({"result": "\n---\n".join(blocks)}), {"status": "success", "total_results": total}


def test_verl_search_tool_round_trip(server):
    url, _ = server
    text, metadata = verl_search(url, ["text topic1", "text topic2"], topk=2)
    assert metadata == {"status": "success", "total_results": 4}
    result = json.loads(text)["result"]
    assert result.startswith('Doc 1 (Title: "Title 1")\ntext about topic1 and more') and "\n---\n" in result


def test_verl_search_tool_large_query_list_and_no_hits(server):
    url, _ = server
    _, metadata = verl_search(url, [f"text topic{i % 50}" for i in range(300)], topk=3)
    assert metadata == {"status": "success", "total_results": 900}
    _, metadata = verl_search(url, ["nothing"], topk=3)
    assert metadata["status"] == "success" and metadata["total_results"] == 0
    _, metadata = verl_search(url, [], topk=3)
    assert metadata["status"] == "no_results"  # an empty list: an empty result, not a 422 the tool would raise
