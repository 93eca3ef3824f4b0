"""The one search client of the environment: the tag agent loop and the hermes search tool both search through here.

Why one module: both variants must see the same results for the same query, formatted the same way
(``Doc 1 (Title: …) text``, one hit per line) and cut to the same budget, or a policy trained with one would be
evaluated on different text with the other. The transport itself is not written here: :func:`shared_backend` builds
it with :func:`masksearch_rl.retrieval.web.make_backend` (our retrieval server, a local index, or a web search API),
which already brings a connection pool per event loop, a timeout, bounded retries with backoff on 5xx/connection
errors and a concurrency limit. This module adds what an agent needs on top: one backend per process shared by every
rollout (verl builds a new agent loop object per sample), query checks, an overall deadline, and error *text*
instead of exceptions, so a failing search never ends a rollout.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envs.prompts import (
    HERMES_TAGS,
    PROTOCOL_TAGS,
    SEARCH_EMPTY_QUERY,
    SEARCH_FAILED,
    SEARCH_NO_RESULTS,
    SEARCH_QUERY_TOO_LONG,
    TRUNCATION_MARKER,
)
from masksearch_rl.configs import from_mapping
from masksearch_rl.retrieval.exclusion import SearchExclusion
from masksearch_rl.retrieval.types import DEFAULT_TOPK, Hit, SearchBackend, SearchError

logger = logging.getLogger(__name__)

DEFAULT_RETRIEVAL_URL = "http://127.0.0.1:8000"
# The one definition of the search defaults (SearchSettings' field defaults): CLI options, dataclass defaults and
# docs elsewhere read these names; a yaml that must carry the number is checked against them in
# tests/test_search_settings.py. DEFAULT_TOPK itself lives on the retrieval floor (the server's default too).
DEFAULT_MAX_INFO_TOKENS = 512
# SearchOutcome.error for the policy's own bad queries (not backend failures; self-evolve tells the two apart).
EMPTY_QUERY_ERROR = "empty query"
QUERY_TOO_LONG_ERROR = "query too long"


@dataclass
class SearchSettings:
    """How to search and how much of the results the policy gets to read.

    ``backend`` goes to ``make_backend``: ``{"type": "server", "url": ..., "timeout_s", "max_retries",
    "concurrency", ...}`` (type defaults to ``server``, its url to ``DEFAULT_RETRIEVAL_URL``), ``{"type": "local",
    "index_dir": ...}`` or ``{"type": "serper" | "serpapi" | "google_cse", ...}``.
    ``max_info_tokens`` caps the formatted results (tokens when a tokenizer is at hand, else words).
    ``search_timeout_s`` bounds one search including the backend's own retries.
    """

    backend: dict[str, Any] = field(default_factory=dict)
    topk: int = DEFAULT_TOPK
    max_info_tokens: int = DEFAULT_MAX_INFO_TOKENS
    max_query_chars: int = 512
    search_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        backend = dict(self.backend or {})
        backend.setdefault("type", "server")
        if backend["type"] == "server":
            backend.setdefault("url", DEFAULT_RETRIEVAL_URL)
        self.backend = backend
        for name in ("topk", "max_info_tokens", "max_query_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"search setting {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.search_timeout_s <= 0:
            raise ValueError(f"search setting search_timeout_s must be > 0, got {self.search_timeout_s!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> SearchSettings:
        """Build from a plain or OmegaConf mapping; unknown keys fail here, naming the key."""
        return from_mapping(cls, mapping, "search setting")


@dataclass
class SearchOutcome:
    """What one search gave the agent: ``text`` is shown to the policy; ``error`` (a cause for logs) is set when
    the search produced no results because of a problem rather than an empty answer."""

    text: str
    error: str | None = None
    called_backend: bool = False
    latency_s: float = 0.0
    num_hits: int = 0


# ------------------------------------------------------------------------------------------ shared backends
_BACKENDS: dict[str, SearchBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def shared_backend(backend_config: Mapping[str, Any]) -> SearchBackend:
    """The process-wide backend for this config, built on first use.

    verl instantiates one agent loop per trajectory, and a tool once per worker; sharing the backend shares its
    connection pools and concurrency limit (kept per event loop inside the backend) across all of them.
    """
    key = json.dumps(_to_plain(backend_config), sort_keys=True, default=str)
    with _BACKENDS_LOCK:
        if key not in _BACKENDS:
            from masksearch_rl.retrieval.web import make_backend

            _BACKENDS[key] = make_backend(dict(_to_plain(backend_config)))
            logger.info("search backend %s ready (%s)", _BACKENDS[key].name, key)
        return _BACKENDS[key]


def search_backend_config(server_url: str | None = None, index_dir: str | None = None, web: str | None = None) -> dict:
    """The ``search.backend`` mapping for a command's search options: a web API (``serper`` ...), a local index, or
    our retrieval server (the default, at :data:`DEFAULT_RETRIEVAL_URL`). Raises ``ValueError`` when more than one
    is given.
    """
    if sum(x is not None for x in (server_url, index_dir, web)) > 1:
        raise ValueError("give one search backend: a retrieval server URL, a local index or a web API")
    if web:
        return {"type": web}
    if index_dir:
        return {"type": "local", "index_dir": index_dir}
    return {"type": "server", "url": server_url or DEFAULT_RETRIEVAL_URL}


async def close_shared_backends() -> None:
    """Close every shared backend (tests, clean shutdown); later searches build fresh ones."""
    with _BACKENDS_LOCK:
        backends = list(_BACKENDS.values())
        _BACKENDS.clear()
    for backend in backends:
        await backend.aclose()


# ------------------------------------------------------------------------------------------------ formatting
def format_hits(hits: list[Hit]) -> str:
    """``Doc 1 (Title: T) text`` per hit, one per line, best first.

    Protocol tags inside retrieved text are removed: a passage that quoted ``</information>`` (or, in the hermes
    variant, ``</tool_response>``) would otherwise close the block early for the format reward and for the policy.
    """
    lines = []
    for rank, hit in enumerate(hits, start=1):
        title, text = _clean(hit.title), _clean(hit.text)
        lines.append(f"Doc {rank} (Title: {title}) {text}" if title else f"Doc {rank} {text}")
    return "\n".join(lines)


_STRIPPED_TAGS = (*PROTOCOL_TAGS, *HERMES_TAGS)


def _clean(text: str) -> str:
    for tag in _STRIPPED_TAGS:
        text = text.replace(tag, " ")
    return " ".join(text.split())


def truncate_to_budget(text: str, max_tokens: int, tokenizer: Any | None = None) -> str:
    """``text`` cut to about ``max_tokens`` tokens (``tokenizer`` given) or words, marked when cut.

    With a tokenizer the kept part plus the marker encode to at most ``max_tokens`` tokens (give or take a merge at
    the seam). Without one, ``max_tokens`` words of the text are kept (the marker not counted), with the original
    spacing (one hit per line).
    """
    if max_tokens <= 0:
        return ""
    if tokenizer is None:
        words = list(re.finditer(r"\S+", text))
        if len(words) <= max_tokens:
            return text
        return text[: words[max_tokens - 1].end()] + TRUNCATION_MARKER
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    marker_len = len(tokenizer.encode(TRUNCATION_MARKER, add_special_tokens=False))
    marker = TRUNCATION_MARKER if max_tokens > marker_len else ""  # a budget this small has no room for it
    # A cut inside a multi-byte character decodes to U+FFFD; drop that partial character.
    kept = tokenizer.decode(ids[: max_tokens - (marker_len if marker else 0)], skip_special_tokens=True)
    return kept.rstrip("\ufffd") + marker


def results_text(hits: list[Hit], max_tokens: int, tokenizer: Any | None = None) -> str:
    """What the policy reads for ``hits``: the formatted results cut to ``max_tokens`` (tokens of ``tokenizer``,
    else words), or the no-results notice. The one rendering for the RL env, the oracle and the CoT agents."""
    if not hits:
        return SEARCH_NO_RESULTS
    return truncate_to_budget(format_hits(hits), max_tokens, tokenizer)


# --------------------------------------------------------------------------------------------------- search
SEARCH_TOOL_NAME = "search"  # the key of our tool in a row's ``tools_kwargs`` (ramp export's ``tool_name``)


def row_exclusion(create_kwargs: Mapping[str, Any] | None) -> SearchExclusion | None:
    """The passages an episode must not find: ``create_kwargs["exclude"]`` of its RL row (``ramp export
    --hide-source`` writes ``{"ids": [item id], "texts": [source passage]}``), None when the row has none.
    A malformed one raises ``ValueError``: a data bug must not silently show the policy its answer."""
    return SearchExclusion.from_json((create_kwargs or {}).get("exclude"))


async def search_once(
    query: Any, settings: SearchSettings, backend: SearchBackend, tokenizer: Any | None = None,
    max_tokens: int | None = None, exclusion: SearchExclusion | None = None,
) -> SearchOutcome:
    """Search ``query`` and return the text the policy reads; never raises for a bad query or a failed backend.

    ``max_tokens`` (default ``settings.max_info_tokens``) lets the caller shrink the budget, e.g. to what is left
    of the response. ``exclusion`` hides passages from the results (a RAMP item's source passage).
    """
    budget = settings.max_info_tokens if max_tokens is None else min(max_tokens, settings.max_info_tokens)
    if not isinstance(query, str) or not query.strip():
        return SearchOutcome(SEARCH_EMPTY_QUERY, error=EMPTY_QUERY_ERROR)
    query = " ".join(query.split())
    if len(query) > settings.max_query_chars:
        text = SEARCH_QUERY_TOO_LONG.format(length=len(query), limit=settings.max_query_chars)
        return SearchOutcome(text, error=QUERY_TOO_LONG_ERROR)
    started = time.perf_counter()
    try:
        # Without an exclusion the call is the plain protocol one, which backends predating the option also take.
        search = backend.search([query], settings.topk) if exclusion is None else \
            backend.search([query], settings.topk, exclusion)
        results = await asyncio.wait_for(search, settings.search_timeout_s)
        hits = results[0]
    except asyncio.TimeoutError:
        cause = f"no answer within {settings.search_timeout_s:g} s"
        return _failed(cause, f"{backend.name}: {cause}", started)
    except SearchError as err:
        return _failed(_short_cause(err), str(err), started)
    except Exception as err:  # noqa: BLE001 - any backend bug becomes error text, the rollout goes on
        logger.exception("search backend %s raised", backend.name)
        return _failed(type(err).__name__, f"{backend.name}: {type(err).__name__}: {err}", started)
    latency = time.perf_counter() - started
    return SearchOutcome(results_text(hits, budget, tokenizer), called_backend=True, latency_s=latency,
                         num_hits=len(hits))


def _failed(reason: str, detail: str, started: float) -> SearchOutcome:
    _log_failure(detail)
    return SearchOutcome(SEARCH_FAILED.format(reason=reason), error=detail, called_backend=True,
                         latency_s=time.perf_counter() - started)


@functools.lru_cache(maxsize=256)
def _log_failure(detail: str) -> None:
    """Each distinct failure is logged once per process: a down server would otherwise log once per rollout.
    Every failure is still counted in the rollout's ``search_errors``."""
    logger.warning("search failed: %s", detail)


def _short_cause(err: SearchError) -> str:
    """The policy sees the kind of failure (``ConnectError``, ``HTTP 503``), not server addresses."""
    cause = err.__cause__
    if cause is not None:
        status = getattr(cause, "status", None)
        return f"HTTP {status}" if status else type(cause).__name__
    return "search error"


def _to_plain(mapping: Any) -> Any:
    """OmegaConf containers to plain dicts/lists (resolved), anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        return mapping
    if isinstance(mapping, (DictConfig, ListConfig)):
        return OmegaConf.to_container(mapping, resolve=True)
    return dict(mapping) if isinstance(mapping, Mapping) else mapping
