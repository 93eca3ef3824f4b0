"""The endpoint budget: requests in flight and requests per second per LLM endpoint, over every worker of a job.

Why: each worker's :class:`~masksearch_rl.llm.LLMClient` limits its own process, so N workers would send N times the
limit. One small Ray actor holds the limits of every endpoint instead; each worker process installs a
:class:`BudgetGate` as its process gate (:func:`masksearch_rl.llm.set_endpoint_gate`), so every request attempt of
every client (retries included) first takes a slot there. A slot is a lease: a worker that dies holding one does not
shrink the budget for good, its lease expires after ``lease_s`` (longer than any one attempt may take).

Limits come from the LLM configs (:func:`endpoint_limits`): ``concurrency`` is the endpoint's requests in flight and
``rate_per_s`` its requests per second, over all workers together; configs that name the same ``base_url`` share one
budget, with the smallest value any of them sets.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray

from masksearch_rl.llm import LLMConfig


@dataclass(frozen=True)
class EndpointLimit:
    max_in_flight: int
    rate_per_s: float | None = None


def endpoint_limits(configs: Iterable[LLMConfig]) -> dict[str, EndpointLimit]:
    """One limit per ``base_url``: the smallest ``concurrency`` and ``rate_per_s`` of the configs that call it."""
    limits: dict[str, EndpointLimit] = {}
    for config in configs:
        old = limits.get(config.base_url)
        in_flight = config.concurrency if old is None else min(old.max_in_flight, config.concurrency)
        rates = [r for r in (config.rate_per_s, old.rate_per_s if old else None) if r]
        limits[config.base_url] = EndpointLimit(in_flight, min(rates) if rates else None)
    return limits


@ray.remote(num_cpus=0, max_concurrency=100_000)
class EndpointBudget:
    """The budget actor (async: many workers wait on it at once). ``acquire(endpoint)`` returns a lease when a slot
    is free and the endpoint's rate allows another request; ``release(lease)`` frees it. Endpoints without a limit
    are admitted at once (lease None)."""

    def __init__(self, limits: dict[str, EndpointLimit], lease_s: float):
        self.limits = limits
        self.lease_s = lease_s
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._next_start = dict.fromkeys(limits, 0.0)
        self._leases: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count(1)
        self._in_flight = dict.fromkeys(limits, 0)
        self.stats = {e: {"requests": 0, "max_in_flight": 0, "expired_leases": 0} for e in limits}
        self._reaper: asyncio.Task | None = None

    async def acquire(self, endpoint: str) -> int | None:
        limit = self.limits.get(endpoint)
        if limit is None:
            return None
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        slots = self._slots.setdefault(endpoint, asyncio.Semaphore(limit.max_in_flight))
        await slots.acquire()
        if limit.rate_per_s:
            now = time.monotonic()
            start = max(now, self._next_start[endpoint])
            self._next_start[endpoint] = start + 1.0 / limit.rate_per_s  # evenly spaced: no burst
            if start > now:
                await asyncio.sleep(start - now)
        lease = next(self._ids)
        self._leases[lease] = (endpoint, time.monotonic() + self.lease_s)
        self._in_flight[endpoint] += 1
        stats = self.stats[endpoint]
        stats["requests"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], self._in_flight[endpoint])
        return lease

    async def release(self, lease: int | None) -> None:
        held = self._leases.pop(lease, None) if lease is not None else None
        if held is not None:
            self._free(held[0])

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        return {e: {**s, "in_flight": self._in_flight[e], "limit": self.limits[e].max_in_flight,
                    "rate_per_s": self.limits[e].rate_per_s} for e, s in self.stats.items()}

    async def _reap(self) -> None:
        """Once a second, take back the slots of leases held past ``lease_s`` (their worker died)."""
        while True:
            await asyncio.sleep(1.0)
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        for lease, (endpoint, deadline) in list(self._leases.items()):
            if deadline < now:
                del self._leases[lease]
                self.stats[endpoint]["expired_leases"] += 1
                self._free(endpoint)

    def _free(self, endpoint: str) -> None:
        self._in_flight[endpoint] -= 1
        self._slots[endpoint].release()


class BudgetGate:
    """The process gate of a worker (:class:`masksearch_rl.llm.EndpointGate`) that asks the budget actor."""

    def __init__(self, budget: Any):
        self.budget = budget

    async def acquire(self, endpoint: str) -> Any:
        return await self.budget.acquire.remote(endpoint)

    async def release(self, lease: Any) -> None:
        if lease is not None:
            self.budget.release.remote(lease)  # no need to wait for the answer


def start_budget(configs: Iterable[LLMConfig]) -> Any | None:
    """The budget actor for these configs, or None when no job step calls an LLM."""
    configs = list(configs)
    if not configs:
        return None
    lease_s = max(c.timeout_s for c in configs) * 2 + 30.0  # longer than any single attempt may take
    return EndpointBudget.remote(endpoint_limits(configs), lease_s)
