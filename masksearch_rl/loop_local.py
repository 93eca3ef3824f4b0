"""Resources that belong to one asyncio event loop (connection pools, semaphores, rate limiters), one set per loop.

Why: an ``httpx.AsyncClient`` or an ``asyncio.Semaphore`` may only be used on the loop that created it, yet our
clients are shared across loops (verl runs one loop per agent-loop worker; tests run one loop per test). Keys are
the loop objects themselves, held weakly: keying by ``id(loop)`` can hand a dead loop's pool to a new loop that
happens to get the same id.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """``get()`` returns the running loop's resources, building them with ``factory()`` on first use."""

    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        resources = self._per_loop.get(loop)
        if resources is None:
            resources = self._per_loop[loop] = self._factory()
        return resources

    async def aclose(self, close: Callable[[T], Awaitable[None]]) -> None:
        """Close the running loop's resources with ``close``; forget every other loop's.

        Another loop's pool cannot be closed from here (its transports call back into that loop): a finished
        loop's connections are already gone with it, and a live one's are released when that loop closes them or
        ends.
        """
        current = asyncio.get_running_loop()
        mine = self._per_loop.get(current)
        self._per_loop.clear()
        if mine is not None:
            await close(mine)
