"""One async client for every OpenAI-compatible chat endpoint we call (vLLM, DashScope compatible mode, OpenAI).

Used by the RAMP span extractor, the CoT agents (Planner/Rewriter/Observer), the LLM judge, the self-evolve teacher
and the eval policy. It adds what each of those needs and a plain HTTP call leaves to the caller:

* **A call cannot hang.** ``timeout_s`` is the deadline of one whole attempt (connect, send, every byte of the
  reply). HTTP clients time each *read*, so an endpoint that trickles one byte a second would hold a call forever.
* **A reply size cap** (``max_reply_bytes``): the body is read in chunks, given up past the cap, and parsed once.
* **Bounded retries** with jittered exponential backoff (honouring ``Retry-After``) on 408/409/429/5xx, connection
  errors and missed deadlines; any other status fails at once. Every attempt counts as a request.
* **No unusable reply passes for an answer.** A reply that is not JSON, not UTF-8, has no choices or no text
  (``content: null``) raises :class:`LLMError`, like an endpoint error: callers leave the item for the next run
  instead of recording an empty answer for good.
* **Limits.** ``concurrency`` requests in flight and at most ``rate_per_s`` requests per second per client; and,
  when a process sets one (:func:`set_endpoint_gate`: the Ray engine's cluster-wide budget), a gate every attempt
  passes through, shared by all clients of the process.
* **A response cache** that stores JSON only (:class:`~masksearch_rl.json_cache.JsonCache`, sqlite): identical
  request => no second call, and reading the cache executes nothing.
* Counters (calls, attempts, cache hits, HTTP statuses including retried ones, tokens, the most requests in flight)
  and errors naming the endpoint and model. The key is read from the environment variable named in the config.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from aiolimiter import AsyncLimiter

from masksearch_rl.configs import from_mapping
from masksearch_rl.json_cache import JsonCache
from masksearch_rl.loop_local import LoopLocal

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and every 5xx
BACKOFF_S, MAX_BACKOFF_S, MAX_RETRY_AFTER_S = 0.5, 8.0, 60.0
_ERROR_BODY_BYTES = 64 * 1024  # of an error reply, only enough for its message is read


@dataclass(frozen=True)
class Completion:
    """One reply: its text and why generation ended (``"stop"``, ``"length"``, ...; None when unknown)."""

    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class LLMError(RuntimeError):
    """An endpoint call that failed after its retries, or whose reply was unusable; the message names the endpoint,
    model and cause."""


@dataclass
class LLMConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-72B-Instruct"
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable holding the key
    timeout_s: float = 60.0  # deadline of one attempt, the whole reply included
    max_retries: int = 3
    concurrency: int = 16  # requests in flight (with --engine ray: over all workers together, per endpoint)
    rate_per_s: float | None = None  # requests per second (with --engine ray: over all workers, per endpoint)
    temperature: float = 0.0
    max_tokens: int = 1024
    max_reply_bytes: int = 16 * 1024 * 1024
    cache_dir: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"LLM concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"LLM timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"LLM max_retries must be >= 0, got {self.max_retries}")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError(f"LLM rate_per_s must be > 0 (or unset), got {self.rate_per_s}")
        if self.max_reply_bytes < 1024:
            raise ValueError(f"LLM max_reply_bytes must be >= 1024, got {self.max_reply_bytes}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LLMConfig:
        return from_mapping(cls, data, "LLM config field")


class EndpointGate(Protocol):
    """Admits one request to an endpoint (``acquire`` waits for a slot and returns a lease) and frees the slot."""

    async def acquire(self, endpoint: str) -> Any: ...

    async def release(self, lease: Any) -> None: ...


_gate: EndpointGate | None = None


def set_endpoint_gate(gate: EndpointGate | None) -> None:
    """Make every client of this process pass each attempt through ``gate`` (None: no gate). The Ray engine's
    workers set the cluster-wide endpoint budget here once, so no client needs to be built differently."""
    global _gate
    _gate = gate


class _Retryable(Exception):
    """An attempt that may succeed if repeated: 408/409/429/5xx, a dropped connection, a missed deadline."""

    def __init__(self, cause: str, retry_after: float | None = None, timeout: bool = False):
        super().__init__(cause)
        self.retry_after = retry_after
        self.timeout = timeout


@dataclass
class _LoopResources:
    semaphore: asyncio.Semaphore
    limiter: AsyncLimiter | None
    http: httpx.AsyncClient


class LLMClient:
    """Async chat client: ``await client.chat(messages)`` returns the reply text or raises :class:`LLMError`.

    Safe to share between tasks of one event loop; each event loop gets its own semaphore and connection pool
    (they cannot cross loops), so the client also works across successive ``asyncio.run`` calls.
    """

    def __init__(self, config: LLMConfig):
        self.config = config
        self.stats: Counter = Counter()
        self.in_flight = 0
        self._cache = JsonCache(Path(config.cache_dir) / "responses.sqlite3") if config.cache_dir else None
        self._per_loop: LoopLocal[_LoopResources] = LoopLocal(self._new_resources)
        if config.api_key_env and not os.environ.get(config.api_key_env):
            logger.debug("$%s is not set; calling %s without a key", config.api_key_env, config.base_url)

    def _new_resources(self) -> _LoopResources:
        cfg = self.config
        limiter = AsyncLimiter(1, 1.0 / cfg.rate_per_s) if cfg.rate_per_s else None  # evenly spaced, no burst
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
        )
        return _LoopResources(asyncio.Semaphore(cfg.concurrency), limiter, http)

    def cache_key(self, messages: list[dict], params: dict[str, Any]) -> str:
        blob = json.dumps({"model": self.config.model, "messages": messages, **params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    async def chat(
        self, messages: list[dict], *, use_cache: bool = True, accept: Callable[[str], bool] | None = None,
        **overrides: Any,
    ) -> str:
        """The reply text to ``messages`` (cached on disk when the config has a ``cache_dir``).

        ``accept`` decides which replies the cache may keep: a reply it rejects is returned but not stored, and a
        stored one it rejects is asked for again, so a caller that cannot use a reply (one that does not parse)
        never gets it replayed by the next run.
        """
        return (await self._cached("chat", messages, use_cache, None, overrides, accept)).text

    async def chat_completion(
        self, messages: list[dict], *, use_cache: bool = True, extra_body: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Completion:
        """Like :meth:`chat`, but also says why generation ended (``finish_reason``; vLLM's ``stop_reason``).

        ``extra_body`` is merged over the config's (e.g. vLLM's ``continue_final_message``).
        """
        return await self._cached("chat_completion", messages, use_cache, extra_body, overrides)

    async def text_completion(
        self, prompt: str, *, use_cache: bool = True, extra_body: dict[str, Any] | None = None, **overrides: Any
    ) -> Completion:
        """Plain ``/v1/completions`` on a prompt string (for a policy whose chat template is rendered locally)."""
        return await self._cached("text_completion", prompt, use_cache, extra_body, overrides)

    async def _cached(
        self, kind: str, payload: Any, use_cache: bool, extra_body: dict[str, Any] | None, overrides: dict[str, Any],
        accept: Callable[[str], bool] | None = None,
    ) -> Completion:
        cfg = self.config
        params: dict[str, Any] = {
            "temperature": overrides.pop("temperature", cfg.temperature),
            "max_tokens": overrides.pop("max_tokens", cfg.max_tokens),
        }
        params.update({k: v for k, v in overrides.items() if v is not None})
        body = {**(cfg.extra_body or {}), **(extra_body or {})}
        key = None
        if self._cache is not None and use_cache:
            key_params = params if kind == "chat" else {**params, "_kind": kind, "_extra_body": body}
            key = self.cache_key(payload if kind != "text_completion" else [{"prompt": payload}], key_params)
            hit = _completion_from_cache(self._cache.get(key))
            if hit is not None:
                if accept is None or accept(hit.text):
                    self.stats["cache_hits"] += 1
                    return hit
                self.stats["cache_rejected"] += 1
        completion = await self._request(kind, payload, params, body)
        if key is not None:
            if accept is None or accept(completion.text):
                self._cache.set(key, asdict(completion))
            else:
                self._cache.delete(key)  # a stored reply that is rejected now: no need to read it again
        return completion

    async def _request(self, kind: str, payload: Any, params: dict[str, Any], body: dict[str, Any]) -> Completion:
        """One call: up to ``max_retries + 1`` attempts, each under the deadline, the limits and the gate."""
        cfg = self.config
        where = f"{cfg.base_url} (model {cfg.model!r})"
        path = "completions" if kind == "text_completion" else "chat/completions"
        url = f"{cfg.base_url.rstrip('/')}/{path}"
        request = {**body, "model": cfg.model, ("prompt" if kind == "text_completion" else "messages"): payload,
                   **params}
        headers = {"Authorization": f"Bearer {os.environ.get(cfg.api_key_env) or 'EMPTY'}"}
        resources = self._per_loop.get()
        self.stats["calls"] += 1
        attempts = cfg.max_retries + 1
        for attempt in range(attempts):
            try:
                data = await self._attempt(resources, url, request, headers, where)
                return self._completion(kind, data, where)
            except _Retryable as err:
                if attempt + 1 < attempts:
                    await asyncio.sleep(_backoff(attempt, err.retry_after))
                    continue
                self.stats["errors"] += 1
                if err.timeout:
                    self.stats["timeouts"] += 1
                    raise LLMError(f"{where} timed out: {err} ({attempts} attempt(s))") from None
                raise LLMError(f"{where} failed after {attempts} attempt(s): {err}") from None
            except LLMError:
                self.stats["errors"] += 1
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, resources: _LoopResources, url: str, request: dict, headers: dict, where: str
    ) -> Any:
        cfg = self.config
        async with resources.semaphore:
            gate = _gate
            lease = await gate.acquire(cfg.base_url) if gate is not None else None
            sent = False
            try:
                if resources.limiter is not None:
                    await resources.limiter.acquire()
                self.in_flight += 1
                sent = True
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
                self.stats["attempts"] += 1
                return await asyncio.wait_for(self._post(resources.http, url, request, headers, where), cfg.timeout_s)
            except asyncio.TimeoutError:
                raise _Retryable(f"no complete reply within {cfg.timeout_s:g} s (deadline per attempt)",
                                 timeout=True) from None
            except httpx.TimeoutException as err:
                raise _Retryable(f"{type(err).__name__} after {cfg.timeout_s:g} s", timeout=True) from None
            except httpx.TransportError as err:
                raise _Retryable(f"connection failed: {type(err).__name__}: {err}") from None
            finally:
                self.in_flight -= sent
                if gate is not None:
                    await gate.release(lease)

    async def _post(self, http: httpx.AsyncClient, url: str, request: dict, headers: dict, where: str) -> Any:
        cfg = self.config
        async with http.stream("POST", url, json=request, headers=headers) as response:
            status = response.status_code
            self.stats[f"http_{status}"] += 1
            if status >= 400:
                message = _error_message(await _read_capped(response, _ERROR_BODY_BYTES, truncate=True))
                if status in RETRYABLE_STATUSES or status >= 500:
                    raise _Retryable(f"HTTP {status}: {message}", _retry_after(response.headers))
                if status == 401:
                    raise LLMError(f"{where} rejected the API key (HTTP 401): set ${cfg.api_key_env}")
                raise LLMError(f"{where} answered HTTP {status} (not retried): {message}")
            raw = await _read_capped(response, cfg.max_reply_bytes)
            if raw is None:
                self.stats["oversized_replies"] += 1
                raise LLMError(f"{where} sent a reply larger than max_reply_bytes={cfg.max_reply_bytes:,}")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            self.stats["unusable_replies"] += 1
            raise LLMError(f"{where} sent a reply that is not JSON (or not UTF-8): {type(err).__name__}: "
                           f"{str(err)[:120]}; first bytes {raw[:80]!r}") from None

    def _completion(self, kind: str, data: Any, where: str) -> Completion:
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            self.stats["unusable_replies"] += 1
            raise LLMError(f"{where} returned no choices")
        choice = choices[0]
        if kind == "text_completion":
            text = choice.get("text")
        else:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            self.stats["unusable_replies"] += 1
            raise LLMError(f"{where} sent a reply without text ({'text' if kind == 'text_completion' else 'content'}"
                           f" is {json.dumps(text)[:40]})")
        usage = data.get("usage")
        if isinstance(usage, dict):
            for name in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(name), int):
                    self.stats[name] += usage[name]
        finish = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")  # vLLM: the stop string (or token id) that ended it
        return Completion(text, finish if isinstance(finish, str) else None,
                          stop_reason if isinstance(stop_reason, (str, int)) else None)

    def describe(self) -> dict[str, Any]:
        """Config without secrets, for logs and W&B."""
        return {**asdict(self.config), "stats": dict(self.stats)}

    async def aclose(self) -> None:
        """Close this loop's connections and the cache. (Pools of other, finished loops are dropped with them.)"""
        await self._per_loop.aclose(lambda resources: resources.http.aclose())
        if self._cache is not None:
            self._cache.close()  # (reopened if the client is used again)


def _completion_from_cache(value: Any) -> Completion | None:
    """A cached value as a Completion; anything of another shape is a miss (it is asked for again)."""
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        finish, stop = value.get("finish_reason"), value.get("stop_reason")
        return Completion(value["text"], finish if isinstance(finish, str) else None,
                          stop if isinstance(stop, (str, int)) else None)
    return None


async def _read_capped(response: httpx.Response, limit: int, truncate: bool = False) -> bytes | None:
    """The body, read chunk by chunk: None once it passes ``limit`` bytes (or its first ``limit`` bytes when
    ``truncate``). A declared Content-Length over the limit is refused before reading."""
    declared = response.headers.get("content-length")
    if not truncate and declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                break
            return None
    return b"".join(chunks)[:limit] if truncate else b"".join(chunks)


def _error_message(raw: bytes | None) -> str:
    text = (raw or b"").decode("utf-8", "replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return error["message"][:300]
            if isinstance(data.get("message"), str):
                return data["message"][:300]
    except (ValueError, RecursionError):
        pass
    return text[:300]


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait (``retry-after-ms`` or ``retry-after`` in seconds), capped."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return min(MAX_RETRY_AFTER_S, max(0.0, float(value) / scale))
            except ValueError:
                continue
    return None


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    return min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0)
