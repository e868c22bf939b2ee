"""Unit tests of the nio plugin: real nio clients and Olm machines, no network.

Sync responses are built with ``nio.SyncResponse.from_dict`` and fed to
``client.receive_response``, the path ``sync()`` takes, so every hook runs as it does live.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from nio import AsyncClient, AsyncClientConfig, KeysQueryError, LocalProtocolError, SyncResponse
from nio.crypto import OlmDevice, TrustState
from nio.crypto.key_request import OutgoingKeyRequest
from nio.store import SqliteMemoryStore
from vodozemac import Sas

from bot_toolkit import _to_device_decoder
from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import (
    DecodeError,
    Dummy,
    ForwardedRoomKey,
    KeyVerificationCancel,
    KeyVerificationKey,
    KeyVerificationRequest,
    KeyVerificationStartSas,
    OlmEncrypted,
    RoomKey,
    RoomKeyRequest,
    SecretSend,
    ToDeviceEvent,
    UnknownToDeviceEvent,
)
from bot_toolkit.logging_setup import setup_logging
from bot_toolkit.metrics import Metrics
from bot_toolkit.nio_plugin import (
    EncryptionNotReady,
    NioPlugin,
    attach,
    device_keys,
    our_identity,
)
from bot_toolkit.undecodable import UndecodableEvent

OLM = "m.olm.v1.curve25519-aes-sha2"
ALICE, BOB = "@alice:example.org", "@bob:example.org"
_batches = itertools.count()


def offline_client(user_id: str, device_id: str, *, login: bool = True) -> AsyncClient:
    config = AsyncClientConfig(
        encryption_enabled=True, store=SqliteMemoryStore, store_sync_tokens=False
    )
    client = AsyncClient("http://127.0.0.1:9", user_id, device_id, config=config)
    if login:
        client.restore_login(user_id, device_id, "not-a-token")
    return client


def device_of(client: AsyncClient) -> OlmDevice:
    return OlmDevice(client.user_id, client.device_id, dict(client.olm.account.identity_keys))


def curve(client: AsyncClient) -> str:
    key: str = client.olm.account.identity_keys["curve25519"]
    return key


class FakeTransport:
    """Stands in for the aiohttp response nio keeps on a sync response (body already read)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = json.dumps(body).encode()

    async def read(self) -> bytes:
        return self._body


async def feed(client: AsyncClient, events: list[dict[str, Any]], *, body: bool = True) -> None:
    """One sync response carrying ``events`` as to-device events, through nio's own path."""
    raw = {"next_batch": f"batch-{next(_batches)}", "to_device": {"events": events}}
    response = SyncResponse.from_dict(raw)
    response.transport_response = FakeTransport(raw) if body else None
    await client.receive_response(response)


class Pair:
    """Alice (the peer) can Olm-encrypt to Bob (the bot); both know each other's device."""

    def __init__(self, peer_user: str = ALICE) -> None:
        self.alice = offline_client(peer_user, "ALICEDEV")
        self.bob = offline_client(BOB, "BOBDEV")
        self.alice.olm.device_store.add(device_of(self.bob))
        self.bob.olm.device_store.add(device_of(self.alice))
        self.bob.olm.account.generate_one_time_keys(1)
        otk = next(iter(self.bob.olm.account.one_time_keys["curve25519"].values()))
        self.session = self.alice.olm.create_session(otk, curve(self.bob))

    def olm(self, event_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """An Olm to-device event built and encrypted by nio itself."""
        envelope = self.alice.olm._olm_encrypt(
            self.session, device_of(self.bob), event_type, content
        )
        return {"type": "m.room.encrypted", "sender": self.alice.user_id, "content": envelope}

    def forged(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """An Olm event whose plaintext payload was altered by ``change`` before encryption."""
        payload = {
            "type": "org.example.forged",
            "content": {},
            "sender": ALICE,
            "sender_device": "ALICEDEV",
            "keys": {"ed25519": self.alice.olm.account.identity_keys["ed25519"]},
            "recipient": BOB,
            "recipient_keys": {"ed25519": self.bob.olm.account.identity_keys["ed25519"]},
        }
        change(payload)
        message_type, ciphertext = self.session.encrypt(json.dumps(payload)).to_parts()
        body = base64.b64encode(ciphertext).decode().rstrip("=")
        content = {
            "algorithm": OLM,
            "sender_key": curve(self.alice),
            "ciphertext": {curve(self.bob): {"type": message_type, "body": body}},
        }
        return {"type": "m.room.encrypted", "sender": ALICE, "content": content}

    async def close(self) -> None:
        await self.alice.close()
        await self.bob.close()


class OrderedDispatcher(Dispatcher):
    """A dispatcher that also records the order in which events were handed to it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queued: list[object] = []

    async def put(self, event: object) -> None:
        await super().put(event)
        self.queued.append(event)

    def put_nowait(self, event: object) -> bool:
        accepted = super().put_nowait(event)
        if accepted:
            self.queued.append(event)
        return accepted


class Recorder:
    """Records what the handlers saw; :meth:`drain` returns it in hand-over order."""

    def __init__(self, dispatcher: OrderedDispatcher) -> None:
        self.dispatcher = dispatcher
        self.seen: list[ToDeviceEvent] = []

        @dispatcher.on(ToDeviceEvent)
        async def record(event: ToDeviceEvent) -> None:
            self.seen.append(event)

    async def drain(self) -> list[ToDeviceEvent]:
        """Close the dispatcher; every event handed over was handled exactly once."""
        await self.dispatcher.close()
        queued = self.dispatcher.queued
        assert sorted(map(id, self.seen)) == sorted(map(id, queued))
        return [e for e in queued if isinstance(e, ToDeviceEvent)]

    def count(self, name: str, *labels: str) -> float:
        metric = self.dispatcher.metrics.get(name)
        if metric is None:
            return 0.0
        return metric.get(*labels) if labels else metric.total()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    yield p
    await p.close()


@pytest.fixture
async def rec() -> Recorder:
    r = Recorder(OrderedDispatcher(handler_timeout=5))
    await r.dispatcher.start()
    return r


def request(txn: str) -> dict[str, Any]:
    content = {
        "transaction_id": txn,
        "from_device": "ALICEDEV",
        "methods": ["m.sas.v1"],
        "timestamp": int(time.time() * 1000),
    }
    return {"type": "m.key.verification.request", "sender": ALICE, "content": content}


SAS_START = {
    "transaction_id": "t-sas",
    "from_device": "ALICEDEV",
    "method": "m.sas.v1",
    "key_agreement_protocols": ["curve25519-hkdf-sha256"],
    "hashes": ["sha256"],
    "message_authentication_codes": ["hkdf-hmac-sha256"],
    "short_authentication_string": ["decimal", "emoji"],
}


def sas_events() -> list[dict[str, Any]]:
    key = {"transaction_id": "t-sas", "key": Sas().public_key.to_base64()}
    return [
        {"type": "m.key.verification.start", "sender": ALICE, "content": SAS_START},
        {"type": "m.key.verification.key", "sender": ALICE, "content": key},
    ]


# ---------------------------------------------------------------------------- plaintext


async def test_plaintext_events_are_decoded_from_the_raw_dict(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    key_request = {
        "action": "request",
        "requesting_device_id": "ALICEDEV",
        "request_id": "rq1",
        "body": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!r:x", "session_id": "s"},
    }
    await feed(
        pair.bob,
        [
            request("t1"),  # nio: UnknownToDeviceEvent
            {"type": "m.key.verification.start", "sender": ALICE, "content": SAS_START},
            {"type": "m.room_key_request", "sender": ALICE, "content": key_request},
            {"type": "org.example.custom", "sender": ALICE, "content": {"a": [1, 2]}},
        ],
    )
    seen = await rec.drain()
    assert [type(e) for e in seen] == [
        KeyVerificationRequest,
        KeyVerificationStartSas,
        RoomKeyRequest,  # nio keeps these from its own callbacks
        UnknownToDeviceEvent,
    ]
    assert all(e.decrypted_from is None and e.sender == ALICE for e in seen)
    assert rec.count("nio_to_device_total", "plaintext") == 4


async def test_malformed_event_is_counted_and_sync_continues(
    pair: Pair, rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    attach(pair.bob, rec.dispatcher)
    bad = request("t-bad")
    bad["content"]["transaction_id"] = 42
    with caplog.at_level(logging.WARNING, "bot_toolkit.nio_plugin"):
        await feed(pair.bob, [bad, request("t-ok")])
        await feed(pair.bob, [request("t-next")])
    seen = await rec.drain()
    assert [e.transaction_id for e in seen if isinstance(e, KeyVerificationRequest)] == [
        "t-ok",
        "t-next",
    ]
    assert rec.count("nio_decode_errors_total", "m.key.verification.request") == 1
    assert "content.transaction_id" in caplog.text


async def test_decode_error_listener_sees_every_failure_in_wire_order(
    pair: Pair, rec: Recorder
) -> None:
    plugin = attach(pair.bob, rec.dispatcher)
    calls: list[tuple[str, object, str, str | None]] = []

    def on_error(raw: Any, error: DecodeError, decrypted_from: str | None) -> None:
        calls.append(("error", raw["content"].get("transaction_id"), error.path, decrypted_from))

    def on_decoded(event: ToDeviceEvent, raw: Any) -> None:
        calls.append(("decoded", raw["content"].get("transaction_id"), "", event.decrypted_from))

    plugin.add_decode_error_listener(on_error)
    remove = plugin.add_decoded_listener(on_decoded)
    bad = request("t-bad")
    bad["content"]["transaction_id"] = 42
    bad_enc = dict(request("t-enc")["content"], methods="m.sas.v1")
    await feed(pair.bob, [request("t1"), bad, pair.olm("m.key.verification.request", bad_enc)])
    remove()
    remove()  # idempotent
    await feed(pair.bob, [request("t2")])
    seen = await rec.drain()
    assert calls == [
        ("decoded", "t1", "", None),
        ("error", 42, "content.transaction_id", None),
        ("error", "t-enc", "content.methods", curve(pair.alice)),
    ]
    # Not dispatched by default: the dispatcher sees the decoded events only.
    assert [type(e) for e in seen] == [KeyVerificationRequest, KeyVerificationRequest]


async def test_undecodable_events_are_dispatched_in_place(pair: Pair) -> None:
    rec = Recorder(OrderedDispatcher(handler_timeout=5))
    await rec.dispatcher.start()
    plugin = attach(pair.bob, rec.dispatcher, dispatch_undecodable=True)

    def failing_listener(*_: object) -> None:
        raise ZeroDivisionError("a listener that fails")

    plugin.add_decode_error_listener(failing_listener)  # a failing listener changes nothing
    bad_key = {
        "type": "m.key.verification.key",
        "sender": ALICE,
        "content": {"transaction_id": "t1"},
    }
    bad_enc = dict(request("t1")["content"], timestamp="soon")
    await feed(
        pair.bob,
        [
            request("t1"),
            bad_key,
            pair.olm("m.key.verification.request", bad_enc),
            {"type": "m.room_key_request", "sender": ALICE, "content": {"transaction_id": "x"}},
            request("t2"),
        ],
    )
    seen = await rec.drain()
    assert [type(e) for e in seen] == [
        KeyVerificationRequest,
        UndecodableEvent,
        UndecodableEvent,
        UndecodableEvent,
        KeyVerificationRequest,
    ]
    key, enc, other = seen[1:4]
    assert isinstance(key, UndecodableEvent)
    assert (key.sender, key.event_type_name, key.transaction_id) == (
        ALICE,
        "m.key.verification.key",
        "t1",
    )
    assert key.raw_content == {"transaction_id": "t1"}
    assert key.decrypted_from is None
    assert key.error.path == "content.key" and key.error.event_type == "m.key.verification.key"
    assert isinstance(enc, UndecodableEvent)
    assert (enc.transaction_id, enc.path, enc.decrypted_from) == (
        "t1",
        "content.timestamp",
        curve(pair.alice),
    )
    assert enc.raw_content == bad_enc
    # Only verification types order by transaction id (as their decoded events would).
    assert isinstance(other, UndecodableEvent) and other.transaction_id is None
    assert rec.count("nio_to_device_total", "undecodable") == 3
    assert rec.count("nio_plugin_errors_total", "listener") == 3
    plugin.dispatch_undecodable = False


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def test_deeply_nested_start_is_a_typed_error_not_a_recursion_error(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """A start nested 900 levels deep (plaintext and inside Olm): an UndecodableEvent naming the
    depth, no RecursionError anywhere (nothing copies it), and the events around it go on."""
    rec = Recorder(OrderedDispatcher(handler_timeout=5))
    await rec.dispatcher.start()
    plugin = attach(pair.bob, rec.dispatcher, dispatch_undecodable=True)
    copied: list[object] = []
    plugin.add_decoded_listener(lambda event, raw: copied.append(event))
    deep = dict(SAS_START, transaction_id="deep", extra=_nested(900))
    ok = dict(SAS_START, transaction_id="ok", extra=_nested(60))
    with caplog.at_level(logging.DEBUG):
        await feed(
            pair.bob,
            [
                {"type": "m.key.verification.start", "sender": ALICE, "content": deep},
                pair.olm("m.key.verification.start", dict(deep)),
                {"type": "m.key.verification.start", "sender": ALICE, "content": ok},
                request("after"),
            ],
        )
    seen = await rec.drain()
    assert [type(e) for e in seen] == [
        UndecodableEvent,
        UndecodableEvent,
        KeyVerificationStartSas,
        KeyVerificationRequest,
    ]
    for event in seen[:2]:
        assert isinstance(event, UndecodableEvent)
        assert (event.transaction_id, event.path) == ("deep", "content")
        assert "nested more than 64 levels" in event.reason
        assert event.raw_content is None
    assert seen[1].decrypted_from == curve(pair.alice)
    assert rec.count("nio_plugin_errors_total", "decode_payload") == 0
    assert "RecursionError" not in caplog.text
    plugin.dispatch_undecodable = False


async def test_event_nio_cannot_parse_is_recovered_from_the_body(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    empty = {"type": "org.example.ping", "sender": ALICE, "content": {}}
    await feed(pair.bob, [request("t1"), empty, request("t2")])
    await feed(pair.bob, [empty], body=False)  # no HTTP body to look at: counted as lost
    seen = await rec.drain()
    names = [getattr(e, "event_type_name", None) or type(e).__name__ for e in seen]
    assert names == ["KeyVerificationRequest", "org.example.ping", "KeyVerificationRequest"]
    assert rec.count("nio_to_device_dropped_total", "unparsed") == 1


# ---------------------------------------------------------------------------- Olm


async def test_decrypted_payloads_of_every_type_are_dispatched(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    pair.alice.olm.create_outbound_group_session("!room:example.org")
    group = pair.alice.olm.outbound_group_sessions["!room:example.org"]
    room_key = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "room_id": "!room:example.org",
        "session_id": group.id,
        "session_key": group.session_key,
    }
    start = dict(SAS_START, transaction_id="t-enc")
    await feed(
        pair.bob,
        [
            pair.olm("org.example.custom", {"x": 1}),
            pair.olm("m.key.verification.request", request("t-enc")["content"]),
            pair.olm("m.key.verification.start", start),
            pair.olm("m.secret.send", {"request_id": "r", "secret": "hunter2"}),
            pair.olm("m.room_key", room_key),
            pair.olm("m.dummy", {}),
            request("t-plain"),
        ],
    )
    seen = await rec.drain()
    assert [type(e) for e in seen] == [
        UnknownToDeviceEvent,
        KeyVerificationRequest,
        KeyVerificationStartSas,
        SecretSend,
        RoomKey,
        Dummy,
        KeyVerificationRequest,
    ]
    assert [e.decrypted_from for e in seen] == [curve(pair.alice)] * 6 + [None]
    assert "hunter2" not in repr(seen[3])
    # nio still did its own work with the room key.
    assert pair.bob.olm.inbound_group_store.get("!room:example.org", curve(pair.alice), group.id)
    # nio did not run its SAS on an encrypted start (it never did): nothing of ours changed it.
    assert pair.bob.olm.key_verifications == {}
    assert rec.count("nio_to_device_total", "decrypted") == 6
    assert rec.count("nio_to_device_total", "undecrypted") == 0


async def test_nio_still_accepts_forwarded_room_keys(rec: Recorder) -> None:
    """The path where nio mutates the payload: a key we asked our own verified device for."""
    pair = Pair(peer_user=BOB)  # "alice" is another device of the bot's own user
    try:
        bob = pair.bob.olm
        # What a completed verification leaves behind (the memory store has no device rows).
        bob.device_store[BOB]["ALICEDEV"].trust_state = TrustState.verified
        pair.alice.olm.create_outbound_group_session("!room:example.org")
        session_id = pair.alice.olm.outbound_group_sessions["!room:example.org"].id
        inbound = pair.alice.olm.inbound_group_store.get(
            "!room:example.org", curve(pair.alice), session_id
        )
        bob.outgoing_key_requests[session_id] = OutgoingKeyRequest(
            "req-1", session_id, "!room:example.org", "m.megolm.v1.aes-sha2"
        )
        attach(pair.bob, rec.dispatcher)
        forwarded = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": "!room:example.org",
            "sender_key": curve(pair.alice),
            "session_id": session_id,
            "session_key": inbound.export_session(0),
            "sender_claimed_ed25519_key": pair.alice.olm.account.identity_keys["ed25519"],
            "forwarding_curve25519_key_chain": [],
        }
        await feed(pair.bob, [pair.olm("m.forwarded_room_key", forwarded)])
        # nio imported the session and cancelled its request, as without the plugin.
        assert bob.inbound_group_store.get("!room:example.org", curve(pair.alice), session_id)
        assert session_id not in bob.outgoing_key_requests
        assert [m.type for m in pair.bob.outgoing_to_device_messages] == ["m.room_key_request"]
        seen = await rec.drain()
        assert [type(e) for e in seen] == [ForwardedRoomKey]
        event = seen[0]
        assert isinstance(event, ForwardedRoomKey)
        assert event.decrypted_from == curve(pair.alice)
        assert event.forwarding_curve25519_key_chain == ()  # decoded before nio appended to it
    finally:
        await pair.close()


async def test_undecryptable_envelope_is_dispatched_once(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    not_for_us = pair.olm("org.example.x", {})
    not_for_us["content"]["ciphertext"] = {"someone-elses-key": {"type": 0, "body": "AAAA"}}
    garbage = pair.olm("org.example.x", {})
    garbage["content"]["ciphertext"][curve(pair.bob)]["body"] = "bm90IGFuIG9sbSBtZXNzYWdl"
    await feed(pair.bob, [not_for_us, garbage, pair.olm("org.example.ok", {})])
    seen = await rec.drain()
    assert [type(e) for e in seen] == [OlmEncrypted, OlmEncrypted, UnknownToDeviceEvent]
    assert all(e.decrypted_from is None for e in seen[:2])
    assert seen[2].decrypted_from == curve(pair.alice)
    assert rec.count("nio_to_device_total", "undecrypted") == 2
    # nio 0.26 raises on the malformed body; the plugin keeps that out of the sync loop.
    assert rec.count("nio_plugin_errors_total", "nio_to_device") == 1


async def test_a_flood_of_bogus_olm_envelopes_costs_a_bounded_log(
    pair: Pair, rec: Recorder
) -> None:
    """Issue 11: each bogus Olm envelope used to log a 27-line traceback at ERROR. Now each is
    one line without a traceback, and the call site is rate-limited: 1,000 envelopes give a
    bounded log, and every envelope is still dispatched and counted."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    try:
        attach(pair.bob, rec.dispatcher)
        garbage = pair.olm("org.example.x", {})
        garbage["content"]["ciphertext"][curve(pair.bob)]["body"] = "bm90IGFuIG9sbSBtZXNzYWdl"
        for _ in range(10):
            await feed(pair.bob, [garbage] * 100)
        seen = await rec.drain()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert len(seen) == 1000 and all(isinstance(e, OlmEncrypted) for e in seen)
    assert rec.count("nio_plugin_errors_total", "nio_to_device") == 1000
    text = out.getvalue()
    lines = text.splitlines()
    assert "Traceback" not in text
    assert 1 <= len(lines) <= 100, len(lines)
    assert any("nio could not handle a to-device event from @alice" in line for line in lines)
    print(f"1000 bogus Olm envelopes -> {len(lines)} log lines, {len(text)} bytes")


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = payload
        for name in parents:
            target = target[name]
        target[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set("sender", "@mallory:example.org"), "sender mismatch"),
        (_set("recipient", "@carol:example.org"), "recipient mismatch"),
        (_set("recipient_keys.ed25519", "AAAA"), "recipient_keys.ed25519 mismatch"),
        (_set("keys.ed25519", "AAAA"), "keys.ed25519 mismatch"),
        (_set("keys", {}), "keys.ed25519 missing"),
        (
            _set("sender_device_keys", {"user_id": "@mallory:example.org"}),
            "sender_device_keys.user_id mismatch",
        ),
    ],
)
async def test_forged_payload_is_discarded(
    pair: Pair,
    rec: Recorder,
    change: Callable[[dict[str, Any]], None],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attach(pair.bob, rec.dispatcher)
    with caplog.at_level(logging.WARNING, "bot_toolkit.nio_plugin"):
        await feed(pair.bob, [pair.forged(change), pair.olm("org.example.ok", {})])
    seen = await rec.drain()
    assert [type(e) for e in seen] == [OlmEncrypted, UnknownToDeviceEvent]
    assert seen[1].decrypted_from == curve(pair.alice)
    assert rec.count("nio_olm_rejected_total", reason) == 1
    assert reason in caplog.text


async def test_sender_device_keys_are_checked(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    alice = pair.alice.olm
    ids = alice.account.identity_keys

    def device_keys_object(curve_key: str) -> dict[str, Any]:
        sdk: dict[str, Any] = {
            "user_id": ALICE,
            "device_id": "ALICEDEV",
            "algorithms": [OLM],
            "keys": {"curve25519:ALICEDEV": curve_key, "ed25519:ALICEDEV": ids["ed25519"]},
        }
        sdk["signatures"] = {ALICE: {"ed25519:ALICEDEV": alice.sign_json(sdk)}}
        return sdk

    good = device_keys_object(ids["curve25519"])
    unsigned = dict(good, signatures={ALICE: {"ed25519:ALICEDEV": "AAAA"}})
    await feed(
        pair.bob,
        [
            pair.forged(_set("sender_device_keys", good)),
            pair.forged(_set("sender_device_keys", device_keys_object("other"))),
            pair.forged(_set("sender_device_keys", unsigned)),
        ],
    )
    seen = await rec.drain()
    assert [type(e) for e in seen] == [UnknownToDeviceEvent, OlmEncrypted, OlmEncrypted]
    assert rec.count("nio_olm_rejected_total", "sender_device_keys curve25519 mismatch") == 1
    assert rec.count("nio_olm_rejected_total", "sender_device_keys signature invalid") == 1


async def test_forged_room_key_is_not_stored_by_nio(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    pair.alice.olm.create_outbound_group_session("!room:example.org")
    group = pair.alice.olm.outbound_group_sessions["!room:example.org"]

    def forge(payload: dict[str, Any]) -> None:
        payload["type"] = "m.room_key"
        payload["keys"] = {"ed25519": "AAAA"}
        payload["content"] = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": "!room:example.org",
            "session_id": group.id,
            "session_key": group.session_key,
        }

    await feed(pair.bob, [pair.forged(forge)])
    seen = await rec.drain()
    assert [type(e) for e in seen] == [OlmEncrypted]
    assert not pair.bob.olm.inbound_group_store.get(
        "!room:example.org", curve(pair.alice), group.id
    )


# ---------------------------------------------------------------------------- verification switch


async def test_nio_answers_verification_without_intercept(pair: Pair, rec: Recorder) -> None:
    attach(pair.bob, rec.dispatcher)
    await feed(pair.bob, sas_events())
    assert "t-sas" in pair.bob.olm.key_verifications
    sent = [m.type for m in pair.bob.outgoing_to_device_messages]
    assert sent == ["m.key.verification.key"]  # nio's own key went out
    assert [type(e) for e in await rec.drain()] == [KeyVerificationStartSas, KeyVerificationKey]


async def test_intercept_keeps_nio_silent(pair: Pair, rec: Recorder) -> None:
    plugin = attach(pair.bob, rec.dispatcher, intercept_verification=True)
    cancel = {"transaction_id": "t-sas", "code": "m.user", "reason": "bye"}
    await feed(
        pair.bob,
        [*sas_events(), {"type": "m.key.verification.cancel", "sender": ALICE, "content": cancel}],
    )
    assert pair.bob.olm.key_verifications == {}
    assert pair.bob.outgoing_to_device_messages == []
    assert rec.count("nio_verification_intercepted_total") == 3
    # After detach nio reacts again (only this client was switched).
    plugin.detach()
    await feed(pair.bob, sas_events()[:1])
    assert "t-sas" in pair.bob.olm.key_verifications
    assert [type(e) for e in await rec.drain()] == [
        KeyVerificationStartSas,
        KeyVerificationKey,
        KeyVerificationCancel,
    ]


async def test_intercept_is_per_client(rec: Recorder) -> None:
    one, two = Pair(), Pair()
    try:
        attach(one.bob, rec.dispatcher, intercept_verification=True)
        attach(two.bob, Dispatcher())
        await feed(one.bob, sas_events()[:1])
        await feed(two.bob, sas_events()[:1])
        assert one.bob.olm.key_verifications == {}
        assert "t-sas" in two.bob.olm.key_verifications
        # Instance attributes only: the classes are untouched.
        assert "handle_key_verification" in vars(one.bob.olm)
        assert "handle_key_verification" not in vars(two.bob.olm)
        olm_class = type(one.bob.olm)
        assert olm_class.handle_key_verification.__qualname__ == "Olm.handle_key_verification"
        assert AsyncClient._handle_to_device.__qualname__ == "AsyncClient._handle_to_device"
    finally:
        await one.close()
        await two.close()


# ---------------------------------------------------------------------------- handoff and safety


async def test_full_dispatcher_applies_bounded_backpressure(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = Dispatcher(queue_size=1)  # not started: nothing drains the queue
    attach(pair.bob, dispatcher, backpressure_timeout=0.2)
    with caplog.at_level(logging.WARNING, "bot_toolkit.nio_plugin"):
        # Bounded: the sync path gives up after backpressure_timeout instead of blocking.
        async with asyncio.timeout(30):
            await feed(pair.bob, [request("t1"), request("t2"), request("t3")])
    # It waited for room first (the timeout path), then dropped what did not fit.
    assert "dispatcher still full after 0.2s; 2 to-device events of this sync left" in caplog.text
    dropped = dispatcher.metrics.get("nio_to_device_dropped_total")
    assert dropped is not None and dropped.get("queue_full") == 2
    assert "dropped 2 to-device events (queue_full)" in caplog.text
    depth = dispatcher.metrics.get("dispatcher_queue_depth")
    assert depth is not None and depth.get() == 1  # t1 is queued, t2 and t3 were not
    await dispatcher.close(timeout=0.1)


class _FullDispatcher(OrderedDispatcher):
    """Sets ``full`` when a ``put`` finds the queue full (and so has to wait for room)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.full = asyncio.Event()

    async def put(self, event: object) -> None:
        depth = self.metrics.get("dispatcher_queue_depth")
        if depth is not None and depth.get() >= self.queue_size:
            self.full.set()
        await super().put(event)


async def test_backpressure_waits_for_room(pair: Pair) -> None:
    dispatcher = _FullDispatcher(queue_size=1)
    recorder = Recorder(dispatcher)
    attach(pair.bob, dispatcher, backpressure_timeout=5)

    async def start_later() -> None:
        async with asyncio.timeout(5):
            await dispatcher.full.wait()  # the sync path waits for room: make some
        await dispatcher.start()

    later = asyncio.create_task(start_later())
    await feed(pair.bob, [request("t1"), request("t2"), request("t3")])
    await later
    seen = await recorder.drain()
    assert [e.transaction_id for e in seen if isinstance(e, KeyVerificationRequest)] == [
        "t1",
        "t2",
        "t3",
    ]
    assert recorder.count("nio_to_device_dropped_total") == 0


async def test_closed_dispatcher_is_counted_not_raised(pair: Pair) -> None:
    dispatcher = Dispatcher()
    attach(pair.bob, dispatcher)
    await dispatcher.close()
    await feed(pair.bob, [request("t1")])
    dropped = dispatcher.metrics.get("nio_to_device_dropped_total")
    assert dropped is not None and dropped.get("closed") == 1


class _BrokenDispatcher(Dispatcher):
    async def put(self, event: object) -> None:
        raise RuntimeError("broken put")

    def put_nowait(self, event: object) -> bool:
        raise RuntimeError("broken put_nowait")


async def test_our_failures_never_reach_nio(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher = _BrokenDispatcher()
    attach(pair.bob, dispatcher)
    await feed(pair.bob, [request("t1"), pair.olm("org.example.x", {})])

    def broken_decode(*args: object, **kwargs: object) -> ToDeviceEvent:
        raise RuntimeError("broken decode")

    monkeypatch.setattr(_to_device_decoder, "decode", broken_decode)
    await feed(pair.bob, [request("t2"), pair.olm("org.example.y", {})])
    errors = dispatcher.metrics.get("nio_plugin_errors_total")
    assert errors is not None
    assert errors.get("put") == 1 and errors.get("put_nowait") == 2
    assert errors.get("after_event") == 1 and errors.get("decode_payload") == 1


# ---------------------------------------------------------------------------- lifecycle


async def test_attach_before_login_hooks_olm_later(rec: Recorder) -> None:
    late = offline_client(BOB, "LATEDEV", login=False)
    try:
        attach(late, rec.dispatcher, intercept_verification=True)
        assert late.olm is None
        late.restore_login(BOB, "LATEDEV", "not-a-token")  # nio creates its Olm machine now
        olm: Any = late.olm
        await feed(late, sas_events()[:1])
        assert olm.key_verifications == {}
        assert "handle_key_verification" in vars(olm)
        assert [type(e) for e in await rec.drain()] == [KeyVerificationStartSas]
    finally:
        await late.close()


async def test_attach_detach(pair: Pair, rec: Recorder) -> None:
    with pytest.raises(TypeError):
        attach(object(), rec.dispatcher)
    plugin = attach(pair.bob, rec.dispatcher)
    assert isinstance(plugin, NioPlugin) and plugin.attached
    with pytest.raises(RuntimeError, match="already attached"):
        attach(pair.bob, rec.dispatcher)
    plugin.detach()
    plugin.detach()
    assert not plugin.attached
    for name in ("_handle_to_device", "_handle_decrypt_to_device", "keys_query"):
        assert name not in vars(pair.bob)
    for name in ("_verify_olm_payload", "_handle_olm_event"):
        assert name not in vars(pair.bob.olm)
    await feed(pair.bob, [request("t1")])
    assert await rec.drain() == []
    attach(pair.bob, Dispatcher()).detach()  # attaching again works


async def test_a_scheduled_key_query_that_finds_nothing_left_does_not_raise() -> None:
    """nio's sync_forever schedules keys_query() while users are pending; when another task
    fetched their keys first, the query raises LocalProtocolError and sync_forever ends. The
    plugin turns that into an error response."""

    async def race(client: AsyncClient) -> object:
        client.olm.users_for_key_query.add(BOB)
        assert client.should_query_keys
        task = asyncio.ensure_future(client.keys_query())  # what sync_forever does
        client.olm.users_for_key_query.clear()  # another task's query took the user first
        return await task

    bare = offline_client(ALICE, "ALICEDEV")
    with pytest.raises(LocalProtocolError, match="No key query required"):
        await race(bare)

    client = offline_client(ALICE, "ALICEDEV")
    metrics = Metrics()
    plugin = attach(client, Dispatcher(), metrics=metrics)
    result = await race(client)
    assert isinstance(result, KeysQueryError)
    errors = metrics.get("nio_plugin_errors_total")
    assert errors is not None and errors.get("keys_query_race") == 1
    plugin.detach()
    with pytest.raises(LocalProtocolError):
        await race(client)
    await bare.close()
    await client.close()


def test_identity_helpers() -> None:
    a = offline_client(ALICE, "ALICEDEV")
    b = offline_client(BOB, "BOBDEV")
    a.olm.device_store.add(device_of(b))
    me = our_identity(a)
    assert (me.user_id, me.device_id) == (ALICE, "ALICEDEV")
    assert me.curve25519 == curve(a)
    peer = device_keys(a, BOB, "BOBDEV")
    assert peer is not None and peer.curve25519 == curve(b)
    assert peer.ed25519 == our_identity(b).ed25519
    assert device_keys(a, BOB, "OTHER") is None
    assert device_keys(a, "@nobody:example.org", "X") is None
    assert "@nobody:example.org" not in a.olm.device_store.users  # no entry made by the lookup
    with pytest.raises(EncryptionNotReady):
        our_identity(offline_client(ALICE, "X", login=False))
