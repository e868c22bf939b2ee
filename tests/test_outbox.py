"""Outbox unit tests: a fake transport records requests; time and randomness are injected.

The real homeserver is exercised in ``test_outbox_faults.py``; here every behaviour is checked
without network (the HttpTransport tests at the end use a throwaway aiohttp server on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
from collections import Counter as Multiset
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import (
    HttpTransport,
    Outbox,
    OutboxClosed,
    OutboxFull,
    OutboxSendFailed,
    PermanentSendError,
    ToDeviceMessages,
    TransientSendError,
    _pack,
)
from bot_toolkit.store import Store, StoreError

Outcome = BaseException | None
Decide = Callable[[str, str, int], Outcome | Awaitable[Outcome]]


class FakeTransport:
    """Records every attempt; ``decide(event_type, txn_id, attempt)`` picks the outcome."""

    def __init__(self, decide: Decide | None = None, *, delay: float = 0.0) -> None:
        self.decide = decide
        self.delay = delay
        self.calls: list[tuple[str, str, dict[str, dict[str, Any]]]] = []
        self.accepted: list[tuple[str, str, dict[str, dict[str, Any]]]] = []
        self.attempts: Multiset[str] = Multiset()
        self.in_flight = 0
        self.max_in_flight = 0
        self.before: Callable[[str, str, ToDeviceMessages], Awaitable[None]] | None = None
        self.spans: dict[str, tuple[int, int]] = {}
        self._tick = 0

    async def send_to_device(
        self, event_type: str, txn_id: str, messages: ToDeviceMessages
    ) -> None:
        copy = {u: dict(d) for u, d in messages.items()}
        self.calls.append((event_type, txn_id, copy))
        self.attempts[txn_id] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._tick += 1
        start = self._tick
        try:
            if self.before is not None:
                await self.before(event_type, txn_id, messages)
            await asyncio.sleep(self.delay)
            outcome: Any = None
            if self.decide is not None:
                outcome = self.decide(event_type, txn_id, self.attempts[txn_id])
                if asyncio.iscoroutine(outcome):
                    outcome = await outcome
            if outcome is not None:
                raise outcome
            self.accepted.append((event_type, txn_id, copy))
            self._tick += 1
            self.spans[txn_id] = (start, self._tick)
        finally:
            self.in_flight -= 1


class FakeTime:
    """An injected clock and sleep: sleeping records the delay and advances the clock at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


class ManualTime:
    """An injected clock and sleep where time moves only when the test calls :meth:`advance`.

    A sleeper waits until the clock reaches its wake-up time, so the test can look at the outbox
    while requests are held back (``FakeTime`` moves the clock at once, before anything else runs).
    :meth:`until` waits, bounded, for a condition that sleepers or :meth:`poke` make true.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Condition()

    def clock(self) -> float:
        return self.now

    @property
    def sleeping(self) -> int:
        return sum(not fut.done() for _, fut in self._sleepers)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, fut))
        self._wake_due()
        await self.poke()
        await fut

    async def poke(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)

    def advance(self, delta: float) -> None:
        self.now += delta
        self._wake_due()

    def _wake_due(self) -> None:
        for wake_at, fut in self._sleepers:
            if wake_at <= self.now and not fut.done():
                fut.set_result(None)


class Sink:
    def __init__(self) -> None:
        self.events: list[object] = []

    def put_nowait(self, event: object) -> bool:
        self.events.append(event)
        return True


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open_in(tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def make_outbox(
    store: Store, fake_time: FakeTime
) -> AsyncIterator[Callable[..., Awaitable[Outbox]]]:
    made: list[Outbox] = []

    async def make(transport: Any, **kw: Any) -> Outbox:
        kw.setdefault("clock", fake_time.clock)
        kw.setdefault("sleep", fake_time.sleep)
        kw.setdefault("rng", random.Random(7))
        kw.setdefault("metrics", Metrics())
        ob = Outbox(transport, kw.pop("store", store), **kw)
        await ob.start()
        made.append(ob)
        return ob

    yield make
    for ob in made:
        await ob.close(deadline=1.0)


def devices(
    n_users: int, per_user: int, content: Callable[[int], Any] = lambda i: {"n": i}
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    i = 0
    for u in range(n_users):
        user = f"@u{u}:example.org"
        out[user] = {}
        for d in range(per_user):
            out[user][f"DEV{d}"] = content(i)
            i += 1
    return out


def flatten(
    calls: list[tuple[str, str, dict[str, dict[str, Any]]]],
) -> list[tuple[str, str, str, str]]:
    return [
        (etype, user, dev, json.dumps(content, sort_keys=True))
        for etype, _txn, msgs in calls
        for user, devs in msgs.items()
        for dev, content in devs.items()
    ]


async def rows(store: Store) -> list[tuple[Any, ...]]:
    return await store.fetchall("SELECT txn_id, event_type FROM outbox_requests ORDER BY seq")


# ------------------------------------------------------------------ batching


async def test_10000_messages_to_10000_devices_in_40_requests(make_outbox: Any) -> None:
    t = FakeTransport()
    metrics = Metrics()
    ob = await make_outbox(t, metrics=metrics)
    msgs = devices(100, 100)  # 10,000 distinct (user, device) pairs
    txns = await ob.send("m.room.encrypted", msgs)
    assert await ob.flush(10)
    assert len(t.calls) == math.ceil(10_000 / 250) == 40
    assert len(set(txns)) == 40 and {c[1] for c in t.calls} == set(txns)
    assert all(sum(len(d) for d in c[2].values()) <= 250 for c in t.calls)
    sent = flatten(t.calls)
    assert len(sent) == 10_000 and len(set(sent)) == 10_000
    expected = {
        ("m.room.encrypted", u, d, json.dumps(c, sort_keys=True))
        for u, ds in msgs.items()
        for d, c in ds.items()
    }
    assert set(sent) == expected
    assert metrics.get("outbox_requests_sent_total").get("m.room.encrypted") == 40  # type: ignore[union-attr]
    assert metrics.get("outbox_messages_total").get("m.room.encrypted") == 10_000  # type: ignore[union-attr]
    assert metrics.get("outbox_queue_depth").get() == 0  # type: ignore[union-attr]


async def test_batch_size_is_configurable_and_types_never_mix(make_outbox: Any) -> None:
    t = FakeTransport()
    ob = await make_outbox(t, batch_size=7)
    await asyncio.gather(
        ob.send("m.dummy", devices(5, 10)),  # 50 messages -> 8 requests
        ob.send("org.example.ping", devices(3, 3)),  # 9 messages -> 2 requests
    )
    assert await ob.flush(5)
    by_type = Multiset(c[0] for c in t.calls)
    assert by_type == {"m.dummy": 8, "org.example.ping": 2}
    assert all(sum(len(d) for d in c[2].values()) <= 7 for c in t.calls)
    assert len(flatten(t.calls)) == 59


async def test_concurrent_sends_share_requests_and_one_commit(
    make_outbox: Any, store: Store
) -> None:
    t = FakeTransport()
    ob = await make_outbox(t)
    before = store.commits
    # 1,000 callers, one message each, arriving together: one commit, packed into 4 requests.
    results = await asyncio.gather(
        *(ob.send("m.dummy", {f"@u{i}:x": {"D": {"i": i}}}) for i in range(1000))
    )
    assert store.commits == before + 1
    assert all(len(r) == 1 for r in results)
    assert len({r[0] for r in results}) == 4
    assert await ob.flush(5)
    assert len(t.calls) == 4
    assert sorted(c["i"] for _, _, m in t.calls for ds in m.values() for c in ds.values()) == list(
        range(1000)
    )


async def test_writes_are_batched_never_one_commit_per_message(
    make_outbox: Any, store: Store
) -> None:
    t = FakeTransport()
    ob = await make_outbox(t)
    before = store.commits
    await ob.send("m.dummy", devices(50, 200))  # 10,000 messages in one call
    assert store.commits == before + 1
    assert await ob.flush(10)
    # 40 requests were stored in one commit and deleted in a few batched ones.
    assert store.commits - before <= 10, store.commits - before
    assert await rows(store) == []


# ------------------------------------------------------------------ retries


async def test_retries_reuse_the_transaction_id(make_outbox: Any, fake_time: FakeTime) -> None:
    outcomes = {
        1: TransientSendError("5xx", detail="502"),
        2: TransientSendError("connection", detail="reset"),
        3: TransientSendError("timeout"),
    }
    t = FakeTransport(lambda _e, _t, n: outcomes.get(n))
    metrics = Metrics()
    ob = await make_outbox(t, metrics=metrics)
    [txn] = await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert await ob.flush(5)
    assert [c[1] for c in t.calls] == [txn] * 4
    retries = metrics.get("outbox_retries_total")
    assert retries is not None
    assert retries.series() == {("5xx",): 1, ("connection",): 1, ("timeout",): 1}
    assert len(fake_time.sleeps) == 3


async def test_429_retry_after_is_honoured(make_outbox: Any, fake_time: FakeTime) -> None:
    t = FakeTransport(lambda _e, _t, n: TransientSendError("429", 7.5) if n == 1 else None)
    metrics = Metrics()
    ob = await make_outbox(t, metrics=metrics, backoff_initial=0.1)
    [txn] = await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert await ob.flush(5)
    assert fake_time.sleeps == [7.5]  # max(retry_after, backoff <= 0.1)
    assert [c[1] for c in t.calls] == [txn, txn]
    assert metrics.get("outbox_retries_total").get("429") == 1  # type: ignore[union-attr]


async def test_429_holds_back_other_requests_too(make_outbox: Any) -> None:
    mt = ManualTime()
    first = True

    def decide(_e: str, _t: str, _n: int) -> Outcome:
        nonlocal first
        if first:
            first = False
            return TransientSendError("429", 3.0)
        return None

    starts: list[tuple[str, float]] = []  # (txn_id, clock) at the start of every attempt

    async def record(_e: str, txn: str, _m: ToDeviceMessages) -> None:
        starts.append((txn, mt.now))
        await mt.poke()

    t = FakeTransport(decide)
    t.before = record
    # Two workers: one is free to take the second request while the first waits out its 429.
    ob = await make_outbox(
        t, concurrency=2, clock=mt.clock, sleep=mt.sleep, backoff_initial=0.01, backoff_max=0.01
    )
    [limited] = await ob.send("m.dummy", {"@a:x": {"A": {}}, "@b:x": {"B": {}}})
    await mt.until(lambda: mt.sleeping == 1)  # it was answered 429 and waits for its retry
    [other] = await ob.send("m.dummy", {"@c:x": {"C": {}}})  # no device in common
    await mt.until(lambda: mt.sleeping == 2 or t.attempts[other] > 0)
    assert t.attempts[other] == 0, "another request went out while the 429 was in force"
    mt.advance(3.0)
    assert await ob.flush(5)
    # The rate-limited request waited 3 s, and so did the other request's first attempt.
    assert mt.sleeps == [3.0, 3.0]
    assert starts[0] == (limited, 0.0)
    other_first = next(at for txn, at in starts if txn == other)
    assert other_first >= 3.0
    assert sorted(txn for txn, _ in starts) == sorted([limited, limited, other])


async def test_backoff_grows_with_jitter_under_the_ceiling(
    make_outbox: Any, fake_time: FakeTime
) -> None:
    t = FakeTransport(lambda _e, _t, n: TransientSendError("5xx") if n <= 12 else None)
    ob = await make_outbox(t, backoff_initial=0.5, backoff_max=8.0)
    await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert await ob.flush(5)
    assert len(fake_time.sleeps) == 12
    for n, delay in enumerate(fake_time.sleeps, start=1):
        cap = min(8.0, 0.5 * 2 ** (n - 1))
        assert cap / 2 <= delay <= cap, (n, delay)
    assert max(fake_time.sleeps) <= 8.0
    assert len(set(fake_time.sleeps)) == 12  # jittered, not a fixed schedule


async def test_timeouts_and_raw_connection_errors_are_retried(make_outbox: Any) -> None:
    async def decide(_e: str, _t: str, n: int) -> Outcome:
        if n == 1:
            await asyncio.sleep(30)  # hangs: the outbox's request_timeout cuts it
        if n == 2:
            return aiohttp.ServerDisconnectedError()
        if n == 3:
            return ConnectionResetError("reset by peer")
        if n == 4:
            return aiohttp.ClientPayloadError("truncated")
        return None

    t = FakeTransport(decide)
    metrics = Metrics()
    ob = await make_outbox(t, metrics=metrics, request_timeout=0.05)
    [txn] = await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert await ob.flush(5)
    assert [c[1] for c in t.calls] == [txn] * 5
    assert metrics.get("outbox_retries_total").series() == {  # type: ignore[union-attr]
        ("timeout",): 1,
        ("connection",): 3,
    }


async def test_permanent_4xx_is_not_retried_counted_logged_and_surfaced(
    make_outbox: Any, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    bad: set[str] = set()

    def decide(_e: str, txn: str, _n: int) -> Outcome:
        return PermanentSendError(400, "M_BAD_JSON", "no good") if txn in bad else None

    t = FakeTransport(decide)
    sink = Sink()
    metrics = Metrics()
    ob = await make_outbox(t, metrics=metrics, dispatcher=sink)
    t.before = None
    gate = asyncio.Event()

    async def hold(_e: str, txn: str, _m: ToDeviceMessages) -> None:
        await gate.wait()

    t.before = hold
    [txn_bad] = await ob.send("m.custom", {"@a:x": {"D1": {"k": 1}, "D2": {"k": 2}}})
    [txn_ok] = await ob.send("m.other", {"@b:x": {"E": {}}})
    bad.add(txn_bad)
    gate.set()
    with caplog.at_level(logging.ERROR, logger="bot_toolkit.outbox"):
        assert await ob.flush(5)
    assert t.attempts[txn_bad] == 1 and t.attempts[txn_ok] == 1
    assert metrics.get("outbox_permanent_failures_total").series() == {  # type: ignore[union-attr]
        ("m.custom", "400"): 1
    }
    assert metrics.get("outbox_retries_total").total() == 0  # type: ignore[union-attr]
    assert sink.events == [
        OutboxSendFailed(
            event_type="m.custom",
            txn_id=txn_bad,
            status=400,
            errcode="M_BAD_JSON",
            error="no good",
            recipients=(("@a:x", "D1"), ("@a:x", "D2")),
        )
    ]
    record = next(r for r in caplog.records if txn_bad in r.getMessage())
    assert "M_BAD_JSON" in record.getMessage() and "no good" in record.getMessage()
    assert "m.custom" in record.getMessage()
    assert await rows(store) == []


async def test_send_failed_reaches_real_dispatcher_handlers(make_outbox: Any) -> None:
    got: list[OutboxSendFailed] = []
    dispatcher = Dispatcher()

    @dispatcher.on(OutboxSendFailed)
    async def on_failed(event: OutboxSendFailed) -> None:
        got.append(event)

    await dispatcher.start()
    t = FakeTransport(lambda *_: PermanentSendError(403, "M_FORBIDDEN", "nope"))
    ob = await make_outbox(t, dispatcher=dispatcher)
    [txn] = await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert await ob.flush(5)
    await dispatcher.close(5)
    assert [(e.txn_id, e.status, e.errcode) for e in got] == [(txn, 403, "M_FORBIDDEN")]


# ------------------------------------------------------------------ concurrency and order


async def test_concurrency_bound_is_respected(make_outbox: Any) -> None:
    bound, total = 5, 100
    t = FakeTransport()
    pool_full = asyncio.Condition()
    gave_up: list[str] = []

    async def hold(_e: str, txn: str, _m: ToDeviceMessages) -> None:
        # Every attempt waits until `bound` attempts are in flight together (or every request
        # has started, at the tail), so the outbox is always pushed to its limit and an outbox
        # that allows more than `bound` gets to show it before anything finishes.
        def full() -> bool:
            return t.in_flight >= bound or len(t.calls) == total

        if gave_up:
            return
        async with pool_full:
            pool_full.notify_all()
            try:
                async with asyncio.timeout(5):
                    await pool_full.wait_for(full)
            except TimeoutError:
                gave_up.append(txn)  # bounded: the assertions below report it

    t.before = hold
    ob = await make_outbox(t, batch_size=1, concurrency=bound)
    await ob.send("m.dummy", devices(10, 10))  # 100 independent requests
    assert await ob.flush(30)
    assert gave_up == [], f"never {bound} attempts in flight at once (max {t.max_in_flight})"
    assert len(t.calls) == total
    assert t.max_in_flight == bound


async def test_same_device_requests_go_in_order_others_in_parallel(make_outbox: Any) -> None:
    t = FakeTransport()
    overlapped = asyncio.Event()
    timed_out: list[str] = []

    async def hold(_e: str, txn: str, _m: ToDeviceMessages) -> None:
        # Attempts wait (bounded) until two are in flight together: requests with no device in
        # common must be able to overlap. After that, nothing is held.
        if t.in_flight >= 2:
            overlapped.set()
        try:
            async with asyncio.timeout(5):
                await overlapped.wait()
        except TimeoutError:
            timed_out.append(txn)
            overlapped.set()  # report it below instead of stalling every later attempt

    t.before = hold
    ob = await make_outbox(t, batch_size=2, concurrency=10)
    # Ten sends to the same three devices, mixing two event types, all arriving together.
    await asyncio.gather(
        *(
            ob.send(
                "m.a" if i % 3 else "m.b", {"@u:x": {"A": {"i": i}, "B": {"i": i}, "C": {"i": i}}}
            )
            for i in range(10)
        )
    )
    assert await ob.flush(10)
    per_device: dict[str, list[tuple[int, int, int]]] = {}
    for _etype, txn, msgs in t.accepted:
        for dev, content in msgs["@u:x"].items():
            per_device.setdefault(dev, []).append((*t.spans[txn], content["i"]))
    for dev, seen in per_device.items():
        assert [i for _, _, i in seen] == list(range(10)), dev  # delivered in send() order
        for (_, end, _), (start, _, _) in itertools.pairwise(seen):
            assert end < start, dev  # the next one started only after the previous ended
    assert timed_out == [], "no two requests were ever in flight together"
    assert t.max_in_flight >= 2  # requests with no device in common overlapped


# ------------------------------------------------------------------ persistence


async def test_request_is_persisted_before_its_first_attempt(
    make_outbox: Any, store: Store
) -> None:
    checked: list[str] = []

    async def before(event_type: str, txn_id: str, messages: ToDeviceMessages) -> None:
        got = await store.fetchall(
            "SELECT event_type, messages FROM outbox_requests WHERE txn_id = ?", (txn_id,)
        )
        assert got, f"{txn_id} sent before it was stored"
        assert got[0][0] == event_type
        assert json.loads(got[0][1]) == messages
        checked.append(txn_id)

    fail_once = FakeTransport(lambda _e, _t, n: TransientSendError("5xx") if n == 1 else None)
    fail_once.before = before
    ob = await make_outbox(fail_once, batch_size=3)
    txns = await ob.send("m.dummy", devices(2, 4))
    assert await ob.flush(5)
    assert sorted(checked) == sorted(txns * 2)  # stored on the first attempt and the retry
    assert await rows(store) == []  # removed once accepted


async def test_restart_sends_unsent_requests_with_original_ids(
    make_outbox: Any, store: Store
) -> None:
    async def hang(*_: Any) -> Outcome:
        await asyncio.sleep(60)
        return None

    first = await make_outbox(FakeTransport(hang))
    txns = await first.send("m.dummy", devices(3, 100))  # 300 messages -> 2 requests
    assert len(txns) == 2
    assert await first.close(deadline=0.05) == 2
    assert [r[0] for r in await rows(store)] == txns

    t = FakeTransport()
    second = Outbox(t, store, Metrics())
    assert await second.start() == 2
    assert await second.flush(5)
    await second.close()
    assert [c[1] for c in t.calls] == txns
    assert len(set(flatten(t.calls))) == 300
    assert await rows(store) == []


async def test_caller_txn_id_is_one_request_of_its_own_and_idempotent(
    make_outbox: Any, store: Store
) -> None:
    release = asyncio.Event()

    async def held(*_: Any) -> Outcome:
        await release.wait()
        return None

    t = FakeTransport(held)
    ob = await make_outbox(t)
    mine, other = await asyncio.gather(
        ob.send("m.room_key.withheld", {"@a:x": {"A": {"code": "m.no_olm"}}}, txn_id="ledger-1"),
        ob.send("m.room_key.withheld", {"@b:x": {"B": {"code": "m.no_olm"}}}),
    )
    assert mine == ["ledger-1"]
    assert other != ["ledger-1"]  # never packed together with a caller's own id
    # A repeat while it is still queued adds nothing: not to the store, not to the wire.
    assert await ob.send(
        "m.room_key.withheld", {"@a:x": {"A": {"code": "m.no_olm"}}}, txn_id="ledger-1"
    ) == ["ledger-1"]
    assert sorted(r[0] for r in await rows(store)) == sorted(["ledger-1", *other])
    release.set()
    assert await ob.flush(5)
    assert t.attempts["ledger-1"] == 1
    assert [c[2] for c in t.calls if c[1] == "ledger-1"] == [{"@a:x": {"A": {"code": "m.no_olm"}}}]


async def test_caller_txn_id_survives_a_restart(make_outbox: Any, store: Store) -> None:
    async def hang(*_: Any) -> Outcome:
        await asyncio.sleep(60)
        return None

    first = await make_outbox(FakeTransport(hang))
    await first.send("m.dummy", {"@a:x": {"A": {}}}, txn_id="mine-7")
    assert await first.close(deadline=0.05) == 1

    t = FakeTransport()
    second = Outbox(t, store, Metrics())
    assert await second.start() == 1
    # The caller (after its own crash) sends again with the recorded id: still one request.
    assert await second.send("m.dummy", {"@a:x": {"A": {}}}, txn_id="mine-7") == ["mine-7"]
    assert await second.flush(5)
    await second.close()
    assert [c[1] for c in t.calls] == ["mine-7"]


async def test_caller_txn_id_resent_after_acceptance_reuses_the_id(make_outbox: Any) -> None:
    t = FakeTransport()
    ob = await make_outbox(t)
    for _ in range(2):
        assert await ob.send("m.dummy", {"@a:x": {"A": {}}}, txn_id="again") == ["again"]
        assert await ob.flush(5)
    # The homeserver de-duplicates the second PUT: what matters is that the id is the same.
    assert [c[1] for c in t.calls] == ["again", "again"]


async def test_caller_txn_id_is_validated(make_outbox: Any) -> None:
    ob = await make_outbox(FakeTransport(), batch_size=2)
    with pytest.raises(ValueError, match="txn_id"):
        await ob.send("m.dummy", {"@a:x": {"A": {}}}, txn_id="")
    with pytest.raises(ValueError, match="do not fit one request"):
        await ob.send("m.dummy", devices(1, 3), txn_id="too-big")


async def test_oldest_pending_age_follows_the_oldest_request(
    make_outbox: Any, fake_time: FakeTime
) -> None:
    release = asyncio.Event()

    async def held(*_: Any) -> Outcome:
        await release.wait()
        return None

    fake_time.now = 100.0  # ages are differences, not clock readings
    ob = await make_outbox(FakeTransport(held))
    assert ob.oldest_pending_age() is None
    await ob.send("m.dummy", {"@a:x": {"A": {}}})
    fake_time.now += 30.0
    await ob.send("m.dummy", {"@b:x": {"B": {}}})
    fake_time.now += 12.5
    assert ob.oldest_pending_age() == 42.5
    release.set()
    assert await ob.flush(5)
    assert ob.oldest_pending_age() is None


async def test_shutdown_deadline_leaves_the_rest_persisted(
    make_outbox: Any, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = asyncio.Event()  # set after each commit of the store
    real_transaction = store.transaction

    @contextlib.asynccontextmanager
    async def noted_transaction() -> AsyncIterator[Any]:
        async with real_transaction() as conn:
            yield conn
        committed.set()

    monkeypatch.setattr(store, "transaction", noted_transaction)
    accepted = 0
    three_accepted = asyncio.Event()
    never = asyncio.Event()

    async def some(*_: Any) -> Outcome:
        nonlocal accepted
        if accepted < 3:
            accepted += 1
            return None
        # One request at a time: the 4th attempt starts only after the 3rd was accepted.
        three_accepted.set()
        await never.wait()  # hangs until close() cancels it
        return None

    t = FakeTransport(some)
    ob = await make_outbox(t, batch_size=1, concurrency=1)
    txns = await ob.send("m.dummy", devices(1, 10))
    assert len(txns) == 10
    async with asyncio.timeout(10):
        await three_accepted.wait()
        # ... and their deletions are committed: read the store again after each commit.
        while True:
            committed.clear()
            if [r[0] for r in await rows(store)] == txns[3:]:
                break
            await committed.wait()
    # Nothing can finish in the deadline now: close() has only to stop and keep the rest.
    assert await ob.close(deadline=0.05) == 7
    with pytest.raises(OutboxClosed):
        await ob.send("m.dummy", {"@a:x": {"D": {}}})
    left = [r[0] for r in await rows(store)]
    assert left == txns[3:]
    # A restart sends exactly the rest.
    t2 = FakeTransport()
    again = Outbox(t2, store, Metrics())
    assert await again.start() == 7
    assert await again.flush(5)
    await again.close()
    assert [c[1] for c in t2.calls] == txns[3:]


async def test_crash_between_accept_and_delete_resends_same_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The homeserver accepted, then the process died before the deletion was committed.

    The restart must send the same transaction id again (the homeserver drops it as a repeat).
    """
    store = await Store.open_in(tmp_path)
    write_failed = asyncio.Event()
    real_transaction = store.transaction

    @contextlib.asynccontextmanager
    async def noted_transaction() -> AsyncIterator[Any]:
        try:
            async with real_transaction() as conn:
                yield conn
        except StoreError:
            write_failed.set()
            raise

    monkeypatch.setattr(store, "transaction", noted_transaction)
    t = FakeTransport()
    ob = Outbox(t, store, Metrics())
    await ob.start()
    gate = asyncio.Event()

    async def hold(*_: Any) -> None:
        await gate.wait()

    t.before = hold
    [txn] = await ob.send("m.dummy", {"@a:x": {"D": {"v": 1}}})
    await store.close()  # "crash": the deletion after the 200 can no longer be written
    gate.set()
    async with asyncio.timeout(10):
        await write_failed.wait()  # accepted, then its deletion failed
    assert [c[1] for c in t.accepted] == [txn]
    assert not await ob.flush(0.3)  # the deletion is still owed: never idle
    await ob.close(deadline=0.1)

    store2 = await Store.open_in(tmp_path)
    t2 = FakeTransport()
    ob2 = Outbox(t2, store2, Metrics())
    assert await ob2.start() == 1
    assert await ob2.flush(5)
    await ob2.close()
    await store2.close()
    assert [c[1] for c in t2.calls] == [txn]


# ------------------------------------------------------------------ API edges


async def test_send_validates_and_refuses_when_not_running(make_outbox: Any, store: Store) -> None:
    fresh = Outbox(FakeTransport(), store)
    with pytest.raises(OutboxClosed):
        await fresh.send("m.dummy", {"@a:x": {"D": {}}})
    ob = await make_outbox(FakeTransport())
    assert await ob.send("m.dummy", {}) == []
    assert await ob.send("m.dummy", {"@a:x": {}}) == []
    with pytest.raises(ValueError, match="event_type"):
        await ob.send("", {"@a:x": {"D": {}}})
    with pytest.raises(ValueError, match="messages"):
        await ob.send("m.dummy", {"@a:x": {"D": "not an object"}})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        await ob.send("m.dummy", {"@a:x": {"D": {"x": object()}}})
    with pytest.raises(RuntimeError):
        await ob.start()


async def test_messages_are_copied_at_send(make_outbox: Any) -> None:
    t = FakeTransport()
    ob = await make_outbox(t)
    content = {"v": 1}
    msgs = {"@a:x": {"D": content}}
    await ob.send("m.dummy", msgs)
    content["v"] = 2
    msgs["@a:x"]["E"] = {"v": 3}
    assert await ob.flush(5)
    assert t.calls[0][2] == {"@a:x": {"D": {"v": 1}}}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["m.a", "m.b"]),
            st.dictionaries(
                st.sampled_from(["@u1:x", "@u2:x", "@u3:x"]),
                st.dictionaries(st.sampled_from(list("ABCDEFGH")), st.just(None), max_size=8),
                max_size=3,
            ),
        ),
        max_size=25,
    ),
    st.integers(min_value=1, max_value=6),
)
def test_pack_properties(subs: list[tuple[str, dict[str, dict[str, Any]]]], batch: int) -> None:
    # Tag every message with its submission index so it can be followed.
    tagged = [
        (etype, {u: {d: {"sub": i} for d in ds} for u, ds in msgs.items()})
        for i, (etype, msgs) in enumerate(subs)
    ]
    planned, used_by = _pack(tagged, batch)
    placed: dict[tuple[int, str, str], int] = {}
    for idx, req in enumerate(planned):
        assert 1 <= req.count <= batch
        assert req.count == sum(len(d) for d in req.messages.values())
        for u, ds in req.messages.items():
            for d, c in ds.items():
                key = (c["sub"], u, d)
                assert key not in placed  # exactly once
                placed[key] = idx
                assert tagged[c["sub"]][0] == req.event_type  # one event type per request
    expected = {
        (i, u, d) for i, (_, msgs) in enumerate(tagged) for u, ds in msgs.items() for d in ds
    }
    assert set(placed) == expected
    # Per device, requests follow submission order.
    by_device: dict[tuple[str, str], list[int]] = {}
    for (_i, u, d), idx in sorted(placed.items()):
        by_device.setdefault((u, d), []).append(idx)
    assert all(idxs == sorted(idxs) and len(set(idxs)) == len(idxs) for idxs in by_device.values())
    for i, used in enumerate(used_by):
        assert set(used) == {idx for (s, _, _), idx in placed.items() if s == i}
    # A single submission packs into the minimum number of requests.
    if len(tagged) == 1:
        n = len(expected)
        assert len(planned) == math.ceil(n / batch)


@pytest.mark.parametrize(
    ("n", "batch"), [(1, 1), (1, 250), (7, 1), (7, 3), (9, 3), (10, 4), (250, 250), (251, 250)]
)
def test_pack_one_submission_uses_the_fewest_requests(n: int, batch: int) -> None:
    msgs: dict[str, dict[str, Any]] = {f"@u{i % 3}:x": {} for i in range(n)}
    for i in range(n):
        msgs[f"@u{i % 3}:x"][f"D{i}"] = {"i": i}
    planned, used_by = _pack([("m.a", msgs)], batch)
    assert len(planned) == math.ceil(n / batch)
    assert [p.count for p in planned] == [batch] * (n // batch) + ([n % batch] if n % batch else [])
    assert used_by == [list(range(len(planned)))]


def test_pack_several_submissions_of_one_type_share_requests() -> None:
    # Ten submissions of three messages each, all to different devices, batch 7: 30 messages fit
    # in ceil(30 / 7) = 5 requests, not one (or more) per submission.
    subs: list[tuple[str, dict[str, dict[str, Any]]]] = [
        ("m.a", {f"@u{k}:x": {f"D{k}_{j}": {} for j in range(3)}}) for k in range(10)
    ]
    planned, used_by = _pack(subs, 7)
    assert len(planned) == 5
    assert [p.count for p in planned] == [7, 7, 7, 7, 2]
    assert any(len(used) > 1 for used in used_by)  # some submission spans two requests
    assert len({i for used in used_by for i in used}) == 5
    # Interleaving a second type keeps each type packed on its own.
    mixed = [(etype, msgs) for _, msgs in subs for etype in ("m.a", "m.b")]
    planned, _ = _pack(mixed, 7)
    assert Multiset(p.event_type for p in planned) == {"m.a": 5, "m.b": 5}


async def test_outbox_packs_several_sends_into_the_fewest_requests(make_outbox: Any) -> None:
    t = FakeTransport()
    ob = await make_outbox(t, batch_size=7)
    results = await asyncio.gather(
        *(ob.send("m.a", {f"@u{k}:x": {f"D{j}": {} for j in range(3)}}) for k in range(10))
    )
    assert await ob.flush(5)
    assert len({txn for r in results for txn in r}) == len(t.calls) == 5
    assert sorted(sum(len(d) for d in c[2].values()) for c in t.calls) == [2, 7, 7, 7, 7]


# ------------------------------------------------------------------ HttpTransport


class FakeHomeserver:
    """A throwaway aiohttp app on 127.0.0.1 answering from a queue of canned responses."""

    def __init__(self) -> None:
        self.answers: deque[Callable[[web.Request], Awaitable[web.StreamResponse]]] = deque()
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            (request.raw_path, request.headers.get("Authorization", ""), await request.json())
        )
        answer = self.answers.popleft() if self.answers else None
        if answer is None:
            return web.json_response({})
        return await answer(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("PUT", "/{tail:.*}", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def homeserver() -> AsyncIterator[FakeHomeserver]:
    hs = FakeHomeserver()
    await hs.start()
    yield hs
    assert hs.runner is not None
    await hs.runner.cleanup()


def reply(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    async def answer(_r: web.Request) -> web.StreamResponse:
        if isinstance(body, str):
            return web.Response(status=status, text=body, headers=headers)
        return web.json_response(body or {}, status=status, headers=headers)

    return answer


TOKEN = "syt_secret_token_value"


async def test_http_transport_request_shape(homeserver: FakeHomeserver) -> None:
    async with HttpTransport(homeserver.url + "/", TOKEN) as tr:
        await tr.send_to_device("m.key/odd type", "bt1/2", {"@a:x": {"D": {"k": "v"}}})
    path, auth, body = homeserver.seen[0]
    assert path == "/_matrix/client/v3/sendToDevice/m.key%2Fodd%20type/bt1%2F2"
    assert auth == f"Bearer {TOKEN}"
    assert body == {"messages": {"@a:x": {"D": {"k": "v"}}}}
    assert TOKEN not in repr(tr)


async def test_http_transport_classifies_answers(homeserver: FakeHomeserver) -> None:
    hs = homeserver
    hs.answers.extend(
        [
            reply(429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1500}),
            reply(429, {"errcode": "M_LIMIT_EXCEEDED"}, {"Retry-After": "4"}),
            reply(500, {"errcode": "M_UNKNOWN"}),
            reply(502, "<html>bad gateway</html>"),
            reply(400, {"errcode": "M_BAD_JSON", "error": "Content not JSON"}),
            reply(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid token"}),
            reply(404, "not json"),
        ]
    )
    async with aiohttp.ClientSession() as session:
        tr = HttpTransport(hs.url, TOKEN, session)
        msgs = {"@a:x": {"D": {}}}
        with pytest.raises(TransientSendError) as e1:
            await tr.send_to_device("m.dummy", "t1", msgs)
        assert (e1.value.reason, e1.value.retry_after) == ("429", 1.5)
        with pytest.raises(TransientSendError) as e2:
            await tr.send_to_device("m.dummy", "t2", msgs)
        assert (e2.value.reason, e2.value.retry_after) == ("429", 4.0)
        for txn in ("t3", "t4"):
            with pytest.raises(TransientSendError) as e3:
                await tr.send_to_device("m.dummy", txn, msgs)
            assert e3.value.reason == "5xx"
        with pytest.raises(PermanentSendError) as p1:
            await tr.send_to_device("m.dummy", "t5", msgs)
        assert (p1.value.status, p1.value.errcode, p1.value.error) == (
            400,
            "M_BAD_JSON",
            "Content not JSON",
        )
        with pytest.raises(PermanentSendError) as p2:
            await tr.send_to_device("m.dummy", "t6", msgs)
        assert p2.value.status == 401
        with pytest.raises(PermanentSendError) as p3:
            await tr.send_to_device("m.dummy", "t7", msgs)
        assert (p3.value.status, p3.value.errcode) == (404, None)
        await tr.send_to_device("m.dummy", "t8", msgs)  # 200
        await tr.close()  # a given session is left open
        assert not session.closed


async def test_http_transport_connection_failures_and_timeouts(homeserver: FakeHomeserver) -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def stall(_r: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1)
        return web.json_response({})

    # aiohttp itself resends an idempotent PUT once when the connection drops (same txn id, so
    # harmless); drop twice to see the error.
    homeserver.answers.extend([drop, drop, stall])
    msgs = {"@a:x": {"D": {}}}
    async with HttpTransport(homeserver.url, TOKEN, timeout=0.3) as tr:
        with pytest.raises(TransientSendError) as e1:
            await tr.send_to_device("m.dummy", "t1", msgs)
        assert e1.value.reason == "connection"
        with pytest.raises(TransientSendError) as e2:
            await tr.send_to_device("m.dummy", "t2", msgs)
        assert e2.value.reason == "timeout"
    # Nothing listens on a port we just closed.
    sock_port = int(homeserver.url.rsplit(":", 1)[1])
    assert homeserver.runner is not None
    await homeserver.runner.cleanup()
    async with HttpTransport(f"http://127.0.0.1:{sock_port}", TOKEN) as tr:
        with pytest.raises(TransientSendError) as e3:
            await tr.send_to_device("m.dummy", "t3", msgs)
        assert e3.value.reason == "connection"
        assert TOKEN not in str(e3.value)
    homeserver.runner = web.AppRunner(web.Application())
    await homeserver.runner.setup()


async def test_outbox_over_http_never_logs_the_token(
    homeserver: FakeHomeserver, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    homeserver.answers.extend(
        [reply(500, {"errcode": "M_UNKNOWN"}), reply(403, {"errcode": "M_FORBIDDEN", "error": "x"})]
    )
    caplog.set_level(logging.DEBUG)
    async with HttpTransport(homeserver.url, TOKEN) as tr:
        ob = Outbox(tr, store, Metrics(), backoff_initial=0.01, backoff_max=0.02)
        await ob.start()
        await ob.send("m.dummy", {"@a:x": {"D": {"secret": "content"}}})
        await ob.send("m.dummy", {"@a:x": {"D": {"second": 1}}})
        assert await ob.flush(5)
        await ob.close()
    assert TOKEN not in caplog.text
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bot_toolkit"))
    assert "M_FORBIDDEN" in ours
    assert "content" not in ours  # message contents are never logged by bot_toolkit


async def test_store_failure_fails_the_send_and_queues_nothing(tmp_path: Path) -> None:
    store = await Store.open_in(tmp_path)
    t = FakeTransport()
    ob = Outbox(t, store, Metrics())
    await ob.start()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert ob.queue_depth == 0
    assert await ob.flush(1)
    assert t.calls == []
    await ob.close(deadline=0.1)


async def test_close_is_idempotent_and_concurrent_closes_agree(make_outbox: Any) -> None:
    async def hang(*_: Any) -> Outcome:
        await asyncio.sleep(60)
        return None

    ob = await make_outbox(FakeTransport(hang))
    await ob.send("m.dummy", {"@a:x": {"D": {}}})
    assert await asyncio.gather(ob.close(deadline=0.05), ob.close(deadline=0.05)) == [1, 1]
    assert await ob.close() == 1


async def test_metric_names_and_labels(make_outbox: Any) -> None:
    metrics = Metrics()
    t = FakeTransport(
        lambda e, _t, n: (
            PermanentSendError(400, "M_X", "x")
            if e == "m.bad"
            else TransientSendError("429", 0.01)
            if n == 1
            else None
        )
    )
    ob = await make_outbox(t, metrics=metrics)
    await ob.send("m.good", {"@a:x": {"D": {}, "E": {}}})
    await ob.send("m.bad", {"@a:x": {"F": {}}})
    assert await ob.flush(5)
    text = metrics.render()
    for line in [
        "bot_toolkit_outbox_queue_depth 0",
        'bot_toolkit_outbox_requests_sent_total{event_type="m.good"} 1',
        'bot_toolkit_outbox_retries_total{reason="429"} 1',
        'bot_toolkit_outbox_permanent_failures_total{event_type="m.bad",status="400"} 1',
        'bot_toolkit_outbox_messages_total{event_type="m.good"} 2',
    ]:
        assert line in text.splitlines(), (line, text)


# ------------------------------------------------------------------------------ the bound


async def test_full_outbox_refuses_loudly_and_drops_nothing(
    make_outbox: Any, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The homeserver keeps failing: the outbox fills to its bound, then ``send()`` raises
    ``OutboxFull`` (counted, logged, ``is_full``/gauge set) while everything queued stays; once
    the homeserver is back, every queued message goes out and the outbox is no longer full."""
    healthy = asyncio.Event()

    async def failing(*_: Any) -> Outcome:
        if healthy.is_set():
            return None
        return TransientSendError("5xx", detail="502")

    metrics = Metrics()
    ob = await make_outbox(FakeTransport(failing), max_pending=10, batch_size=3, metrics=metrics)
    for i in range(9):
        await ob.send("m.dummy", {"@u:x": {f"D{i}": {"n": i}}})
    assert ob.pending_messages() == 9 and not ob.is_full()
    with caplog.at_level(logging.ERROR, logger="bot_toolkit.outbox"), pytest.raises(OutboxFull):
        await ob.send("m.dummy", {"@u:x": {"A": {}, "B": {}}})
    assert "refused 2 m.dummy messages" in caplog.text
    assert ob.is_full()
    assert ob.pending_messages() == 9  # nothing of the refused call was queued, nothing dropped
    refused = metrics.get("outbox_refused_messages_total")
    assert refused is not None and refused.total() == 2
    assert "bot_toolkit_outbox_full 1" in metrics.render()
    await ob.send("m.dummy", {"@u:x": {"LAST": {}}})  # one more still fits the bound
    with pytest.raises(OutboxFull):
        await ob.send("m.dummy", {"@u:x": {"X": {}}})
    assert refused.total() == 3

    healthy.set()
    assert await ob.flush(10)
    assert not ob.is_full() and ob.pending_messages() == 0
    assert "bot_toolkit_outbox_full 0" in metrics.render()
    sent = metrics.get("outbox_messages_total")
    assert sent is not None and sent.total() == 10
    assert await rows(store) == []


async def test_one_oversized_call_is_refused_without_marking_the_outbox_full(
    make_outbox: Any,
) -> None:
    ob = await make_outbox(FakeTransport(), max_pending=5)
    with pytest.raises(OutboxFull):
        await ob.send("m.dummy", devices(1, 6))
    assert not ob.is_full()
    assert await ob.send("m.dummy", devices(1, 5))
