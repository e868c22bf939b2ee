"""The shared mechanisms that exist once: BoundedMap, TaskSet, SingleFlight,
DecodeErrorReporter, HookSet (and NioHooks, the nio adapter's hook set on top of it)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from bot_toolkit._bounded import BoundedMap
from bot_toolkit._decode_report import DecodeErrorReporter
from bot_toolkit._nio_adapter import NioHooks
from bot_toolkit._patching import HookSet
from bot_toolkit._single_flight import SingleFlight
from bot_toolkit._tasks import TaskSet
from bot_toolkit.events import DecodeError
from bot_toolkit.metrics import Metrics


def test_bounded_map_evicts_the_least_recently_written_or_touched() -> None:
    m: BoundedMap[str, int] = BoundedMap(3)
    for i, key in enumerate("abc"):
        m[key] = i
    m.touch("a")  # a is now the most recent
    m["d"] = 3  # evicts b
    assert list(m) == ["c", "a", "d"]
    m["c"] = 9  # a write also refreshes
    m["e"] = 4  # evicts a
    assert dict(m) == {"d": 3, "c": 9, "e": 4}
    assert m.pop("d") == 3 and len(m) == 2
    with pytest.raises(ValueError):
        BoundedMap(0)


async def test_task_set_keeps_logs_counts_and_joins(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []
    tasks = TaskSet(logging.getLogger("test.tasks"), "test", errors.append)
    gate = asyncio.Event()

    async def waits() -> None:
        await gate.wait()
        tasks.spawn(asyncio.sleep(0), name="child")  # started by a task: join waits for it too

    async def fails() -> None:
        raise RuntimeError("boom")

    tasks.spawn(waits(), name="waits")
    tasks.spawn(fails(), name="fails")
    assert len(tasks) == 2
    gate.set()
    await asyncio.wait_for(tasks.join(), 5)
    assert len(tasks) == 0
    assert [type(e) for e in errors] == [RuntimeError]
    assert "test task fails failed" in caplog.text
    hang = tasks.spawn(asyncio.Event().wait())
    await asyncio.wait_for(tasks.cancel(), 5)
    assert hang.cancelled() and len(tasks) == 0


async def test_task_set_join_with_a_timeout_cancels_nothing() -> None:
    tasks = TaskSet(logging.getLogger("test.tasks"), "test")
    gate = asyncio.Event()
    waiting = tasks.spawn(gate.wait(), name="waiting")
    assert await tasks.join(0) is False
    assert await tasks.join(0.01) is False
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(tasks.join(), 0.01)  # the caller of join is cancelled ...
    assert not waiting.done() and len(tasks) == 1  # ... and the task runs on
    gate.set()
    assert await tasks.join(5) is True
    assert waiting.done() and not waiting.cancelled() and len(tasks) == 0
    assert await tasks.join(0) is True  # at once when none runs


async def test_task_set_cancel_with_grace_reports_tasks_that_ignore_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet(logging.getLogger("test.tasks"), "test")
    started, release, cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while True:
            try:
                await release.wait()
                return
            except asyncio.CancelledError:
                cancelled.set()  # swallowed: goes on waiting

    obedient = tasks.spawn(asyncio.Event().wait(), name="obedient")
    stuck = tasks.spawn(stubborn(), name="stubborn")
    await asyncio.wait_for(started.wait(), 5)
    assert await tasks.cancel(grace=0.01) == 1
    assert obedient.cancelled() and cancelled.is_set() and not stuck.done()
    assert "1 test tasks ignored cancellation" in caplog.text
    release.set()
    assert await tasks.join(5) and len(tasks) == 0
    assert await tasks.cancel(grace=0.01) == 0  # nothing left to cancel


async def test_single_flight_shares_one_run_per_key_and_forgets_it_when_it_ends() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()
    started: list[str] = []

    async def work(key: str) -> str:
        started.append(key)
        await gate.wait()
        return f"{key}{started.count(key)}"  # which run of this key answered

    a1 = flights.share("a", lambda: work("a"))
    a2 = flights.share("a", lambda: work("a"))  # joins the run in flight
    b = flights.share("b", lambda: work("b"))  # another key: its own run
    assert len(flights) == 2 and "a" in flights and "b" in flights
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(a1, a2, b), 5) == ["a1", "a1", "b1"]
    assert started == ["a", "b"]
    assert len(flights) == 0 and "a" not in flights  # ended: the next caller starts anew
    assert await asyncio.wait_for(flights.share("a", lambda: work("a")), 5) == "a2"
    assert started == ["a", "b", "a"]


async def test_single_flight_gives_the_error_to_every_caller() -> None:
    flights: SingleFlight[str, None] = SingleFlight()
    gate = asyncio.Event()
    runs: list[int] = []

    async def fails() -> None:
        runs.append(1)
        await gate.wait()
        raise RuntimeError("boom")

    callers = [flights.share("k", fails) for _ in range(3)]
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    assert [type(r) for r in results] == [RuntimeError] * 3 and runs == [1]
    assert "k" not in flights


async def test_single_flight_caller_giving_up_leaves_the_run_to_the_others() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def work() -> str:
        await gate.wait()
        return "done"

    impatient = flights.share("k", work)
    patient = flights.share("k", work)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(impatient, 0.01)  # cancels its share, not the run
    assert "k" in flights
    gate.set()
    assert await asyncio.wait_for(patient, 5) == "done"


async def test_single_flight_cancel_ends_every_run() -> None:
    flights: SingleFlight[str, None] = SingleFlight()
    hangs = [flights.share(key, asyncio.Event().wait) for key in "ab"]
    assert len(flights) == 2
    await asyncio.wait_for(flights.cancel(), 5)
    assert len(flights) == 0
    for share in hangs:
        with pytest.raises(asyncio.CancelledError):
            await share


def test_decode_error_reporter_counts_all_and_logs_each_distinct_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = Metrics().counter("decode_errors_total", "x", ["event_type"])
    reporter = DecodeErrorReporter(counter, logging.getLogger("test.decode"), limit=2)
    bad = DecodeError("m.key.verification.start", "content.method", "expected str")
    for _ in range(3):
        reporter.report(bad, "@peer:x")
    reporter.report(DecodeError("org.evil." + "x" * 500, "", "not an object"))
    reporter.report(DecodeError("m.dummy", "content", "third distinct one"))
    assert counter.get("m.key.verification.start") == 3
    assert counter.get("other") == 1  # a sender-chosen type is never a label
    lines = [r.getMessage() for r in caplog.records]
    assert sum("content.method" in line for line in lines) == 1
    assert any("too many distinct decode errors" in line for line in lines)
    assert not any("third distinct one" in line for line in lines)
    assert all(len(line) < 400 for line in lines)


def test_hook_set_undoes_last_first() -> None:
    obj = SimpleNamespace(f=lambda: "original")
    hooks = HookSet()
    hooks.patch(obj, "f", lambda orig: lambda: "one(" + orig() + ")")
    hooks.patch(obj, "f", lambda orig: lambda: "two(" + orig() + ")")
    assert obj.f() == "two(one(original))" and len(hooks) == 2
    hooks.undo()
    assert obj.f() == "original" and len(hooks) == 0
    hooks.undo()  # idempotent
    assert obj.f() == "original"


def test_nio_hooks_know_whether_attached_and_follow_each_olm_machine_once() -> None:
    hooks = NioHooks()
    assert hooks.attached
    first, second = object(), object()
    assert not hooks.follow_olm(None)  # before login: no machine yet
    assert hooks.follow_olm(first)
    assert not hooks.follow_olm(first)  # hooked already
    assert hooks.follow_olm(second)  # nio made a new machine (store loaded again)
    hooks.undo()
    assert not hooks.attached
    assert not hooks.follow_olm(first)  # detached: a late wrapper call hooks nothing
    hooks.undo()  # idempotent
    assert not hooks.attached
