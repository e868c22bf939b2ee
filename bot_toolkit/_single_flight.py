"""The one single-flight map: at most one run of some work per key at a time, shared by every
caller for that key.

The first caller for a key starts the work; callers that come while it runs get the same
result (or the same exception). The entry is removed as soon as the run ends, so the next caller
starts a new one. A caller that stops waiting (cancelled, or timed out) does not cancel the run
for the others; :meth:`SingleFlight.cancel` does, for every run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K")
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Runs in flight by key; see the module docs."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        """Runs not ended yet."""
        return len(self._running)

    def __contains__(self, key: object) -> bool:
        return key in self._running

    def share(self, key: K, start: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The caller's share of the run for ``key``, started with ``start()`` if none runs.

        ``start`` is called only when no run for ``key`` is in flight. Await the returned future
        for the run's result or exception; cancelling it (directly, or by a timeout around it)
        leaves the run going for the other callers.
        """
        run = self._running.get(key)
        if run is None:
            run = asyncio.ensure_future(start())
            self._running[key] = run
            run.add_done_callback(lambda done: self._ended(key, done))
        return asyncio.shield(run)

    def _ended(self, key: K, run: asyncio.Future[T]) -> None:
        if self._running.get(key) is run:
            del self._running[key]
        if not run.cancelled():
            run.exception()  # retrieved: a run every caller gave up on must not warn at exit

    async def cancel(self) -> None:
        """Cancel every run in flight and wait until they have ended."""
        runs = list(self._running.values())
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
