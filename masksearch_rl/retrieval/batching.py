"""Micro-batching of concurrent search requests into one retriever call.

Why: during RL rollouts hundreds of agents each send one or two queries at a time. BM25 and dense encoders are
many times faster per query on a batch than one query at a time, and the retriever already uses every core, so
running requests side by side in threads only adds contention. The batcher queues requests, runs ONE
``retriever.search`` on the union in a worker thread (the event loop keeps accepting requests meanwhile), then hands
each request its own slice of the results. Requests that arrive while a batch is searched form the next batch.

Waiting for company is adaptive: the batcher waits (at most ``wait_ms``) only while fewer requests are queued than
the previous batch answered, i.e. while clients it just answered are likely on their way back. A lone client is
never kept waiting: its previous batch held one request, so there is no one to wait for.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from masksearch_rl.retrieval.types import Hit

logger = logging.getLogger(__name__)

SearchFn = Callable[[list[str], int], list[list[Hit]]]


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class _Request:
    queries: list[str]
    topk: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects queries from concurrent callers and runs them through ``search_fn`` in batches.

    A batch takes every request queued while the previous batch was searched, up to ``max_batch`` queries, and
    waits up to ``wait_ms`` for more only while fewer requests are queued than the previous batch held (module
    docstring). One batch runs at a time. A request of any length is cut into pieces of at most ``max_batch``
    queries, queued together, so a large request is searched in bounded batches and its answer reassembled. If a
    batch fails, each of its pieces is retried alone, so only the requests that really fail see the error.
    """

    def __init__(self, search_fn: SearchFn, max_batch: int = 64, wait_ms: float = 2.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_ms < 0:
            raise ValueError(f"wait_ms must be >= 0, got {wait_ms}")
        self.search_fn = search_fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.stats: Counter = Counter()
        self.batch_sizes: Counter = Counter()  # queries per retriever call -> how many calls
        self._queue: asyncio.Queue[_Request | None] | None = None
        self._carry: _Request | None = None  # request that did not fit into the previous batch
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._queued_queries = 0
        self._in_flight_queries = 0
        self._last_batch_requests = 0  # requests the previous batch answered: the company worth waiting for
        self._arrival: asyncio.Future | None = None  # set when a request is queued while the collector waits

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the background worker on the running event loop."""
        if self._worker is not None:
            return
        self._queue = asyncio.Queue()
        self._closing = False
        self._worker = asyncio.create_task(self._run(), name="retrieval-micro-batcher")

    async def close(self) -> None:
        """Stop taking requests, answer everything already queued, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        assert self._queue is not None
        self._queue.put_nowait(None)  # sentinel: everything before it is still served
        try:
            await self._worker
        finally:
            self._worker = None

    # ------------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        """Queries waiting for a batch (not counting the batch being searched)."""
        return self._queued_queries

    @property
    def in_flight(self) -> int:
        """Queries in the batch being searched right now."""
        return self._in_flight_queries

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Queue ``queries`` (any number) and wait for their hits (one list per query, at most ``topk`` each)."""
        if self._worker is None or self._closing:
            raise BatcherClosed("the retrieval batcher is not running (server starting up or shutting down)")
        if not queries:
            return []
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        step = self.max_batch
        futures = []
        for start in range(0, len(queries), step):
            piece = list(queries[start : start + step])
            future = loop.create_future()
            self._queued_queries += len(piece)
            self._queue.put_nowait(_Request(piece, topk, future))
            futures.append(future)
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)
        if len(futures) == 1:
            results = await futures[0]
        else:
            try:
                parts = [await future for future in futures]
            finally:  # a cancelled caller: its pieces still queued are skipped by the worker
                for future in futures:
                    future.cancel()
            results = [hits for part in parts for hits in part]
        self.stats["requests"] += 1
        return results

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        assert self._queue is not None
        stop = False
        while not stop:
            batch, stop = await self._collect()
            if batch:
                await self._serve(batch)

    async def _collect(self) -> tuple[list[_Request], bool]:
        """Gather one batch; returns it and whether the shutdown sentinel was reached.

        Under load, requests pile up while the previous batch is searched, so taking what is queued already makes
        big batches. While fewer requests are queued than the previous batch answered, it waits (``wait_s`` at
        most) for the rest of them.
        """
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        if first is None:
            return [], True
        batch, size = [first], len(first.queries)
        loop = asyncio.get_running_loop()
        deadline = None
        while size < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if self.wait_s <= 0 or len(batch) >= self._last_batch_requests:
                    break
                if deadline is None:
                    deadline = loop.time() + self.wait_s
                if not await self._wait_for_arrival(loop, deadline):
                    break
                continue
            if item is None:
                return batch, True
            if size + len(item.queries) > self.max_batch:
                self._carry = item  # first in line for the next batch
                break
            batch.append(item)
            size += len(item.queries)
        return batch, False

    async def _wait_for_arrival(self, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
        """Wait until a request is queued (True) or ``deadline`` passes (False)."""
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        arrival = self._arrival = loop.create_future()
        timer = loop.call_later(remaining, lambda: arrival.done() or arrival.set_result(None))
        try:
            await arrival
        finally:
            timer.cancel()
            self._arrival = None
        return not self._queue.empty()

    async def _serve(self, batch: list[_Request]) -> None:
        size = sum(len(r.queries) for r in batch)
        self._queued_queries -= size
        self._in_flight_queries = size
        try:
            live = [r for r in batch if not r.future.done()]  # callers that gave up are skipped
            self._last_batch_requests = len(live)
            if not live:
                return
            try:
                results = await self._search([q for r in live for q in r.queries], max(r.topk for r in live))
            except Exception as err:  # noqa: BLE001 - isolated below, reported to the callers
                if len(live) == 1:
                    self._fail(live[0], err)
                    return
                logger.warning("batch of %d requests failed (%s); retrying them one by one", len(live), err)
                for request in live:
                    try:
                        self._deliver(request, await self._search(request.queries, request.topk))
                    except Exception as single_err:  # noqa: BLE001
                        self._fail(request, single_err)
                return
            start = 0
            for request in live:
                end = start + len(request.queries)
                self._deliver(request, results[start:end])
                start = end
        finally:
            self._in_flight_queries = 0

    async def _search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """One retriever call off the event loop, with its output shape checked."""
        self.stats["batches"] += 1
        self.batch_sizes[len(queries)] += 1
        results = await asyncio.to_thread(self.search_fn, queries, topk)
        if len(results) != len(queries):
            raise RuntimeError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
        return results

    def _deliver(self, request: _Request, results: list[list[Hit]]) -> None:
        if not request.future.done():
            request.future.set_result([hits[: request.topk] for hits in results])
            self.stats["queries"] += len(request.queries)

    def _fail(self, request: _Request, err: Exception) -> None:
        self.stats["errors"] += 1
        if not request.future.done():
            request.future.set_exception(err)
