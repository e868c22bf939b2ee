"""The facade: :class:`bot_toolkit.BotToolkit` builds, runs and stops the whole stack.

Unit tests check misuse errors; the rest run on a real nio client against the real Synapse:
one registry for every part, the outbox speaking with the client's own homeserver and token,
the shutdown order (a handler still running when ``close`` starts can send, and what it sends
arrives), ``run()`` stopping on SIGTERM, and a failed start undoing what it had done.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nio import AsyncClient, AsyncClientConfig, UnknownToDeviceEvent

from bot_toolkit import BotToolkit, DispatcherClosed, Settings, ToolkitError, VerificationPolicy
from tests.nio_helpers import close_clients, make_client, sync_until, wait_until
from tests.synapse import LocalSynapse

T = 30.0


@dataclass(frozen=True)
class Ping:
    """An application event put into the dispatcher by the test."""

    n: int


# ----------------------------------------------------------------------------- misuse


def test_needs_a_nio_client(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"nio\.AsyncClient"):
        BotToolkit(object(), tmp_path)  # type: ignore[arg-type]


async def test_parts_exist_only_once_started(tmp_path: Path) -> None:
    client = AsyncClient("http://127.0.0.1:9", "@bot:test")
    toolkit = BotToolkit(client, tmp_path)
    assert toolkit.dispatcher is not None  # exists at once: handlers can be registered
    for part in ("outbox", "store", "plugin", "key_sharing"):
        with pytest.raises(ToolkitError, match="once start"):
            getattr(toolkit, part)
    with pytest.raises(ToolkitError, match="verification is off"):
        _ = toolkit.verification
    with pytest.raises(ToolkitError, match="log the client in"):
        await toolkit.start()
    await toolkit.close()


def test_a_transport_and_an_http_session_are_exclusive(tmp_path: Path) -> None:
    client = AsyncClient("http://127.0.0.1:9", "@bot:test")
    with pytest.raises(ValueError, match="not both"):
        BotToolkit(
            client,
            tmp_path,
            transport=RecordingTransport(),
            http_session=object(),  # type: ignore[arg-type]
        )


async def test_a_client_without_encryption_is_refused(tmp_path: Path) -> None:
    config = AsyncClientConfig(encryption_enabled=False)
    client = AsyncClient("http://127.0.0.1:9", "@bot:test", "DEV", str(tmp_path), config=config)
    client.restore_login("@bot:test", "DEV", "token")
    toolkit = BotToolkit(client, tmp_path)
    with pytest.raises(ToolkitError, match="no encryption"):
        await toolkit.start()
    assert "_handle_to_device" not in vars(client)  # nothing was attached
    await toolkit.close()


# ----------------------------------------------------------------------------- on Synapse


class Inbox:
    """The peer's received to-device events of one type (through nio's own callbacks)."""

    def __init__(self, client: AsyncClient, event_type: str) -> None:
        self.contents: list[dict[str, Any]] = []

        async def seen(event: Any) -> None:
            if event.source.get("type") == event_type:
                self.contents.append(event.source["content"])

        client.add_to_device_callback(seen, (UnknownToDeviceEvent,))


@pytest.mark.synapse
async def test_one_registry_and_the_clients_own_credentials(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    client = await make_client(synapse, tmp_path)
    peer = await make_client(synapse, tmp_path)
    inbox = Inbox(peer, "org.example.facade")
    policy = VerificationPolicy(allowed_users=["@*:*"])
    try:
        async with BotToolkit(client, tmp_path / "data", verification=policy) as toolkit:
            assert toolkit.started
            assert (tmp_path / "data" / "bot_toolkit.sqlite3").is_file()
            # nio's own SAS is off; the manager takes malformed events from the plugin.
            assert toolkit.plugin.intercept_verification
            assert toolkit.plugin.dispatch_undecodable
            # The outbox sends with the client's homeserver and token: the peer receives it.
            await toolkit.outbox.send(
                "org.example.facade", {peer.user_id: {peer.device_id: {"n": 1}}}
            )
            assert await toolkit.outbox.flush(T)
            await sync_until(peer, lambda: bool(inbox.contents), what="the outbox's message")
            assert inbox.contents == [{"n": 1}]
            text = toolkit.metrics.render()
            for name in (
                "events_dispatched_total",  # dispatcher
                "nio_to_device_total",  # plugin
                "outbox_messages_total",  # outbox
                "withheld_dummy_total",  # key sharing
                "verifications_total",  # verification
            ):
                assert f"# TYPE bot_toolkit_{name} " in text, name
            sent = toolkit.metrics.get("outbox_messages_total")
            assert sent is not None and sent.get("org.example.facade") == 1
        assert not toolkit.started
        assert toolkit.store.closed
        assert "_handle_to_device" not in vars(client)  # the plugin is detached
        assert client.client_session is None  # the client was closed too
    finally:
        await close_clients(client, peer)


class RecordingTransport:
    """An outbox transport that records each request instead of sending it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.closed = False

    async def send_to_device(self, event_type: str, txn_id: str, messages: Any) -> None:
        self.requests.append((event_type, txn_id, dict(messages)))

    async def close(self) -> None:
        self.closed = True


@pytest.mark.synapse
async def test_the_outbox_sends_through_a_given_transport(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """``transport=`` replaces HTTP for the outbox, and stays the caller's: not closed."""
    client = await make_client(synapse, tmp_path)
    transport = RecordingTransport()
    try:
        async with BotToolkit(
            client, tmp_path / "data", key_sharing=None, transport=transport
        ) as toolkit:
            messages = {"@peer:test": {"PEERDEV": {"n": 1}}}
            (txn,) = await toolkit.outbox.send("org.example.given", messages)
            assert await toolkit.outbox.flush(T)
            assert transport.requests == [("org.example.given", txn, messages)]
        assert not transport.closed
    finally:
        await close_clients(client)


class GatedTransport(RecordingTransport):
    """Records each request once ``gate`` is set (the homeserver answers late)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def send_to_device(self, event_type: str, txn_id: str, messages: Any) -> None:
        await self.gate.wait()
        await super().send_to_device(event_type, txn_id, messages)


@pytest.mark.synapse
async def test_join_waits_for_the_handlers_and_then_the_outbox(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """``idle`` / ``join()`` cover every part at once: a handled event's send still waiting in
    the outbox keeps the bot busy; a join that times out cancels nothing."""
    client = await make_client(synapse, tmp_path)
    transport = GatedTransport()
    toolkit = BotToolkit(client, tmp_path / "data", key_sharing=None, transport=transport)
    handling = asyncio.Event()
    messages = {"@peer:test": {"PEERDEV": {"n": 1}}}

    @toolkit.on(Ping)
    async def sender(event: Ping) -> None:
        await handling.wait()
        await toolkit.outbox.send("org.example.joined", messages)

    try:
        async with toolkit:
            assert toolkit.idle and await toolkit.join(0)
            assert toolkit.dispatcher.put_nowait(Ping(1))
            assert not toolkit.idle
            assert not await toolkit.join(0.01)  # the handler waits
            handling.set()
            assert await toolkit.dispatcher.join(T)
            assert not toolkit.idle  # the dispatcher is, the outbox is not
            assert not await toolkit.join(0.01)
            transport.gate.set()
            assert await toolkit.join(T)
            assert toolkit.idle
            assert [r[2] for r in transport.requests] == [messages]
        assert toolkit.idle  # closed
    finally:
        await close_clients(client)


@pytest.mark.synapse
async def test_close_drains_handlers_before_the_outbox(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """A handler still running when close() begins may send; its message goes out."""
    client = await make_client(synapse, tmp_path)
    peer = await make_client(synapse, tmp_path)
    inbox = Inbox(peer, "org.example.late")
    toolkit = BotToolkit(client, tmp_path / "data", key_sharing=None)
    entered, release = asyncio.Event(), asyncio.Event()

    @toolkit.on(Ping)
    async def late_sender(event: Ping) -> None:
        entered.set()
        await release.wait()
        await toolkit.outbox.send(
            "org.example.late", {peer.user_id: {peer.device_id: {"n": event.n}}}
        )

    try:
        await toolkit.start()
        assert toolkit.dispatcher.put_nowait(Ping(7))
        await asyncio.wait_for(entered.wait(), T)
        closing = asyncio.create_task(toolkit.close())
        # close() has begun (the dispatcher is the first part it closes): no new events.
        await wait_until(lambda: not toolkit.started, what="close() to begin")
        with pytest.raises(DispatcherClosed):
            toolkit.dispatcher.put_nowait(Ping(8))
        release.set()
        await asyncio.wait_for(closing, T)
        handled = toolkit.metrics.get("handler_errors_total")
        assert handled is None or handled.total() == 0
        await sync_until(peer, lambda: bool(inbox.contents), what="the late message")
        assert inbox.contents == [{"n": 7}]
    finally:
        await close_clients(client, peer)


@pytest.mark.synapse
async def test_run_syncs_until_sigterm_and_restores_the_handler(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    client = await make_client(synapse, tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    toolkit = BotToolkit(client, tmp_path / "data")
    try:
        running = asyncio.create_task(toolkit.run())
        client.synced.clear()
        await asyncio.wait_for(client.synced.wait(), T)  # run() is syncing
        assert toolkit.started
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(running, T)
        assert not toolkit.started and toolkit.store.closed
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        await close_clients(client)


@pytest.mark.synapse
async def test_stop_ends_run(synapse: LocalSynapse, tmp_path: Path) -> None:
    client = await make_client(synapse, tmp_path)
    toolkit = BotToolkit(client, tmp_path / "data")
    try:
        async with toolkit:
            running = asyncio.create_task(toolkit.run(signals=()))
            client.synced.clear()
            await asyncio.wait_for(client.synced.wait(), T)
            toolkit.stop()
            await asyncio.wait_for(running, T)
        assert toolkit.store.closed
    finally:
        await close_clients(client)


@pytest.mark.synapse
async def test_a_failed_start_undoes_what_it_did(synapse: LocalSynapse, tmp_path: Path) -> None:
    client = await make_client(synapse, tmp_path)
    data = tmp_path / "data"
    (data / "bot_toolkit.sqlite3").mkdir(parents=True)  # the store cannot be opened
    toolkit = BotToolkit(client, data, settings=Settings(drain_timeout=1.0))
    try:
        with pytest.raises(Exception, match=r"\S") as failed:
            await toolkit.start()
        assert not isinstance(failed.value, ToolkitError)  # the store's own error
        assert "_handle_to_device" not in vars(client)  # the plugin was detached again
        assert client.client_session is None
        with pytest.raises(ToolkitError, match="runs once"):
            await toolkit.start()
    finally:
        await close_clients(client)
