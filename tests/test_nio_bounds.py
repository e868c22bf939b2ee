"""What the nio plugin keeps from nio, and the entries it cleans up after nio (unit tests).

Real nio clients and Olm machines fed through nio's own sync path (:func:`tests.test_nio_plugin.
feed`), no network. Each test puts a peer-chosen key in front of nio and checks that nio's
``defaultdict``-backed stores hold nothing for it afterwards, while the event still reaches the
dispatcher.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
import vodozemac
from nio import KeysQueryResponse

from bot_toolkit.dispatcher import Dispatcher
from bot_toolkit.events import (
    OlmEncrypted,
    RoomKeyRequest,
    RoomKeyRequestCancellation,
    ToDeviceEvent,
)
from bot_toolkit.metrics import Metrics
from bot_toolkit.nio_plugin import attach
from tests.test_nio_plugin import BOB, OLM, curve, feed, offline_client

BAD_ED25519 = "AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
"""32 bytes that do not decompress to an Edwards point (Synapse accepts such a device)."""


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode().rstrip("=")


async def _run(events: list[dict[str, Any]], **attach_kw: Any) -> tuple[Any, list[ToDeviceEvent]]:
    client = offline_client(BOB, "BOBDEV")
    metrics = Metrics()
    dispatcher = Dispatcher(metrics)
    seen: list[ToDeviceEvent] = []

    async def record(event: ToDeviceEvent) -> None:
        seen.append(event)

    dispatcher.register(ToDeviceEvent, record)
    await dispatcher.start()
    plugin = attach(client, dispatcher, metrics=metrics, **attach_kw)
    client.bounds_metrics = metrics  # type: ignore[attr-defined]
    try:
        await feed(client, events)
        assert await dispatcher.join(10.0)
    finally:
        await dispatcher.close(5.0)
        plugin.detach()
        await client.close()
    return client, seen


def _key_request(sender: str, device: str, n: int, action: str) -> dict[str, Any]:
    content: dict[str, Any] = {
        "action": action,
        "requesting_device_id": device,
        "request_id": f"req-{n}",
    }
    if action == "request":
        content["body"] = {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": "!room:example.org",
            "session_id": f"session-{n}",
            "sender_key": _key(),
        }
    return {"type": "m.room_key_request", "sender": sender, "content": content}


async def test_key_requests_of_other_users_never_reach_nio() -> None:
    events = [
        _key_request(f"@u{n}:example.org", f"DEV{n}", n, action)
        for n in range(40)
        for action in ("request", "request_cancellation")
    ]
    client, seen = await _run(events)
    olm = client.olm
    assert dict(olm.key_requests_waiting_for_session) == {}
    assert olm.received_key_requests == {}
    assert list(olm.device_store.users) == []
    # ...and every one of them still reached our handlers.
    kinds = (RoomKeyRequest, RoomKeyRequestCancellation)
    assert len([e for e in seen if isinstance(e, kinds)]) == len(events)


async def test_own_key_requests_reach_nio_only_from_named_devices() -> None:
    events = [
        _key_request(BOB, "NEWDEVICE", 1, "request"),
        _key_request(BOB, "BACKUP", 2, "request"),
        _key_request(BOB, "NEWDEVICE", 3, "request_cancellation"),
    ]
    for trusted, kept in (({"BACKUP"}, 2), ((), 3)):
        client, seen = await _run(events, trusted_own_devices=trusted)
        counter = client.bounds_metrics.get("nio_kept_from_nio_total")
        assert counter is not None and counter.get("key_request") == kept, trusted
        assert dict(client.olm.key_requests_waiting_for_session) == {}
        assert len(seen) == 3


async def test_olm_envelopes_leave_no_entries_in_nios_stores() -> None:
    bogus_body = base64.b64encode(b"\x03" + os.urandom(60)).decode().rstrip("=")

    def envelope(n: int, sender_key: str) -> dict[str, Any]:
        return {
            "type": "m.room.encrypted",
            "sender": f"@u{n % 7}:example.org",
            "content": {
                "algorithm": OLM,
                "sender_key": sender_key,
                "ciphertext": {"addressed later": {"type": 0, "body": bogus_body}},
            },
        }

    valid = [envelope(n, _key()) for n in range(30)]
    invalid = [envelope(n, "not a curve25519 key " + str(n)) for n in range(30)]
    client, seen = await _run_with_identity(valid + invalid)
    olm = client.olm
    assert dict(olm.session_store._entries) == {}
    assert dict(olm.device_store._entries) == {}
    assert len([e for e in seen if isinstance(e, OlmEncrypted)]) == 60


async def _run_with_identity(events: list[dict[str, Any]]) -> tuple[Any, list[ToDeviceEvent]]:
    """Like :func:`_run`, with each ciphertext addressed to the receiving client's key."""
    client = offline_client(BOB, "BOBDEV")
    ours = curve(client)
    for event in events:
        (ciphertext,) = event["content"]["ciphertext"].values()
        event["content"]["ciphertext"] = {ours: ciphertext}
    metrics = Metrics()
    dispatcher = Dispatcher(metrics)
    seen: list[ToDeviceEvent] = []

    async def record(event: ToDeviceEvent) -> None:
        seen.append(event)

    dispatcher.register(ToDeviceEvent, record)
    await dispatcher.start()
    plugin = attach(client, dispatcher, metrics=metrics)
    try:
        await feed(client, events)
        assert await dispatcher.join(10.0)
        kept = metrics.get("nio_kept_from_nio_total")
        assert kept is not None and kept.get("invalid_sender_key") == sum(
            1 for e in events if len(e["content"]["sender_key"]) != 43
        )
    finally:
        await dispatcher.close(5.0)
        plugin.detach()
        await client.close()
    return client, seen


def _device(user_id: str, device_id: str, ed25519: str, curve25519: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": [OLM, "m.megolm.v1.aes-sha2"],
        "keys": {f"ed25519:{device_id}": ed25519, f"curve25519:{device_id}": curve25519},
        "signatures": {user_id: {f"ed25519:{device_id}": "A" * 86}},
    }


@pytest.mark.parametrize(
    ("ed25519", "curve25519", "reason"),
    [
        (BAD_ED25519, None, "invalid ed25519 key"),
        (None, "c2hvcnQ", "invalid curve25519 key"),
        ("not base64!", None, "invalid ed25519 key"),
    ],
)
async def test_a_device_with_malformed_keys_is_skipped_not_fatal(
    ed25519: str | None, curve25519: str | None, reason: str
) -> None:
    """nio 0.26 raises out of the whole key query for a bad ed25519 point; the plugin skips
    the device (counted), so nio handles the rest of the answer."""
    from tests.test_nio_plugin import device_of  # noqa: PLC0415

    client = offline_client(BOB, "BOBDEV")
    peer = offline_client("@alice:example.org", "GOOD")
    metrics = Metrics()
    dispatcher = Dispatcher(metrics)
    plugin = attach(client, dispatcher, metrics=metrics)
    try:
        good = device_of(peer)
        good_payload = _device(good.user_id, good.device_id, good.ed25519, good.curve25519)
        peer.olm.sign_json(good_payload)
        good_payload["signatures"] = {
            good.user_id: {"ed25519:GOOD": peer.olm.account.sign(_canonical(good_payload))}
        }
        other = vodozemac.Account()  # a valid key where the case does not break one
        bad = _device(
            good.user_id,
            "BAD",
            ed25519 or other.ed25519_key.to_base64(),
            curve25519 or other.curve25519_key.to_base64(),
        )
        response = KeysQueryResponse.from_dict(
            {"device_keys": {good.user_id: {"BAD": bad, "GOOD": good_payload}}, "failures": {}}
        )
        await client.receive_response(response)  # raised KeyException before
        devices = client.olm.device_store[good.user_id]
        assert set(devices) == {"GOOD"}
        skipped = metrics.get("nio_devices_skipped_total")
        assert skipped is not None and skipped.get(reason) == 1
    finally:
        plugin.detach()
        await client.close()
        await peer.close()


def _canonical(payload: dict[str, Any]) -> str:
    import json  # noqa: PLC0415

    body = {k: v for k, v in payload.items() if k not in ("signatures", "unsigned")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
