"""The nio plugin against the real Synapse: a second encrypted nio client sends the bot
plaintext and Olm-encrypted to-device events; the bot's typed handlers see each exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nio import AsyncClient, MatrixRoom, MegolmEvent, RoomMessageText
from vodozemac import Sas

from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import (
    KeyVerificationReady,
    KeyVerificationRequest,
    OlmEncrypted,
    RoomKey,
    SecretSend,
    ToDeviceEvent,
    UnknownToDeviceEvent,
)
from bot_toolkit.nio_plugin import NioPlugin, attach, device_keys, our_identity
from tests.nio_helpers import (
    close_clients,
    know_each_other,
    make_client,
    send_olm,
    send_plaintext,
    share_encrypted_room,
    syncing,
    wait_until,
)
from tests.synapse import LocalSynapse

pytestmark = pytest.mark.synapse


class Bot:
    """A bot client with a dispatcher, the plugin, and a record of every event handled."""

    def __init__(self, client: AsyncClient, dispatcher: Dispatcher, plugin: NioPlugin) -> None:
        self.client, self.dispatcher, self.plugin = client, dispatcher, plugin
        self.seen: list[ToDeviceEvent] = []

    def of(self, cls: type[ToDeviceEvent], **fields: Any) -> list[Any]:
        return [
            e
            for e in self.seen
            if isinstance(e, cls) and all(getattr(e, k, None) == v for k, v in fields.items())
        ]

    def counter(self, name: str) -> float:
        metric = self.dispatcher.metrics.get(name)
        return metric.total() if metric is not None else 0.0


@pytest.fixture
async def pair(
    synapse: LocalSynapse, tmp_path: Path
) -> AsyncIterator[tuple[AsyncClient, AsyncClient]]:
    bot = await make_client(synapse, tmp_path)
    peer = await make_client(synapse, tmp_path)
    try:
        await know_each_other(bot, peer)
        yield bot, peer
    finally:
        await close_clients(bot, peer)


async def _bot(client: AsyncClient, *, intercept: bool = False) -> Bot:
    dispatcher = Dispatcher(handler_timeout=10)
    plugin = attach(client, dispatcher, intercept_verification=intercept)
    bot = Bot(client, dispatcher, plugin)

    @dispatcher.on(ToDeviceEvent)
    async def record(event: ToDeviceEvent) -> None:
        bot.seen.append(event)

    await dispatcher.start()
    return bot


def _request(txn: str, device_id: str) -> dict[str, Any]:
    return {
        "transaction_id": txn,
        "from_device": device_id,
        "methods": ["m.sas.v1"],
        "timestamp": int(time.time() * 1000),
    }


async def _more_syncs(client: AsyncClient, count: int = 3) -> None:
    """Let the bot's running sync loop turn ``count`` more times."""
    for _ in range(count):
        await asyncio.wait_for(client.synced.wait(), 15)


async def test_every_event_reaches_typed_handlers_exactly_once(
    pair: tuple[AsyncClient, AsyncClient],
) -> None:
    client, peer = pair
    bot = await _bot(client)
    requests: list[KeyVerificationRequest] = []
    customs: list[UnknownToDeviceEvent] = []

    @bot.dispatcher.on(KeyVerificationRequest)
    async def on_request(event: KeyVerificationRequest) -> None:
        requests.append(event)

    @bot.dispatcher.on(UnknownToDeviceEvent, lambda e: e.event_type_name == "org.example.custom")
    async def on_custom(event: UnknownToDeviceEvent) -> None:
        customs.append(event)

    to = (client.user_id, client.device_id)
    peer_curve = peer.olm.account.identity_keys["curve25519"]
    try:
        async with syncing(client) as sync_task:
            await send_plaintext(peer, *to, "m.key.verification.request", _request("p1", "X"))
            await send_olm(peer, *to, "m.key.verification.request", _request("e1", "X"))
            await send_olm(peer, *to, "org.example.custom", {"n": 1})
            ready_content = {"transaction_id": "p1", "from_device": "X", "methods": ["m.sas.v1"]}
            await send_plaintext(peer, *to, "m.key.verification.ready", ready_content)
            await send_olm(peer, *to, "m.secret.send", {"request_id": "r1", "secret": "s3cr3t"})
            await send_plaintext(peer, *to, "org.example.empty", {})

            await wait_until(lambda: len(bot.seen) >= 6, what="6 events handled")
            await _more_syncs(client)
            assert not sync_task.done()

        # The typed handlers: each event once, with decrypted_from only when it was encrypted.
        assert sorted((e.transaction_id, e.decrypted_from) for e in requests) == [
            ("e1", peer_curve),
            ("p1", None),
        ]
        assert [(e.content, e.decrypted_from) for e in customs] == [({"n": 1}, peer_curve)]
        plain_request = bot.of(KeyVerificationRequest, transaction_id="p1")
        enc_request = bot.of(KeyVerificationRequest, transaction_id="e1")
        custom = bot.of(UnknownToDeviceEvent, event_type_name="org.example.custom")
        empty = bot.of(UnknownToDeviceEvent, event_type_name="org.example.empty")
        ready = bot.of(KeyVerificationReady, transaction_id="p1")
        secret = bot.of(SecretSend, request_id="r1")
        assert [len(x) for x in (plain_request, enc_request, custom, ready, secret, empty)] == [
            1,
            1,
            1,
            1,
            1,
            1,
        ]
        assert plain_request[0].decrypted_from is None
        assert ready[0].decrypted_from is None
        assert empty[0].decrypted_from is None and empty[0].content == {}
        for event in (enc_request[0], custom[0], secret[0]):
            assert event.decrypted_from == peer_curve
            assert event.sender == peer.user_id
        assert custom[0].content == {"n": 1}
        # Decrypted envelopes are not dispatched as well as their payloads.
        assert bot.of(OlmEncrypted) == []
        assert len(bot.seen) == 6, bot.seen
        assert bot.counter("nio_to_device_dropped_total") == 0
        assert bot.counter("nio_plugin_errors_total") == 0
    finally:
        bot.plugin.detach()
        await bot.dispatcher.close()


@pytest.mark.handler_errors
async def test_raising_handler_does_not_stop_the_sync_loop(
    pair: tuple[AsyncClient, AsyncClient],
) -> None:
    client, peer = pair
    bot = await _bot(client)
    to = (client.user_id, client.device_id)
    calls = Counter[str]()

    @bot.dispatcher.on(UnknownToDeviceEvent)
    async def explode(event: UnknownToDeviceEvent) -> None:
        calls[event.event_type_name] += 1
        raise RuntimeError("handler bug")

    try:
        async with syncing(client) as sync_task:
            await send_olm(peer, *to, "org.example.boom", {"n": 1})
            await send_plaintext(peer, *to, "org.example.boom", {"n": 2})
            await wait_until(lambda: calls["org.example.boom"] == 2, what="both booms handled")
            await _more_syncs(client, 2)
            await send_olm(peer, *to, "org.example.after", {"n": 3})
            await send_plaintext(peer, *to, "m.key.verification.request", _request("p2", "X"))
            await wait_until(
                lambda: (
                    bool(bot.of(KeyVerificationRequest, transaction_id="p2"))
                    and calls["org.example.after"] == 1
                ),
                what="events after the failures",
            )
            assert not sync_task.done()
        assert bot.counter("handler_errors_total") == 3
        assert len(bot.of(UnknownToDeviceEvent, event_type_name="org.example.after")) == 1
    finally:
        bot.plugin.detach()
        await bot.dispatcher.close()


async def test_nio_still_handles_room_keys(pair: tuple[AsyncClient, AsyncClient]) -> None:
    """nio's own Olm handling keeps working: the bot decrypts a Megolm message from the peer,
    and the m.room_key that made it possible also reaches the dispatcher."""
    client, peer = pair
    bot = await _bot(client)
    room_id = await share_encrypted_room(peer, client)
    texts: list[str] = []
    undecrypted: list[MegolmEvent] = []

    async def on_text(room: MatrixRoom, event: RoomMessageText) -> None:
        texts.append(event.body)

    async def on_megolm(room: MatrixRoom, event: MegolmEvent) -> None:
        undecrypted.append(event)

    client.add_event_callback(on_text, RoomMessageText)
    client.add_event_callback(on_megolm, MegolmEvent)
    try:
        async with syncing(client):
            await peer.room_send(
                room_id,
                "m.room.message",
                {"msgtype": "m.text", "body": "hello bot"},
                ignore_unverified_devices=True,
            )
            await wait_until(lambda: "hello bot" in texts, what="bot decrypted the message")
        keys = bot.of(RoomKey, room_id=room_id)
        assert len(keys) == 1
        assert keys[0].decrypted_from == peer.olm.account.identity_keys["curve25519"]
        assert keys[0].session_key not in repr(keys[0])
        assert undecrypted == []
    finally:
        bot.plugin.detach()
        await bot.dispatcher.close()


async def test_forged_payload_is_discarded_and_counted(
    pair: tuple[AsyncClient, AsyncClient],
) -> None:
    client, peer = pair
    bot = await _bot(client)
    to = (client.user_id, client.device_id)

    def wrong_recipient(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "recipient": "@someone-else:localhost"}

    def wrong_sender(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "sender": "@mallory:localhost"}

    try:
        async with syncing(client):
            await send_olm(peer, *to, "org.example.forged", {}, payload=wrong_recipient)
            await send_olm(peer, *to, "org.example.forged", {}, payload=wrong_sender)
            await send_olm(peer, *to, "org.example.genuine", {"ok": True})
            await wait_until(
                lambda: bool(bot.of(UnknownToDeviceEvent, event_type_name="org.example.genuine")),
                what="the genuine event",
            )
        assert bot.of(UnknownToDeviceEvent, event_type_name="org.example.forged") == []
        failed = bot.of(OlmEncrypted)
        assert len(failed) == 2  # handlers see the envelopes as undecryptable
        assert all(e.decrypted_from is None and e.sender == peer.user_id for e in failed)
        rejected = bot.dispatcher.metrics.get("nio_olm_rejected_total")
        assert rejected is not None
        assert rejected.get("recipient mismatch") == 1
        assert rejected.get("sender mismatch") == 1
    finally:
        bot.plugin.detach()
        await bot.dispatcher.close()


async def _peer_receives(peer: AsyncClient, *, within: float = 20.0) -> list[Any]:
    """Every to-device event waiting for ``peer``: it syncs until one long-poll brings none.

    The caller makes sure whatever could be sent has been sent (bounded: ``within`` seconds).
    """
    got: list[Any] = []

    async def record(event: Any) -> None:
        got.append(event)

    peer.add_to_device_callback(record, object)
    try:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            before = len(got)
            await peer.sync(timeout=500)
            if len(got) == before:
                return got
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"to-device events still arriving after {within}s: {got}")
    finally:
        peer.to_device_callbacks.clear()


@pytest.mark.parametrize("intercept", [False, True])
async def test_intercept_keeps_nio_from_answering_verification(
    pair: tuple[AsyncClient, AsyncClient], intercept: bool
) -> None:
    """A legacy start + key from the peer: nio answers with its own key unless intercepted."""
    client, peer = pair
    bot = await _bot(client, intercept=intercept)
    to = (client.user_id, client.device_id)
    start = {
        "transaction_id": "t-sas",
        "from_device": peer.device_id,
        "method": "m.sas.v1",
        "key_agreement_protocols": ["curve25519-hkdf-sha256"],
        "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256"],
        "short_authentication_string": ["decimal", "emoji"],
    }
    key = {"transaction_id": "t-sas", "key": Sas().public_key.to_base64()}
    try:
        async with syncing(client):
            await send_plaintext(peer, *to, "m.key.verification.start", start)
            await send_plaintext(peer, *to, "m.key.verification.key", key)
            await wait_until(lambda: len(bot.seen) >= 2, what="start and key dispatched")
            # Two more turns of sync_forever: nio has sent whatever it queued in reply by then.
            await _more_syncs(client, 2)
            answers = await _peer_receives(peer)
        types = [getattr(e, "source", {}).get("type") for e in answers]
        if intercept:
            assert types == []
            assert client.olm.key_verifications == {}
            assert bot.counter("nio_verification_intercepted_total") == 2
        else:
            assert types == ["m.key.verification.key"]
        assert len(bot.seen) == 2  # bot_toolkit's handlers see both either way
    finally:
        bot.plugin.detach()
        await bot.dispatcher.close()


async def test_identity_helpers(pair: tuple[AsyncClient, AsyncClient]) -> None:
    client, peer = pair
    me = our_identity(client)
    assert (me.user_id, me.device_id) == (client.user_id, client.device_id)
    assert me.ed25519 == client.olm.account.identity_keys["ed25519"]
    theirs = device_keys(client, peer.user_id, peer.device_id)
    assert theirs is not None
    assert theirs.curve25519 == peer.olm.account.identity_keys["curve25519"]
    assert theirs.ed25519 == our_identity(peer).ed25519
    assert device_keys(client, peer.user_id, "NOSUCHDEVICE") is None
    assert device_keys(client, "@nobody:localhost", "X") is None
