"""The nio plugin's hand-over (:mod:`bot_toolkit._to_device_handover`) on its own: a real
dispatcher, no nio client. The paths nio cannot be made to take on purpose (its to-device section
failing half way) are driven directly here; the plugin's own tests cover the rest through nio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from bot_toolkit._to_device_decoder import ToDeviceDecoder
from bot_toolkit._to_device_handover import Handover
from bot_toolkit.events import KeyVerificationRequest, ToDeviceEvent
from bot_toolkit.metrics import Metrics
from bot_toolkit.undecodable import UndecodableEvent
from tests.test_nio_plugin import OrderedDispatcher, request

Received = tuple[int, Mapping[str, Any] | None, str | None]


class _Link:
    """Stands in for the inbound queue's link: records each batch committed, keeps it all."""

    def __init__(self) -> None:
        self.committed: list[tuple[list[ToDeviceEvent], list[Received]]] = []

    async def persist(
        self, batch: Sequence[ToDeviceEvent], received: Sequence[Received]
    ) -> list[ToDeviceEvent]:
        self.committed.append((list(batch), list(received)))
        return list(batch)


def _unexpected(where: str) -> None:
    raise AssertionError(f"unexpected error in {where}")


def _handover(dispatcher: OrderedDispatcher, link: _Link | None, timeout: float) -> Handover:
    return Handover(
        dispatcher,
        dispatcher.metrics,
        backpressure_timeout=timeout,
        inbound=lambda: link,  # type: ignore[arg-type, return-value]
        on_error=_unexpected,
    )


def _decoded(raws: list[dict[str, Any]]) -> list[ToDeviceEvent]:
    decoder = ToDeviceDecoder(Metrics(), dispatch_undecodable=True, on_error=_unexpected)
    events = [decoder.decode(raw, None) for raw in raws]
    assert all(event is not None for event in events)
    return [event for event in events if event is not None]


def _count(dispatcher: OrderedDispatcher, name: str, label: str) -> float:
    metric = dispatcher.metrics.get(name)
    return 0.0 if metric is None else metric.get(label)


async def test_a_batch_is_committed_and_handed_over_when_nio_has_finished() -> None:
    dispatcher = OrderedDispatcher()  # not started: what is handed over stays queued, in order
    link = _Link()
    handover = _handover(dispatcher, link, timeout=30)
    bad = request("t-bad")
    bad["content"]["transaction_id"] = 42
    raws = [request("t1"), request("t2"), bad]
    first, second, undecodable = _decoded(raws)
    assert isinstance(undecodable, UndecodableEvent)
    async with asyncio.timeout(30), handover.batch():
        handover.next_wire_event()
        handover.emit(first, "plaintext", raws[0])
        handover.next_wire_event()
        handover.next_wire_event()  # an event that emitted nothing (kept, or not decodable)
        handover.emit(second, "decrypted", raws[1], "curve-key")
        handover.emit(undecodable, "undecrypted", raws[2])  # one wire event, two emitted
        assert dispatcher.queued == [] and link.committed == []  # nio is still at work
    assert dispatcher.queued == [first, second, undecodable]
    assert link.committed == [
        (
            [first, second, undecodable],
            [(0, raws[0], None), (2, raws[1], "curve-key"), (2, raws[2], None)],
        )
    ]
    assert _count(dispatcher, "nio_to_device_total", "plaintext") == 1
    assert _count(dispatcher, "nio_to_device_total", "decrypted") == 1
    assert _count(dispatcher, "nio_to_device_total", "undecodable") == 1
    assert _count(dispatcher, "nio_to_device_total", "undecrypted") == 0
    # The next batch numbers its wire events from 0 again.
    async with asyncio.timeout(30), handover.batch():
        handover.next_wire_event()
        handover.emit(first, "plaintext", raws[0])
    assert link.committed[-1][1] == [(0, raws[0], None)]


async def test_a_failing_section_hands_over_what_it_collected_without_waiting() -> None:
    """nio failing (or the sync cancelled) half way: the events collected so far are handed
    over at once, what does not fit is counted, nothing is committed and the error goes on."""
    dispatcher = OrderedDispatcher(queue_size=2)  # not started: nothing makes room
    link = _Link()
    handover = _handover(dispatcher, link, timeout=3600)
    events = _decoded([request("t1"), request("t2"), request("t3")])
    with pytest.raises(RuntimeError, match="nio failed"):
        async with asyncio.timeout(30), handover.batch():
            for event in events:
                handover.next_wire_event()
                handover.emit(event, "plaintext")
            raise RuntimeError("nio failed")
    assert dispatcher.queued == events[:2]
    assert _count(dispatcher, "nio_to_device_dropped_total", "queue_full") == 1
    assert link.committed == []
    # The failed batch left nothing behind: an event emitted now is handed over at once.
    await dispatcher.close()
    handover.emit(events[2], "plaintext")
    assert _count(dispatcher, "nio_to_device_dropped_total", "closed") == 1


async def test_an_event_emitted_outside_a_batch_is_handed_over_at_once() -> None:
    dispatcher = OrderedDispatcher()
    handover = _handover(dispatcher, None, timeout=30)
    (event,) = _decoded([request("t1")])
    handover.emit(event, "decrypted", None, "curve-key")
    assert dispatcher.queued == [event] and isinstance(event, KeyVerificationRequest)
    assert _count(dispatcher, "nio_to_device_total", "decrypted") == 1
