"""One async client for every OpenAI-compatible chat endpoint we call (vLLM, DashScope compatible mode, OpenAI).

Used by the RAMP span extractor, the CoT agents (Planner/Rewriter/Observer), the LLM judge and the eval policy.
It adds what each of those needs and the ``openai`` SDK leaves to the caller: a concurrency limit, an on-disk
response cache (identical request => no second call), a clear error naming the endpoint, and counters (calls,
cache hits, HTTP statuses seen including retried ones, the most requests ever in flight).
Timeouts and bounded exponential-backoff retries on 408/409/429/5xx/connection errors come from the SDK itself
(``timeout``, ``max_retries``; it honours ``Retry-After``). The key is read from the environment variable named in
the config, never from a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import openai

from masksearch_rl.loop_local import LoopLocal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """One reply: its text and why generation ended (``"stop"``, ``"length"``, ...; None when unknown)."""

    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class LLMError(RuntimeError):
    """An endpoint call that failed after its retries; the message names the endpoint, model and cause."""


@dataclass
class LLMConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "Qwen/Qwen2.5-72B-Instruct"
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 3
    concurrency: int = 16
    temperature: float = 0.0
    max_tokens: int = 1024
    cache_dir: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"LLM concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"LLM timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"LLM max_retries must be >= 0, got {self.max_retries}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LLMConfig:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LLM config field(s): {sorted(unknown)}")
        return cls(**data)


class LLMClient:
    """Async chat client: ``await client.chat(messages)`` returns the reply text or raises :class:`LLMError`.

    Safe to share between tasks of one event loop; each event loop gets its own semaphore and connection pool
    (they cannot cross loops), so the client also works across successive ``asyncio.run`` calls.
    """

    def __init__(self, config: LLMConfig):
        self.config = config
        self.stats: Counter = Counter()
        self.in_flight = 0
        self._cache = None
        if config.cache_dir:
            import diskcache

            self._cache = diskcache.Cache(config.cache_dir)
        self._per_loop: LoopLocal[tuple[asyncio.Semaphore, openai.AsyncOpenAI]] = LoopLocal(self._new_resources)
        if config.api_key_env and not os.environ.get(config.api_key_env):
            logger.debug("$%s is not set; calling %s without a key", config.api_key_env, config.base_url)

    def _new_resources(self) -> tuple[asyncio.Semaphore, openai.AsyncOpenAI]:
        cfg = self.config

        async def count_response(response: Any) -> None:  # sees every attempt, retries included
            self.stats[f"http_{response.status_code}"] += 1

        client = openai.AsyncOpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
            timeout=openai.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)),
            max_retries=cfg.max_retries,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [count_response]}),
        )
        return asyncio.Semaphore(cfg.concurrency), client

    def _resources(self) -> tuple[asyncio.Semaphore, openai.AsyncOpenAI]:
        return self._per_loop.get()

    def cache_key(self, messages: list[dict], params: dict[str, Any]) -> str:
        blob = json.dumps({"model": self.config.model, "messages": messages, **params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    async def chat(
        self, messages: list[dict], *, use_cache: bool = True, accept: Callable[[str], bool] | None = None,
        **overrides: Any,
    ) -> str:
        """The reply text to ``messages`` (cached on disk when the config has a ``cache_dir``).

        ``accept`` decides which replies the cache may keep: a reply it rejects is returned but not stored, and a
        stored one it rejects is asked for again, so a caller that cannot use a reply (a judge reply that does not
        parse) never gets it replayed.
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
            # `chat` keeps its historical key (and stores bare text), so existing caches stay valid.
            key_params = params if kind == "chat" else {**params, "_kind": kind, "_extra_body": body}
            key = self.cache_key(payload if kind != "text_completion" else [{"prompt": payload}], key_params)
            cached = self._cache.get(key)
            if cached is not None:
                hit = Completion(cached) if isinstance(cached, str) else Completion(**cached)
                if accept is None or accept(hit.text):
                    self.stats["cache_hits"] += 1
                    return hit
                self.stats["cache_rejected"] += 1
        completion = await self._request(kind, payload, params, body)
        if key is not None:
            if accept is None or accept(completion.text):
                self._cache.set(key, completion.text if kind == "chat" else asdict(completion))
            else:
                self._cache.delete(key)  # a stored reply that is rejected now: no need to read it again
        return completion

    async def _request(self, kind: str, payload: Any, params: dict[str, Any], body: dict[str, Any]) -> Completion:
        cfg = self.config
        semaphore, client = self._resources()
        async with semaphore:
            self.stats["calls"] += 1
            self.in_flight += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
            try:
                if kind == "text_completion":
                    response = await client.completions.create(
                        model=cfg.model, prompt=payload, extra_body=body or None, **params
                    )
                else:
                    response = await client.chat.completions.create(
                        model=cfg.model, messages=payload, extra_body=body or None, **params
                    )
            except openai.AuthenticationError as err:
                self.stats["errors"] += 1
                raise LLMError(
                    f"{cfg.base_url} rejected the API key for model {cfg.model!r}: set ${cfg.api_key_env}"
                ) from err
            except openai.APITimeoutError as err:
                self.stats["errors"] += 1
                self.stats["timeouts"] += 1
                raise LLMError(
                    f"{cfg.base_url} (model {cfg.model!r}) timed out after {cfg.timeout_s}s, "
                    f"{cfg.max_retries} retries"
                ) from err
            except openai.APIStatusError as err:
                self.stats["errors"] += 1
                raise LLMError(
                    f"{cfg.base_url} (model {cfg.model!r}) answered HTTP {err.status_code} "
                    f"(retries: up to {cfg.max_retries} for 408/409/429/5xx): {err.message}"
                ) from err
            except openai.OpenAIError as err:
                self.stats["errors"] += 1
                raise LLMError(
                    f"{cfg.base_url} (model {cfg.model!r}) failed after {cfg.max_retries} retries: {err}"
                ) from err
            finally:
                self.in_flight -= 1
        if not response.choices:
            self.stats["errors"] += 1
            raise LLMError(f"{cfg.base_url} (model {cfg.model!r}) returned no choices")
        choice = response.choices[0]
        text = (choice.text if kind == "text_completion" else choice.message.content) or ""
        stop_reason = getattr(choice, "stop_reason", None)  # vLLM: the stop string (or token id) that ended it
        if stop_reason is None and isinstance(getattr(choice, "model_extra", None), dict):
            stop_reason = choice.model_extra.get("stop_reason")
        return Completion(text, choice.finish_reason, stop_reason if isinstance(stop_reason, (str, int)) else None)

    def describe(self) -> dict[str, Any]:
        """Config without secrets, for logs and W&B."""
        return {**asdict(self.config), "stats": dict(self.stats)}

    async def aclose(self) -> None:
        """Close this loop's connections and the cache. (Pools of other, finished loops are dropped with them.)"""
        await self._per_loop.aclose(lambda resources: resources[1].close())
        if self._cache is not None:
            self._cache.close()
