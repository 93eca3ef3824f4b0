"""Small interfaces shared by indexes, the retrieval server, its client and the web search backends.

Two levels:
- :class:`Retriever` is an in-process index (BM25, dense, hybrid): synchronous and CPU-bound, always called with a
  *batch* of queries, because batching is where the speed comes from. The server runs it off the event loop.
- :class:`SearchBackend` is what agents and data generators call: asynchronous, may be remote (our retrieval
  server, Serper, SerpAPI, Google CSE) or a local retriever wrapped with :class:`LocalBackend`.
Both return one list of :class:`Hit` per query, best first. A search backend also takes an optional
:class:`~masksearch_rl.retrieval.exclusion.SearchExclusion`: passages it must not return (a RAMP item's source).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from masksearch_rl.corpus.passage import split_contents
from masksearch_rl.retrieval.exclusion import SearchExclusion, search_hiding

# Passages per search when nobody says otherwise (Search-R1's 3): the retrieval server's default for a request
# without ``topk``, ``masksearch-rl search``, and (through :class:`envs.search_client.SearchSettings`, which reads it
# from here because the retrieval floor cannot import the environment's) every agent, data generator and evaluation.
DEFAULT_TOPK = 3


@dataclass
class Hit:
    id: str
    contents: str
    score: float

    @property
    def title(self) -> str:
        return split_contents(self.contents)[0]

    @property
    def text(self) -> str:
        return split_contents(self.contents)[1]

    def to_search_r1(self, return_score: bool = True) -> dict[str, Any]:
        """One result in the Search-R1 ``/retrieve`` response shape."""
        document = {"id": self.id, "contents": self.contents}
        return {"document": document, "score": self.score} if return_score else {"document": document}


@runtime_checkable
class Retriever(Protocol):
    """An in-process index over a fixed passage collection."""

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Top-``topk`` hits for each query (same order as ``queries``)."""
        ...

    def __len__(self) -> int:
        """Number of indexed passages."""
        ...


@runtime_checkable
class SearchBackend(Protocol):
    """Anything an agent can search: local index, our retrieval server, a web search API."""

    name: str

    async def search(
        self, queries: list[str], topk: int, exclusion: SearchExclusion | None = None
    ) -> list[list[Hit]]:
        """Top-``topk`` hits per query; with ``exclusion``, none that it hides (still ``topk`` when possible)."""
        ...

    async def aclose(self) -> None:
        ...


class SearchError(RuntimeError):
    """A search that failed after its retries; the message names the backend and the cause."""


class LocalBackend:
    """Adapts a synchronous :class:`Retriever` to :class:`SearchBackend` (runs it in a worker thread)."""

    name = "local"

    def __init__(self, retriever: Retriever):
        self.retriever = retriever

    async def search(
        self, queries: list[str], topk: int, exclusion: SearchExclusion | None = None
    ) -> list[list[Hit]]:
        return await asyncio.to_thread(search_hiding, self.retriever.search, list(queries), topk, exclusion)

    async def aclose(self) -> None:
        return None
