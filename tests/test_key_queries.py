"""Unit tests of :class:`bot_toolkit.key_queries.KeyQueries` (injected query and clock)."""

from __future__ import annotations

import asyncio

import pytest

from bot_toolkit.key_queries import KeyQueries
from bot_toolkit.metrics import Metrics
from tests.fakes import FakeClock


class Gate:
    """A query that records its calls and waits until released."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()
        self._called = asyncio.Event()

    async def __call__(self, user_id: str) -> None:
        self.calls.append(user_id)
        self._called.set()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1

    async def until_calls(self, n: int) -> None:
        """Wait (bounded) until ``n`` queries have started."""
        async with asyncio.timeout(10):
            while len(self.calls) < n:
                self._called.clear()
                await self._called.wait()


async def test_cap_dedupe_and_negative_cache() -> None:
    gate, clock, metrics = Gate(), FakeClock(100.0), Metrics()
    queries = KeyQueries(
        gate, concurrency=2, timeout=30.0, negative_ttl=60.0, clock=clock, metrics=metrics
    )
    callers = [asyncio.ensure_future(queries.query(f"@u{n % 5}:x")) for n in range(20)]
    # The second query wakes us only after the tasks scheduled before that wake-up ran: every
    # caller, and the other three users' query tasks, which then wait for a slot (or, with a
    # broken cap, have started too).
    await gate.until_calls(2)
    # Five users, one query each in flight, at most two running at once.
    assert queries.in_flight == 5 and gate.most == 2 and len(gate.calls) == 2
    gate.release.set()
    assert all(await asyncio.gather(*callers))
    assert sorted(gate.calls) == [f"@u{n}:x" for n in range(5)]
    # Within the negative TTL: no new query, an immediate False.
    assert await queries.query("@u1:x") is False
    assert len(gate.calls) == 5
    counter = metrics.get("key_queries_total")
    assert counter is not None and (counter.get("done"), counter.get("cached")) == (5, 1)
    clock.now += 60.0
    assert await queries.query("@u1:x") is True
    assert len(gate.calls) == 6


async def test_a_stalled_query_times_out_and_frees_its_slot() -> None:
    gate, metrics = Gate(), Metrics()
    queries = KeyQueries(gate, concurrency=1, timeout=0.05, negative_ttl=0.0, metrics=metrics)
    assert await queries.query("@slow:x") is False  # the caller gave up, and so did the query
    assert queries.in_flight == 0
    gate.release.set()
    assert await queries.query("@fast:x") is True
    counter = metrics.get("key_queries_total")
    assert counter is not None and counter.get("timeout") == 1


async def test_a_failing_query_is_counted_not_raised() -> None:
    async def broken(user_id: str) -> None:
        raise OSError("homeserver went away")

    metrics = Metrics()
    queries = KeyQueries(broken, metrics=metrics)
    assert await queries.query("@u:x") is False
    counter = metrics.get("key_queries_total")
    assert counter is not None and counter.get("failed") == 1


def test_bad_settings_are_refused() -> None:
    async def query(user_id: str) -> None:
        return None

    with pytest.raises(ValueError, match="concurrency"):
        KeyQueries(query, concurrency=0)
