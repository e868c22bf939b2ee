"""Tests of bot_toolkit.dispatcher: registration, middleware, errors, ordering, isolation, shutdown.

No test asserts on wall-clock time: progress is proven with asyncio events, barriers and counters;
``asyncio.timeout`` appears only as a generous upper bound so that a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot_toolkit.dispatcher import (
    CloseSummary,
    Dispatcher,
    DispatcherClosed,
    HandlerCancelled,
    HandlerTimeout,
)
from bot_toolkit.metrics import Metrics

BOUND = 10.0  # seconds; an upper bound against hangs, never a measurement


@dataclass(frozen=True, slots=True)
class Ev:
    """A stand-in event with a sender and no transaction."""

    sender: str
    n: int = 0
    secret: str = "s3cr3t-value"


@dataclass(frozen=True, slots=True)
class TxnEv(Ev):
    """A stand-in verification event."""

    transaction_id: str | None = None


@dataclass(frozen=True, slots=True)
class SubTxnEv(TxnEv):
    """A subclass, to test base-class routing."""


async def assert_no_other_tasks() -> None:
    assert asyncio.all_tasks() == {asyncio.current_task()}


def errors(d: Dispatcher, handler: Callable[..., Any], event_type: str, kind: str) -> float:
    name = f"{handler.__module__}.{handler.__qualname__}"
    counter = d.metrics.get("handler_errors_total")
    assert counter is not None
    return counter.get(name, event_type, kind)


def counter_value(d: Dispatcher, name: str, *labels: str) -> float:
    counter = d.metrics.get(name)
    assert counter is not None
    return counter.get(*labels)


async def wait_for(event: asyncio.Event) -> None:
    async with asyncio.timeout(BOUND):
        await event.wait()


@dataclass(frozen=True, slots=True)
class Fence:
    """A marker event on a key of its own (see :func:`fence`); no test handler routes it."""

    sender: str = "@fence:x"


async def fence(d: Dispatcher) -> None:
    """Wait (bounded) until every event that was ready to start before this call has started.

    Puts a :class:`Fence` on a key of its own and waits until its handler ran. Workers take keys
    from one first-in-first-out ready list, and a handler runs up to its first ``await`` in the
    step that takes its event; so once the fence's handler has run, every event ready before it
    has reached its handler, and an event still not started waits behind its own key. This is
    what a negative check ("event 1 has not started") waits on instead of counting loop turns.
    Use it once per dispatcher (each call registers a handler).
    """
    reached = asyncio.Event()
    marker = Fence()

    async def mark(event: Fence) -> None:
        if event is marker:
            reached.set()

    d.register(Fence, mark)
    await d.put(marker)
    await wait_for(reached)


# ------------------------------------------------------------------------------- registration


async def test_decorator_returns_handler_unchanged() -> None:
    d = Dispatcher()

    async def handler(event: Ev) -> None:
        pass

    assert d.on(Ev)(handler) is handler

    async def mw(event: object, call_next: Callable[[object], Awaitable[None]]) -> None:
        await call_next(event)

    assert d.middleware(mw) is mw

    async def eh(event: object, exc: Exception) -> None:
        pass

    assert d.on_error(ValueError)(eh) is eh


def _sync_handler(event: Ev) -> None:
    pass


async def _two_args(event: Ev, other: int) -> None:
    pass


async def _no_args() -> None:
    pass


async def _kw_only(*, event: Ev) -> None:
    pass


async def _async_filter(event: Ev) -> bool:
    return True


async def _ok(event: Ev) -> None:
    pass


@pytest.mark.parametrize("handler", [_sync_handler, _two_args, _no_args, _kw_only, "nope"])
def test_bad_handler_rejected_at_registration(handler: Any) -> None:
    d = Dispatcher()
    with pytest.raises(TypeError):
        d.register(Ev, handler)
    with pytest.raises(TypeError):
        d.on(Ev)(handler)


def test_bad_event_class_filter_middleware_error_handler_rejected() -> None:
    d = Dispatcher()
    with pytest.raises(TypeError, match="class"):
        d.register(Ev("@a:x"), _ok)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filter"):
        d.register(Ev, _ok, _async_filter)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filter"):
        d.register(Ev, _ok, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        d.middleware(_ok)  # one argument, needs two
    with pytest.raises(TypeError):
        d.on_error(ValueError)(_ok)
    with pytest.raises(TypeError):
        d.on_error(int)  # type: ignore[type-var]
    with pytest.raises(ValueError):
        Dispatcher(concurrency=0)
    with pytest.raises(ValueError):
        Dispatcher(handler_timeout=0)


async def test_accepts_bound_methods_and_async_callables() -> None:
    seen: list[str] = []

    class Handlers:
        async def method(self, event: Ev) -> None:
            seen.append("method")

        async def __call__(self, event: Ev) -> None:
            seen.append("callable")

    handlers = Handlers()
    async with Dispatcher() as d:
        d.register(Ev, handlers.method)
        d.register(Ev, handlers)
        await d.put(Ev("@a:x"))
    assert sorted(seen) == ["callable", "method"]
    await assert_no_other_tasks()


async def test_base_class_handler_receives_subclasses_and_cache_invalidates() -> None:
    seen: list[tuple[str, str]] = []
    d = Dispatcher()

    @d.on(Ev)
    async def on_any(event: Ev) -> None:
        seen.append(("any", type(event).__name__))

    @d.on(SubTxnEv)
    async def on_sub(event: SubTxnEv) -> None:
        seen.append(("sub", type(event).__name__))

    await d.start()
    await d.put(Ev("@a:x"))
    await d.put(SubTxnEv("@a:x", transaction_id="t"))
    await d.close()
    assert sorted(seen) == [("any", "Ev"), ("any", "SubTxnEv"), ("sub", "SubTxnEv")]

    # registering invalidates the cached route of a type that was already dispatched
    seen.clear()
    d2 = Dispatcher()
    async with d2:
        await d2.put(TxnEv("@a:x", transaction_id="t"))  # no handler yet: routes to nothing
        assert await d2.join(BOUND)  # handled (by no one) before the handler exists
        d2.register(Ev, on_any)
        await d2.put(TxnEv("@a:x", n=1, transaction_id="t"))
    assert seen == [("any", "TxnEv")]
    assert counter_value(d2, "events_dispatched_total", "TxnEv") == 2
    await assert_no_other_tasks()


@pytest.mark.handler_errors
async def test_filters_select_and_a_raising_filter_is_a_handler_error() -> None:
    seen: list[tuple[str, int]] = []
    d = Dispatcher()

    @d.on(Ev, lambda e: e.n % 2 == 0, lambda e: e.n > 0)
    async def even_positive(event: Ev) -> None:
        seen.append(("even", event.n))

    def broken(event: Ev) -> bool:
        raise RuntimeError("filter bug")

    @d.on(Ev, broken)
    async def never(event: Ev) -> None:
        seen.append(("never", event.n))

    @d.on(Ev)
    async def every(event: Ev) -> None:
        seen.append(("every", event.n))

    async with d:
        for n in range(5):
            await d.put(Ev("@a:x", n=n))
    assert [n for kind, n in seen if kind == "even"] == [2, 4]
    assert [n for kind, n in seen if kind == "every"] == [0, 1, 2, 3, 4]
    assert not [n for kind, n in seen if kind == "never"]
    assert errors(d, never, "Ev", "exception") == 5
    await assert_no_other_tasks()


# ------------------------------------------------------------------------ middleware, errors


async def test_middleware_order_and_drop() -> None:
    log: list[str] = []
    d = Dispatcher()

    @d.middleware
    async def outer(event: Ev, call_next: Callable[[Ev], Awaitable[None]]) -> None:
        log.append(f"outer>{event.n}")
        await call_next(event)
        log.append(f"outer<{event.n}")

    @d.middleware
    async def dropper(event: Ev, call_next: Callable[[Ev], Awaitable[None]]) -> None:
        if event.n == 1:
            log.append("drop")
            return
        log.append(f"inner>{event.n}")
        await call_next(event)

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        log.append(f"handler{event.n}")

    async with d:
        await d.put(Ev("@a:x", n=0))
        await d.put(Ev("@a:x", n=1))
    assert log == ["outer>0", "inner>0", "handler0", "outer<0", "outer>1", "drop", "outer<1"]
    await assert_no_other_tasks()


@pytest.mark.handler_errors
async def test_raising_middleware_is_counted_under_its_name() -> None:
    handled: list[int] = []
    d = Dispatcher()

    @d.middleware
    async def outer(event: Ev, call_next: Callable[[Ev], Awaitable[None]]) -> None:
        await call_next(event)

    @d.middleware
    async def picky(event: Ev, call_next: Callable[[Ev], Awaitable[None]]) -> None:
        if event.n == 0:
            raise ValueError("middleware bug")
        await call_next(event)

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        handled.append(event.n)

    async with d:
        await d.put(Ev("@a:x", n=0))
        await d.put(Ev("@a:x", n=1))
    assert handled == [1]
    assert errors(d, picky, "Ev", "exception") == 1
    await assert_no_other_tasks()


@pytest.mark.handler_errors
async def test_error_handler_chosen_by_exception_mro() -> None:
    got: list[tuple[str, str, int]] = []
    d = Dispatcher(handler_timeout=0.05)

    @d.on_error(Exception)
    async def on_exception(event: Ev, exc: Exception) -> None:
        got.append(("Exception", type(exc).__name__, event.n))

    @d.on_error(LookupError)
    async def on_lookup(event: Ev, exc: Exception) -> None:
        got.append(("LookupError", type(exc).__name__, event.n))

    @d.on_error(TimeoutError)
    async def on_timeout(event: Ev, exc: Exception) -> None:
        assert isinstance(exc, HandlerTimeout)
        got.append(("TimeoutError", type(exc).__name__, event.n))

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        if event.n == 0:
            raise KeyError("k")
        if event.n == 1:
            raise RuntimeError("r")
        await asyncio.Event().wait()  # hangs until the timeout

    async with d:
        for n in range(3):
            await d.put(Ev(f"@u{n}:x", n=n))
    assert sorted(got) == [
        ("Exception", "RuntimeError", 1),
        ("LookupError", "KeyError", 0),
        ("TimeoutError", "HandlerTimeout", 2),
    ]
    assert errors(d, handler, "Ev", "exception") == 2
    assert errors(d, handler, "Ev", "timeout") == 1
    await assert_no_other_tasks()


@pytest.mark.handler_errors
async def test_failing_error_handler_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = Dispatcher()

    @d.on_error(Exception)
    async def clumsy(event: Ev, exc: Exception) -> None:
        raise RuntimeError("error handler bug")

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        raise ValueError("v")

    with caplog.at_level(logging.ERROR, logger="bot_toolkit.dispatcher"):
        async with d:
            await d.put(Ev("@a:x"))
    assert errors(d, handler, "Ev", "exception") == 1
    assert errors(d, clumsy, "Ev", "exception") == 1
    assert any("clumsy" in r.getMessage() for r in caplog.records)
    await assert_no_other_tasks()


@pytest.mark.handler_errors
async def test_default_error_log_names_handler_and_key_but_not_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = Dispatcher()

    @d.on(TxnEv)
    async def on_txn(event: TxnEv) -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="bot_toolkit.dispatcher"):
        async with d:
            await d.put(TxnEv("@alice:x", secret="hunter2", transaction_id="txn-1"))
    [record] = [r for r in caplog.records if r.name == "bot_toolkit.dispatcher"]
    message = record.getMessage()
    assert "on_txn" in message
    assert "TxnEv" in message
    assert "@alice:x" in message
    assert "txn-1" in message
    assert "hunter2" not in caplog.text
    assert record.exc_info is not None
    assert isinstance(record.args, tuple)  # lazy % formatting
    await assert_no_other_tasks()


# ---------------------------------------------------------------------------- ordering


async def test_per_key_order_with_proven_concurrency() -> None:
    rng = random.Random(1234)
    parallel = 8
    n_keys, per_key = 16, 12  # a multiple of `parallel`, so every barrier round fills
    d = Dispatcher(concurrency=parallel)
    barrier = asyncio.Barrier(parallel)
    order: dict[tuple[str, str | None], list[int]] = defaultdict(list)
    active: set[tuple[str, str | None]] = set()
    max_active = 0

    @d.on(TxnEv)
    async def handler(event: TxnEv) -> None:
        nonlocal max_active
        key = (event.sender, event.transaction_id)
        assert key not in active, "two events of one key ran at once"
        active.add(key)
        max_active = max(max_active, len(active))
        try:
            if event.n == 0:
                await barrier.wait()  # releases only with `parallel` keys in handlers at once
            for _ in range(rng.randrange(6)):  # sleep-count-ok: shuffles handlers, waits for none
                await asyncio.sleep(0)
            order[key].append(event.n)
        finally:
            active.discard(key)

    # the same sender with several transactions, and several senders
    keys = [(f"@u{i % 4}:x", f"t{i}") for i in range(n_keys)]
    stream = [(k, n) for k in keys for n in range(per_key)]
    rng.shuffle(stream)
    counters: dict[tuple[str, str], int] = defaultdict(int)
    arrivals: list[tuple[tuple[str, str], int]] = []
    for key, _ in stream:  # renumber so each key's n follows arrival order
        arrivals.append((key, counters[key]))
        counters[key] += 1
    async with asyncio.timeout(BOUND):
        async with d:
            for (sender, txn), n in arrivals:
                await d.put(TxnEv(sender, n=n, transaction_id=txn))
    assert {k: order[k] for k in keys} == {k: list(range(per_key)) for k in keys}
    assert max_active == parallel  # overlapped, and never beyond the bound
    await assert_no_other_tasks()


async def test_ordering_key_is_sender_and_transaction() -> None:
    """Two transactions of one sender overlap; events of one sender without a txn do not."""
    d = Dispatcher()
    both_in = asyncio.Barrier(2)
    log: list[str] = []
    gate = asyncio.Event()

    @d.on(TxnEv)
    async def verification(event: TxnEv) -> None:
        await both_in.wait()

    @d.on(Ev)
    async def plain(event: Ev) -> None:
        if type(event) is not Ev:
            return
        log.append(f"start{event.n}")
        if event.n == 0:
            await gate.wait()
        log.append(f"end{event.n}")

    async with asyncio.timeout(BOUND):
        async with d:
            await d.put(TxnEv("@a:x", transaction_id="t1"))
            await d.put(TxnEv("@a:x", transaction_id="t2"))
            await d.put(Ev("@b:x", n=0))
            await d.put(Ev("@b:x", n=1))
            await fence(d)
            assert log == ["start0"]  # n=1 waits for n=0 of the same sender
            gate.set()
    assert log == ["start0", "end0", "start1", "end1"]
    await assert_no_other_tasks()


async def test_next_event_of_a_key_waits_for_every_handler() -> None:
    d = Dispatcher()
    log: list[str] = []
    gate = asyncio.Event()
    slow_started = asyncio.Event()

    @d.on(Ev)
    async def fast(event: Ev) -> None:
        log.append(f"fast{event.n}")

    @d.on(Ev)
    async def slow(event: Ev) -> None:
        if event.n == 0:
            slow_started.set()
            await gate.wait()
        log.append(f"slow{event.n}")

    async with d:
        await d.put(Ev("@a:x", n=0))
        await d.put(Ev("@a:x", n=1))
        await wait_for(slow_started)
        await fence(d)
        assert log == ["fast0"]  # the sibling ran; event 1 waits for slow0
        gate.set()
    assert log[:2] == ["fast0", "slow0"]
    assert sorted(log[2:]) == ["fast1", "slow1"]
    await assert_no_other_tasks()


@settings(max_examples=40, deadline=None)
@given(
    stream=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=60),
    concurrency=st.integers(1, 6),
    queue_size=st.integers(1, 8),
)
def test_ordering_property(
    stream: list[tuple[int, int]], concurrency: int, queue_size: int
) -> None:
    """Any interleaving, concurrency and queue size: every event handled once, per key in order."""

    async def run() -> dict[int, list[int]]:
        d = Dispatcher(concurrency=concurrency, queue_size=queue_size)
        seen: dict[int, list[int]] = defaultdict(list)

        @d.on(TxnEv)
        async def handler(event: TxnEv) -> None:
            for _ in range(event.n % 4):  # sleep-count-ok: interleaves handlers, waits for none
                await asyncio.sleep(0)
            seen[int(event.sender)].append(event.n)

        async with asyncio.timeout(BOUND):
            async with d:
                for i, (key, _) in enumerate(stream):
                    await d.put(TxnEv(str(key), n=i, transaction_id=None if key % 2 else "t"))
        await assert_no_other_tasks()
        return seen

    seen = asyncio.run(run())
    expected: dict[int, list[int]] = defaultdict(list)
    for i, (key, _) in enumerate(stream):
        expected[key].append(i)
    assert dict(seen) == dict(expected)


# ---------------------------------------------------------------------------- isolation


@pytest.mark.handler_errors
async def test_raising_and_hanging_handlers_are_isolated() -> None:
    # The timeout must outlast the other keys' work (a few loop iterations, but the asserts
    # below fail if a loaded machine stalls the loop for longer): 1 s leaves a wide margin.
    d = Dispatcher(concurrency=4, handler_timeout=1.0)
    hang_started = asyncio.Event()
    hang_cancelled = asyncio.Event()
    timed_out = asyncio.Event()
    others_done = asyncio.Event()
    done: list[str] = []
    finished_others: list[int] = []
    n_others = 30

    @d.on_error(TimeoutError)
    async def on_timeout(event: Ev, exc: Exception) -> None:
        timed_out.set()

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        if event.sender == "@boom:x":
            raise RuntimeError("boom")
        if event.sender == "@hang:x" and event.n == 0:
            hang_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                hang_cancelled.set()
                raise
        done.append(f"{event.sender}/{event.n}")
        if event.sender != "@hang:x":
            finished_others.append(event.n)
            if len(finished_others) == n_others:
                others_done.set()

    @d.on(Ev)
    async def sibling(event: Ev) -> None:
        done.append(f"sibling {event.sender}/{event.n}")

    async with asyncio.timeout(BOUND):
        await d.start()
        await d.put(Ev("@hang:x", n=0))
        await d.put(Ev("@hang:x", n=1))  # same key: waits for the hung one
        await d.put(Ev("@boom:x"))
        await wait_for(hang_started)
        for i in range(n_others):
            await d.put(Ev(f"@u{i % 7}:x", n=i))  # never waits: the queue has room
        await wait_for(others_done)
        # every other key finished while the hanging handler is still blocked
        assert not hang_cancelled.is_set()
        assert "@hang:x/1" not in done
        assert "sibling @hang:x/0" in done  # its sibling handler was not held up
        await wait_for(timed_out)
        summary = await d.close()
    assert hang_cancelled.is_set()
    assert "@hang:x/1" in done  # the key moved on after the timeout
    assert summary == CloseSummary(drained=summary.drained, abandoned=0)
    assert errors(d, handler, "Ev", "timeout") == 1
    assert errors(d, handler, "Ev", "exception") == 1
    assert counter_value(d, "events_dispatched_total", "Ev") == 3 + n_others
    await assert_no_other_tasks()


@pytest.mark.handler_errors
async def test_handler_that_swallows_cancellation_still_counts_as_timeout() -> None:
    d = Dispatcher(handler_timeout=0.02)
    finished = asyncio.Event()
    log: list[int] = []

    @d.on(Ev)
    async def stubborn(event: Ev) -> None:
        if event.n == 0:
            with contextlib.suppress(asyncio.CancelledError):  # bad manners: swallowed
                await asyncio.Event().wait()
        log.append(event.n)
        if event.n == 1:
            finished.set()

    async with d:
        await d.put(Ev("@a:x", n=0))
        await d.put(Ev("@a:x", n=1))
        await wait_for(finished)
    assert log == [0, 1]
    assert errors(d, stubborn, "Ev", "timeout") == 1
    await assert_no_other_tasks()


# ---------------------------------------------------------------------------- backpressure


async def test_backpressure_bound_holds_across_keys() -> None:
    metrics = Metrics()
    d = Dispatcher(metrics, concurrency=1, queue_size=3)
    gate = asyncio.Event()
    started = asyncio.Event()
    first_done = asyncio.Event()

    @d.on(Ev)
    async def blocked(event: Ev) -> None:
        started.set()
        await gate.wait()
        first_done.set()

    async with asyncio.timeout(BOUND):
        await d.start()
        await d.put(Ev("@k0:x"))
        await wait_for(started)  # the one worker is busy; nothing is queued
        for i in range(1, 4):
            await d.put(Ev(f"@k{i}:x"))  # three different keys fill the shared bound
        depth = metrics.get("dispatcher_queue_depth")
        assert depth is not None
        assert depth.get() == 3
        assert d.put_nowait(Ev("@k9:x")) is False
        assert counter_value(d, "events_dropped_total", "Ev") == 1

        async def put_fifth() -> bool:
            await d.put(Ev("@k4:x"))
            return first_done.is_set()

        waiting = asyncio.create_task(put_fifth())
        gate.set()  # the first event completes, the worker takes the next one
        # The put task runs before the released handler does: had the put not waited for
        # room, it would have returned before the first event was done.
        assert await waiting  # the fifth put waited for room
        summary = await d.close()
    assert summary.abandoned == 0
    assert depth.get() == 0
    await assert_no_other_tasks()


async def test_cancelled_put_passes_its_wakeup_on() -> None:
    d = Dispatcher(concurrency=1, queue_size=1)
    gate = asyncio.Event()
    handled: list[int] = []
    putters: list[asyncio.Task[None]] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        if event.n == 0:
            # The worker has just taken n=0 and woken `first`, which has not run yet:
            # cancelled now, it holds a wake-up it must pass on to `second`.
            putters[0].cancel()
        await gate.wait()
        handled.append(event.n)

    async with asyncio.timeout(BOUND):
        await d.put(Ev("@a:x", n=0))  # not started: queued
        first = asyncio.create_task(d.put(Ev("@a:x", n=1)))
        second = asyncio.create_task(d.put(Ev("@a:x", n=2)))
        putters.append(first)
        # Tasks start in the order they were created: `first`, then `second` wait for room
        # before the worker (created by start) takes n=0.
        await d.start()
        await second  # gets the room `first` gave up
        gate.set()
        await d.close()
    assert first.cancelled()
    assert handled == [0, 2]
    await assert_no_other_tasks()


# ---------------------------------------------------------------------------- shutdown


async def test_close_drains_everything_queued() -> None:
    d = Dispatcher(concurrency=4)
    handled: list[int] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        await asyncio.sleep(0)
        handled.append(event.n)

    await d.start()
    await d.start()  # idempotent
    for n in range(200):
        await d.put(Ev(f"@u{n % 9}:x", n=n))
    summary = await d.close()
    assert summary == CloseSummary(drained=200, abandoned=0)
    assert sorted(handled) == list(range(200))
    assert await d.close() == summary  # a second close reports the same
    with pytest.raises(DispatcherClosed):
        await d.put(Ev("@a:x"))
    with pytest.raises(DispatcherClosed):
        d.put_nowait(Ev("@a:x"))
    with pytest.raises(DispatcherClosed):
        await d.start()
    await assert_no_other_tasks()


async def test_close_without_start_handles_queued_events() -> None:
    d = Dispatcher()
    handled: list[int] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        handled.append(event.n)

    await d.put(Ev("@a:x", n=1))
    assert d.put_nowait(Ev("@a:x", n=2))
    assert await d.close() == CloseSummary(drained=2, abandoned=0)
    assert handled == [1, 2]
    await assert_no_other_tasks()


async def test_close_timeout_abandons_hanging_work(caplog: pytest.LogCaptureFixture) -> None:
    d = Dispatcher(concurrency=2, handler_timeout=None)
    hanging = asyncio.Event()
    done: list[str] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        if event.sender == "@hang:x":
            hanging.set()
            await asyncio.Event().wait()
        done.append(f"{event.sender}/{event.n}")

    with caplog.at_level(logging.WARNING, logger="bot_toolkit.dispatcher"):
        async with asyncio.timeout(BOUND):
            await d.start()
            for n in range(4):
                await d.put(Ev("@hang:x", n=n))  # one running, three behind it
            await wait_for(hanging)
            await d.put(Ev("@ok:x"))  # handled during close
            summary = await d.close(timeout=0.05)
    assert summary.abandoned == 4
    assert summary.drained == 1
    assert done == ["@ok:x/0"]
    assert any("abandoned" in r.getMessage() for r in caplog.records)
    await assert_no_other_tasks()


async def test_waiting_put_fails_when_closed() -> None:
    d = Dispatcher(queue_size=1, handler_timeout=None)

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        pass

    await d.put(Ev("@a:x"))  # not started: fills the queue
    waiting = asyncio.create_task(d.put(Ev("@a:x", n=1)))
    closing = asyncio.create_task(d.close())  # starts after `waiting` is waiting for room
    summary = await closing
    with pytest.raises(DispatcherClosed):
        await waiting
    assert summary == CloseSummary(drained=1, abandoned=0)
    await assert_no_other_tasks()


# ---------------------------------------------------------------------------- join


async def test_join_is_true_at_once_when_idle() -> None:
    d = Dispatcher()
    handled: list[int] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        handled.append(event.n)

    assert await d.join(timeout=0)  # never started, nothing queued
    async with d:
        assert await d.join(timeout=0)
        await d.put(Ev("@a:x", n=1))
        assert await d.join(timeout=BOUND)
        assert handled == [1]
        assert await d.join(timeout=0)  # still idle: no work left over for a second join
    await assert_no_other_tasks()


async def test_idle_is_what_join_waits_for() -> None:
    """``idle``: nothing queued (started or not) and nothing running; true again once handled,
    and after a close that abandoned what was left."""
    d = Dispatcher(handler_timeout=None)
    started, gate = asyncio.Event(), asyncio.Event()

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        started.set()
        await gate.wait()

    assert d.idle
    await d.put(Ev("@a:x", n=1))
    assert not d.idle  # queued, not started: nothing handles it
    async with d:
        await wait_for(started)
        assert not d.idle  # nothing queued, one event in its handler
        assert await d.join(timeout=0) is False
        gate.set()
        assert await d.join(timeout=BOUND)
        assert d.idle
        gate.clear()
        started.clear()
        await d.put(Ev("@a:x", n=2))
        await wait_for(started)
        assert not d.idle
        summary = await d.close(timeout=0.01)  # the blocked handler is abandoned
    assert summary.abandoned == 1
    assert d.idle
    await assert_no_other_tasks()


async def test_join_waits_for_a_slow_handler() -> None:
    d = Dispatcher(handler_timeout=None)
    started, gate = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        started.set()
        await gate.wait()
        handled.append(event.n)

    async with d:
        await d.put(Ev("@a:x", n=1))
        await wait_for(started)

        async def join_then_look() -> list[int]:
            assert await d.join(timeout=BOUND)
            return list(handled)

        joined = asyncio.create_task(join_then_look())
        gate.set()
        # The join task runs before the released handler does: a join that did not wait for
        # the running handler would see nothing handled.
        assert await joined == [1]  # finished before join returned
    await assert_no_other_tasks()


async def test_join_waits_for_events_put_while_joining() -> None:
    d = Dispatcher(handler_timeout=None)
    gates = {n: asyncio.Event() for n in range(3)}
    started = {n: asyncio.Event() for n in range(3)}
    handled: list[int] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        started[event.n].set()
        await gates[event.n].wait()
        handled.append(event.n)
        if event.n == 1:
            # Queued after the worker finds the dispatcher idle and wakes the joiner, but
            # before the joiner runs: join must see it and keep waiting.
            asyncio.get_running_loop().call_soon(d.put_nowait, Ev("@c:x", n=2))

    async with d:
        await d.put(Ev("@a:x", n=0))
        await wait_for(started[0])
        joined = asyncio.create_task(d.join(timeout=BOUND))
        # another key, put while joining (a task created after `joined` starts after it)
        await asyncio.create_task(d.put(Ev("@b:x", n=1)))
        gates[0].set()
        await wait_for(started[1])
        assert not joined.done()  # n=0 is done, n=1 is running
        gates[1].set()
        await wait_for(started[2])
        assert not joined.done()  # n=2 arrived as the dispatcher went idle
        gates[2].set()
        assert await joined is True
        assert handled == [0, 1, 2]
    await assert_no_other_tasks()


async def test_join_times_out_while_busy_and_the_dispatcher_goes_on() -> None:
    d = Dispatcher(handler_timeout=None)
    started, gate = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        started.set()
        await gate.wait()
        handled.append(event.n)

    await d.put(Ev("@a:x", n=1))
    assert await d.join(timeout=0) is False  # queued, not started: nothing handles it
    assert await d.join(timeout=0.01) is False
    async with d:
        await wait_for(started)
        assert await d.join(timeout=0) is False
        assert await d.join(timeout=0.01) is False
        gate.set()
        assert await d.join(timeout=BOUND) is True
        assert handled == [1]
    await assert_no_other_tasks()


async def test_join_returns_when_close_abandons_the_work() -> None:
    d = Dispatcher(concurrency=1, handler_timeout=None)
    started = asyncio.Event()

    @d.on(Ev)
    async def handler(event: Ev) -> None:
        started.set()
        await asyncio.Event().wait()

    async with asyncio.timeout(BOUND):
        await d.start()
        await d.put(Ev("@a:x", n=0))
        await d.put(Ev("@a:x", n=1))
        await wait_for(started)
        joined = asyncio.create_task(d.join())
        summary = await d.close(timeout=0.01)
        assert summary.abandoned == 2
        assert await joined is True  # nothing is queued or in flight any more
        assert await d.join(timeout=0)
    await assert_no_other_tasks()


# ---------------------------------------------------------------------------- put_raw


def _request(sender: str = "@alice:x", txn: object = "txn1") -> dict[str, Any]:
    return {
        "type": "m.key.verification.request",
        "sender": sender,
        "content": {
            "from_device": "DEV",
            "methods": ["m.sas.v1"],
            "timestamp": 1,
            "transaction_id": txn,
        },
    }


async def test_put_raw_decodes_and_dispatches() -> None:
    from bot_toolkit import events  # noqa: PLC0415

    got: list[object] = []
    d = Dispatcher()

    @d.on(events.VerificationEvent)
    async def on_verification(event: Any) -> None:
        got.append(event)

    async with d:
        event = await d.put_raw(_request(), decrypted_from="curvekey")
    assert isinstance(event, events.KeyVerificationRequest)
    assert event.transaction_id == "txn1"
    assert event.decrypted_from == "curvekey"
    assert got == [event]
    assert counter_value(d, "events_dispatched_total", "m.key.verification.request") == 1
    await assert_no_other_tasks()


async def test_put_raw_decode_errors_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = Dispatcher()
    with caplog.at_level(logging.WARNING, logger="bot_toolkit.dispatcher"):
        async with d:
            for _ in range(3):
                assert await d.put_raw(_request(txn=42)) is None
            assert await d.put_raw(_request(txn=None)) is None  # another reason
            assert await d.put_raw(b"{not json") is None
            assert await d.put_raw(b"[]") is None
            # A sender-chosen type never becomes a label of its own.
            assert await d.put_raw({"type": ["x" * 200], "sender": "@a:x", "content": {}}) is None
    assert counter_value(d, "decode_errors_total", "m.key.verification.request") == 4
    assert counter_value(d, "decode_errors_total", "other") == 3
    errors = d.metrics.get("decode_errors_total")
    assert errors is not None
    assert {labels for labels in errors.series()} == {("m.key.verification.request",), ("other",)}
    records = [r for r in caplog.records if r.name == "bot_toolkit.dispatcher"]
    assert all(r.levelno == logging.WARNING for r in records)
    assert isinstance(records[0].args, tuple)  # lazy % formatting
    messages = [r.getMessage() for r in records]
    txn_messages = [m for m in messages if "transaction_id" in m]
    assert len(txn_messages) == 2  # the three identical errors logged once, plus the other one
    assert len(messages) == 5  # + the one with a non-string type
    await assert_no_other_tasks()


@pytest.mark.parametrize("handler_timeout", [None, 5.0])
@pytest.mark.handler_errors
async def test_a_handler_raising_cancelled_error_does_not_kill_its_worker(
    handler_timeout: float | None,
) -> None:
    d = Dispatcher(concurrency=1, handler_timeout=handler_timeout)
    seen: list[str] = []
    failures: list[BaseException] = []

    async def rude(event: Ev) -> None:
        seen.append(event.sender)
        if event.sender == "@rude:x":
            raise asyncio.CancelledError  # nothing cancelled it

    @d.on_error(Exception)
    async def record(event: object, exc: Exception) -> None:
        failures.append(exc)

    d.register(Ev, rude)
    async with d:
        await d.put(Ev("@rude:x"))
        await d.put(Ev("@next:x"))  # only one worker: it must survive to handle this
        assert await d.join(timeout=5)
    assert seen == ["@rude:x", "@next:x"]
    assert [type(f) for f in failures] == [HandlerCancelled]
    errors = d.metrics.get("handler_errors_total")
    assert errors is not None and errors.total() == 1
