"""The durable inbound queue with real nio clients and Olm (offline) and a real SQLite store:
commit before the token save, stable ids, replay after a "crash", encryption at rest."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import SecretSend, ToDeviceEvent, UnknownToDeviceEvent
from bot_toolkit.inbound_queue import InboundQueue
from bot_toolkit.metrics import Metrics
from bot_toolkit.nio_plugin import attach
from bot_toolkit.store import Store
from tests.test_nio_plugin import ALICE, Pair, curve, feed

SECRET = "a-store-secret-for-tests-0123456789"


def ping(n: int) -> dict[str, Any]:
    return {"type": "org.example.ping", "sender": ALICE, "content": {"n": n}}


async def _rows(store: Store) -> int:
    return int((await store.fetchall("SELECT COUNT(*) FROM inbound_events"))[0][0])


async def test_batch_is_committed_before_nio_saves_its_token(tmp_path: Path) -> None:
    pair = Pair()
    pair.bob.config = dataclasses.replace(pair.bob.config, store_sync_tokens=True)
    order: list[str] = []
    bob_store: Any = pair.bob.store
    original = bob_store.save_sync_token
    bob_store.save_sync_token = lambda token: (order.append(f"save {token}"), original(token))
    store = await Store.open(tmp_path / "s.sqlite3")
    queue = InboundQueue(store, SECRET)
    commit = queue.commit

    async def recording_commit(batch: Any) -> set[str]:
        order.append(f"commit {len(batch)}")
        return await commit(batch)

    queue.commit = recording_commit  # type: ignore[method-assign]
    dispatcher = Dispatcher(handler_timeout=5)
    seen: list[ToDeviceEvent] = []

    @dispatcher.on(ToDeviceEvent)
    async def handle(event: ToDeviceEvent) -> None:
        order.append(f"handle {event.inbound_id is not None}")
        seen.append(event)

    plugin = attach(pair.bob, dispatcher)
    try:
        assert await plugin.use_inbound_queue(queue) == 0
        await dispatcher.start()
        await feed(pair.bob, [ping(1), pair.olm("org.example.secret", {"s": "hunter2"})])
        assert await dispatcher.join(10)
        token = pair.bob.next_batch
        assert order[:2] == ["commit 2", f"save {token}"]
        assert order[2:] == ["handle True", "handle True"]
        assert len({e.inbound_id for e in seen}) == 2
        assert seen[1].decrypted_from == curve(pair.alice)
        assert pair.bob.store.load_sync_token() == token
        await plugin.close_inbound()
        assert await _rows(store) == 0  # handled: forgotten
    finally:
        plugin.detach()
        await dispatcher.close()
        await store.close()
        await pair.close()


async def test_unhandled_events_are_replayed_with_the_same_ids(tmp_path: Path) -> None:
    """Run 1 stores a batch (one Olm payload holding a secret) and "crashes" before any handler
    ran; run 2 hands every event to the handler again, decoded as before, with the same ids.
    The stored secret is encrypted at rest."""
    pair = Pair()
    pair.bob.config = dataclasses.replace(pair.bob.config, store_sync_tokens=True)
    store = await Store.open(tmp_path / "s.sqlite3")
    first = Dispatcher(handler_timeout=5)  # never started: nothing is handled
    plugin = attach(pair.bob, first)
    committed: list[str] = []
    queue = InboundQueue(store, SECRET)
    commit = queue.commit

    async def recording_commit(batch: Any) -> set[str]:
        committed.extend(item.id for item in batch)
        return await commit(batch)

    queue.commit = recording_commit  # type: ignore[method-assign]
    await plugin.use_inbound_queue(queue)
    secret = pair.olm("m.secret.send", {"request_id": "r1", "secret": "hunter2"})
    await feed(pair.bob, [ping(0), secret, ping(2)])
    assert len(committed) == 3 and await _rows(store) == 3
    blobs = await store.fetchall("SELECT blob FROM inbound_events")
    assert not any(b"hunter2" in bytes(b[0]) or b"org.example" in bytes(b[0]) for b in blobs)
    plugin.detach()  # the "crash": run 1's dispatcher never handled anything
    await first.close(0.1)

    second = Dispatcher(handler_timeout=5)
    seen: list[ToDeviceEvent] = []

    @second.on(ToDeviceEvent)
    async def handle(event: ToDeviceEvent) -> None:
        seen.append(event)

    plugin2 = attach(pair.bob, second)
    try:
        assert await plugin2.use_inbound_queue(InboundQueue(store, SECRET, Metrics())) == 3
        await second.start()
        assert await plugin2.replay_inbound() == 3
        assert await second.join(10)
        assert [e.inbound_id for e in seen] == committed
        assert isinstance(seen[0], UnknownToDeviceEvent) and seen[0].content == {"n": 0}
        assert isinstance(seen[1], SecretSend) and seen[1].secret == "hunter2"
        assert seen[1].decrypted_from == curve(pair.alice)
        await plugin2.close_inbound()
        assert await _rows(store) == 0
    finally:
        plugin2.detach()
        await second.close()
        await store.close()
        await pair.close()


async def test_a_batch_delivered_again_is_not_handed_over_twice(tmp_path: Path) -> None:
    """Committed, then the process died before the token save: the homeserver sends the same
    batch for the same ``since``. Its events keep their ids, and those already stored are not
    handed over a second time."""
    pair = Pair()
    pair.bob.config = dataclasses.replace(pair.bob.config, store_sync_tokens=True)
    store = await Store.open(tmp_path / "s.sqlite3")
    dispatcher = Dispatcher(handler_timeout=5)
    plugin = attach(pair.bob, dispatcher)
    await plugin.use_inbound_queue(InboundQueue(store, SECRET))
    seen: list[ToDeviceEvent] = []
    release = asyncio.Event()

    @dispatcher.on(ToDeviceEvent)
    async def handle(event: ToDeviceEvent) -> None:
        seen.append(event)
        await release.wait()

    try:
        await dispatcher.start()
        before = pair.bob.next_batch
        await feed(pair.bob, [ping(0), ping(1)])
        pair.bob.next_batch = before  # the same since again (the token save "was lost")
        plugin._inbound._since = before  # type: ignore[union-attr]
        await feed(pair.bob, [ping(0), ping(1), ping(2)])
        release.set()
        assert await dispatcher.join(10)
        assert [e.content for e in seen if isinstance(e, UnknownToDeviceEvent)] == [
            {"n": 0},
            {"n": 1},
            {"n": 2},
        ]
    finally:
        plugin.detach()
        await dispatcher.close()
        await store.close()
        await pair.close()


async def test_rows_a_new_secret_cannot_open_are_dropped_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await Store.open(tmp_path / "s.sqlite3")
    try:
        old = InboundQueue(store, SECRET)
        await old.open()
        from bot_toolkit.inbound_queue import Received  # noqa: PLC0415

        await old.commit([Received("id1", ping(1), None)])
        metrics = Metrics()
        new = InboundQueue(store, "another secret entirely", metrics)
        assert await new.open() == 1
        assert await new.replay() == []
        assert "cannot be read with this store secret" in caplog.text
        errors = metrics.get("inbound_store_errors_total")
        assert errors is not None and errors.total() == 1
        assert await _rows(store) == 0
    finally:
        await store.close()


async def test_close_during_an_ack_flush_keeps_the_ids(tmp_path: Path) -> None:
    """close() cancels a flush that is inside its delete: the ids are kept and flushed by
    close() itself, so no handled event is replayed at the next start."""
    from bot_toolkit.inbound_queue import Received  # noqa: PLC0415

    store = await Store.open(tmp_path / "s.sqlite3")
    try:
        queue = InboundQueue(store, SECRET)
        await queue.open()
        await queue.commit([Received(f"id{i}", ping(i), None) for i in range(5)])
        inside, release = asyncio.Event(), asyncio.Event()
        real = queue._delete

        async def slow(ids: Any) -> None:
            inside.set()
            await release.wait()
            await real(ids)

        queue._delete = slow  # type: ignore[method-assign]
        for i in range(5):
            queue.ack(f"id{i}")
        await asyncio.wait_for(inside.wait(), 10)  # the flusher is inside its delete
        queue._delete = real  # type: ignore[method-assign]
        await queue.close()
        assert await _rows(store) == 0
    finally:
        await store.close()
