"""Tests for bot_toolkit.events: typed to-device events, decode(), encode_content()."""

from __future__ import annotations

import copy
import json
import pickle
from types import MappingProxyType
from typing import Any

import msgspec
import pytest

from bot_toolkit import (
    CancelCode,
    DecodeError,
    Dummy,
    ForwardedRoomKey,
    KeyVerificationAccept,
    KeyVerificationCancel,
    KeyVerificationDone,
    KeyVerificationKey,
    KeyVerificationMac,
    KeyVerificationReady,
    KeyVerificationRequest,
    KeyVerificationStart,
    KeyVerificationStartReciprocate,
    KeyVerificationStartSas,
    MegolmEncrypted,
    OlmCiphertext,
    OlmEncrypted,
    RequestedKeyInfo,
    RoomEncrypted,
    RoomKey,
    RoomKeyRequest,
    RoomKeyRequestCancellation,
    RoomKeyWithheld,
    SecretRequest,
    SecretSend,
    ToDeviceEvent,
    UnknownToDeviceEvent,
    VerificationEvent,
    VerificationRelatesTo,
    WithheldCode,
    decode,
    encode_content,
)
from bot_toolkit._json_depth import MAX_JSON_DEPTH, exceeds_depth
from bot_toolkit.events import KNOWN_EVENT_TYPES, event_type_label

SENDER = "@alice:example.org"
TXN = "S0meUniqueAndOpaqueString"
B64 = "fQpGIW1Snz+pwLZu6sTy2aHy/DYWWTspTJRPyNp0PKk"
ROOM = "!Cuyf34gef24t:localhost"
SESSION = "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ"
CURVE = "RF3s+E7RkTQTGF2d8Deol0FkQvgII2aJDf3/Jp5mxVU"
ED = "aj40p+aw64yPIdsxoog8jhPu9i7l7NcFRecuOQblE3Y"
SESSION_KEY = "AgAAAADxKHa9uFxcXzwYoNueL5Xqi69IkD4sni8Llf...SUPERSECRETKEY"
SECRET = "ThisIsASecretDoNotShare"
MAC_KEYS = "2Wptgo4CwmLo/Y8B8qinxApKaCkBG2fjTWB7AbP5Uy+aIbygsSdLOFzvdDjww8zUVKCmI02eP9xtyJxc/cLiBA"
MAC_VALUE = "fQpGIW1Snz+pwLZu6sTy2aHy/DYWWTspTJRPyNp0PKkymfIsNffysMl6ObMMFdIJhk6g6pwlIqZ54rxo8SLmAg"
RELATES = {"rel_type": "m.reference", "event_id": "$request_event_id"}


def ev(event_type: str, content: dict[str, Any], sender: str = SENDER) -> dict[str, Any]:
    return {"type": event_type, "sender": sender, "content": content}


# name -> (raw event, expected class, expected field values, required content fields)
# A required field is a tuple of keys into content (nested for body.room_id).
EXAMPLES: dict[
    str, tuple[dict[str, Any], type[ToDeviceEvent], dict[str, Any], list[tuple[str, ...]]]
]
EXAMPLES = {
    "request": (
        ev(
            "m.key.verification.request",
            {
                "from_device": "AliceDevice2",
                "methods": ["m.sas.v1"],
                "timestamp": 1559598944869,
                "transaction_id": TXN,
            },
        ),
        KeyVerificationRequest,
        {
            "transaction_id": TXN,
            "from_device": "AliceDevice2",
            "methods": ("m.sas.v1",),
            "timestamp": 1559598944869,
        },
        [("transaction_id",), ("from_device",), ("methods",), ("timestamp",)],
    ),
    "ready": (
        ev(
            "m.key.verification.ready",
            {"from_device": "BobDevice1", "methods": ["m.sas.v1"], "transaction_id": TXN},
        ),
        KeyVerificationReady,
        {"transaction_id": TXN, "from_device": "BobDevice1", "methods": ("m.sas.v1",)},
        [("transaction_id",), ("from_device",), ("methods",)],
    ),
    "start_sas": (
        ev(
            "m.key.verification.start",
            {
                "from_device": "BobDevice1",
                "method": "m.sas.v1",
                "transaction_id": TXN,
                "key_agreement_protocols": ["curve25519-hkdf-sha256"],
                "hashes": ["sha256"],
                "message_authentication_codes": ["hkdf-hmac-sha256.v2", "hkdf-hmac-sha256"],
                "short_authentication_string": ["decimal", "emoji"],
            },
        ),
        KeyVerificationStartSas,
        {
            "from_device": "BobDevice1",
            "method": "m.sas.v1",
            "key_agreement_protocols": ("curve25519-hkdf-sha256",),
            "hashes": ("sha256",),
            "message_authentication_codes": ("hkdf-hmac-sha256.v2", "hkdf-hmac-sha256"),
            "short_authentication_string": ("decimal", "emoji"),
            "next_method": None,
            "relates_to": None,
        },
        [
            ("transaction_id",),
            ("from_device",),
            ("method",),
            ("key_agreement_protocols",),
            ("hashes",),
            ("message_authentication_codes",),
            ("short_authentication_string",),
        ],
    ),
    "start_reciprocate": (
        ev(
            "m.key.verification.start",
            {
                "from_device": "BobDevice1",
                "method": "m.reciprocate.v1",
                "secret": SECRET,
                "transaction_id": TXN,
            },
        ),
        KeyVerificationStartReciprocate,
        {"from_device": "BobDevice1", "method": "m.reciprocate.v1", "secret": SECRET},
        [("transaction_id",), ("from_device",), ("method",), ("secret",)],
    ),
    "start_other_method": (
        ev(
            "m.key.verification.start",
            {
                "from_device": "BobDevice1",
                "method": "org.example.future.v9",
                "next_method": "m.sas.v1",
                "transaction_id": TXN,
                "m.relates_to": RELATES,
            },
        ),
        KeyVerificationStart,
        {
            "method": "org.example.future.v9",
            "next_method": "m.sas.v1",
            "relates_to": VerificationRelatesTo(
                rel_type="m.reference", event_id="$request_event_id"
            ),
        },
        [("transaction_id",), ("from_device",), ("method",)],
    ),
    "accept": (
        ev(
            "m.key.verification.accept",
            {
                "commitment": B64,
                "hash": "sha256",
                "key_agreement_protocol": "curve25519-hkdf-sha256",
                "message_authentication_code": "hkdf-hmac-sha256.v2",
                "method": "m.sas.v1",
                "short_authentication_string": ["decimal", "emoji"],
                "transaction_id": TXN,
            },
        ),
        KeyVerificationAccept,
        {
            "commitment": B64,
            "hash": "sha256",
            "key_agreement_protocol": "curve25519-hkdf-sha256",
            "message_authentication_code": "hkdf-hmac-sha256.v2",
            "method": "m.sas.v1",
            "short_authentication_string": ("decimal", "emoji"),
        },
        [
            ("transaction_id",),
            ("key_agreement_protocol",),
            ("hash",),
            ("message_authentication_code",),
            ("short_authentication_string",),
            ("commitment",),
        ],
    ),
    "key": (
        ev("m.key.verification.key", {"key": B64, "transaction_id": TXN}),
        KeyVerificationKey,
        {"key": B64, "transaction_id": TXN},
        [("transaction_id",), ("key",)],
    ),
    "mac": (
        ev(
            "m.key.verification.mac",
            {
                "keys": MAC_KEYS,
                "mac": {"ed25519:ABCDEF": MAC_VALUE},
                "transaction_id": TXN,
            },
        ),
        KeyVerificationMac,
        {
            "keys": MAC_KEYS,
            "mac": {"ed25519:ABCDEF": MAC_VALUE},
        },
        [("transaction_id",), ("mac",), ("keys",)],
    ),
    "done": (
        ev("m.key.verification.done", {"transaction_id": TXN}),
        KeyVerificationDone,
        {"transaction_id": TXN, "relates_to": None},
        [("transaction_id",)],
    ),
    "cancel": (
        ev(
            "m.key.verification.cancel",
            {
                "code": "m.user",
                "reason": "User rejected the key verification request",
                "transaction_id": TXN,
            },
        ),
        KeyVerificationCancel,
        {"code": CancelCode.USER, "reason": "User rejected the key verification request"},
        [("transaction_id",), ("code",), ("reason",)],
    ),
    "room_key": (
        ev(
            "m.room_key",
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "room_id": ROOM,
                "session_id": SESSION,
                "session_key": SESSION_KEY,
                "shared_history": True,
            },
        ),
        RoomKey,
        {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": ROOM,
            "session_id": SESSION,
            "session_key": SESSION_KEY,
            "shared_history": True,
        },
        [("algorithm",), ("room_id",), ("session_id",), ("session_key",)],
    ),
    "forwarded_room_key": (
        ev(
            "m.forwarded_room_key",
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "forwarding_curve25519_key_chain": ["hPQNcabIABgGnx3/ACv/jmMmiQHoeFfuLB17tzWp6Hw"],
                "room_id": ROOM,
                "sender_claimed_ed25519_key": ED,
                "sender_key": CURVE,
                "session_id": SESSION,
                "session_key": SESSION_KEY,
                "withheld": {"code": "m.unverified", "reason": "Device not verified"},
            },
        ),
        ForwardedRoomKey,
        {
            "forwarding_curve25519_key_chain": ("hPQNcabIABgGnx3/ACv/jmMmiQHoeFfuLB17tzWp6Hw",),
            "sender_claimed_ed25519_key": ED,
            "sender_key": CURVE,
            "session_key": SESSION_KEY,
            "withheld": {"code": "m.unverified", "reason": "Device not verified"},
        },
        [
            ("algorithm",),
            ("room_id",),
            ("sender_key",),
            ("session_id",),
            ("session_key",),
            ("sender_claimed_ed25519_key",),
            ("forwarding_curve25519_key_chain",),
        ],
    ),
    "room_key_request": (
        ev(
            "m.room_key_request",
            {
                "action": "request",
                "body": {
                    "algorithm": "m.megolm.v1.aes-sha2",
                    "room_id": ROOM,
                    "sender_key": CURVE,
                    "session_id": SESSION,
                },
                "request_id": "1495474790150.19",
                "requesting_device_id": "RJYKSTBOIE",
            },
        ),
        RoomKeyRequest,
        {
            "body": RequestedKeyInfo(
                algorithm="m.megolm.v1.aes-sha2", room_id=ROOM, sender_key=CURVE, session_id=SESSION
            ),
            "request_id": "1495474790150.19",
            "requesting_device_id": "RJYKSTBOIE",
            "action": "request",
        },
        [
            ("action",),
            ("requesting_device_id",),
            ("request_id",),
            ("body",),
            ("body", "algorithm"),
            ("body", "room_id"),
            ("body", "session_id"),
        ],
    ),
    "room_key_request_cancellation": (
        ev(
            "m.room_key_request",
            {
                "action": "request_cancellation",
                "request_id": "1495474790150.19",
                "requesting_device_id": "RJYKSTBOIE",
            },
        ),
        RoomKeyRequestCancellation,
        {"request_id": "1495474790150.19", "requesting_device_id": "RJYKSTBOIE"},
        [("action",), ("requesting_device_id",), ("request_id",)],
    ),
    "withheld": (
        ev(
            "m.room_key.withheld",
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "code": "m.unverified",
                "reason": "Device not verified",
                "room_id": ROOM,
                "sender_key": CURVE,
                "session_id": SESSION,
            },
        ),
        RoomKeyWithheld,
        {
            "code": WithheldCode.UNVERIFIED,
            "reason": "Device not verified",
            "room_id": ROOM,
            "session_id": SESSION,
            "sender_key": CURVE,
            "from_device": None,
        },
        [("algorithm",), ("sender_key",), ("code",), ("room_id",), ("session_id",)],
    ),
    "withheld_no_olm_unstable": (
        ev(
            "org.matrix.room_key.withheld",
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "code": "m.no_olm",
                "reason": "Unable to establish a secure channel.",
                "sender_key": CURVE,
                "from_device": "ALICEDEVICE",
            },
        ),
        RoomKeyWithheld,
        {"code": "m.no_olm", "room_id": None, "session_id": None, "from_device": "ALICEDEVICE"},
        [("algorithm",), ("sender_key",), ("code",)],
    ),
    "dummy": (ev("m.dummy", {}), Dummy, {}, []),
    "secret_request": (
        ev(
            "m.secret.request",
            {
                "action": "request",
                "name": "org.example.some.secret",
                "request_id": "randomly_generated_id_9573",
                "requesting_device_id": "ABCDEFG",
            },
        ),
        SecretRequest,
        {
            "action": "request",
            "name": "org.example.some.secret",
            "request_id": "randomly_generated_id_9573",
            "requesting_device_id": "ABCDEFG",
        },
        [("action",), ("requesting_device_id",), ("request_id",), ("name",)],
    ),
    "secret_request_cancellation": (
        ev(
            "m.secret.request",
            {
                "action": "request_cancellation",
                "request_id": "randomly_generated_id_9573",
                "requesting_device_id": "ABCDEFG",
            },
        ),
        SecretRequest,
        {"action": "request_cancellation", "name": None},
        [("action",), ("requesting_device_id",), ("request_id",)],
    ),
    "secret_send": (
        ev("m.secret.send", {"request_id": "randomly_generated_id_9573", "secret": SECRET}),
        SecretSend,
        {"request_id": "randomly_generated_id_9573", "secret": SECRET},
        [("request_id",), ("secret",)],
    ),
    "olm_encrypted": (
        ev(
            "m.room.encrypted",
            {
                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                "ciphertext": {
                    "7qZcfnBmbEGzxxaWfBjElJuvn7BZx+lSz/SvFrDF/z8": {
                        "body": "AwogGJJzMhf/S3GQFXAOrCZ3iKyGU5ZScVtjI0KypTYrW...",
                        "type": 0,
                    }
                },
                "sender_key": "Szl29ksW/L8yZGWAX+8dY1XyFi+i5wm+DRhTGkbMiwU",
            },
        ),
        OlmEncrypted,
        {
            "algorithm": "m.olm.v1.curve25519-aes-sha2",
            "ciphertext": {
                "7qZcfnBmbEGzxxaWfBjElJuvn7BZx+lSz/SvFrDF/z8": OlmCiphertext(
                    type=0, body="AwogGJJzMhf/S3GQFXAOrCZ3iKyGU5ZScVtjI0KypTYrW..."
                )
            },
            "sender_key": "Szl29ksW/L8yZGWAX+8dY1XyFi+i5wm+DRhTGkbMiwU",
            "device_id": None,
        },
        [("algorithm",), ("ciphertext",), ("sender_key",)],
    ),
    "megolm_encrypted": (
        ev(
            "m.room.encrypted",
            {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg...",
                "device_id": "RJYKSTBOIE",
                "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA",
                "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
            },
        ),
        MegolmEncrypted,
        {
            "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg...",
            "device_id": "RJYKSTBOIE",
            "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
        },
        [("algorithm",), ("ciphertext",), ("session_id",)],
    ),
}

VERIFICATION = {
    name for name, (_, cls, _, _) in EXAMPLES.items() if issubclass(cls, VerificationEvent)
}


def _wrong(value: object) -> object:
    """A JSON value of a different type than ``value``."""
    if isinstance(value, str):
        return 12345
    if isinstance(value, bool):
        return "true"
    if isinstance(value, int):
        return "1559598944869"
    if isinstance(value, list):
        return "not-an-array"
    return ["not-an-object"]


def _without(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    mutated = copy.deepcopy(raw)
    target = mutated["content"]
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return mutated


def _with(raw: dict[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    mutated = copy.deepcopy(raw)
    target = mutated["content"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return mutated


def _decode_error(raw: object) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw)  # type: ignore[arg-type]
    return info.value


REQUIRED = [
    pytest.param(name, path, id=f"{name}:{'.'.join(path)}")
    for name, (_, _, _, required) in EXAMPLES.items()
    for path in required
]


# --------------------------------------------------------------------------- valid examples


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_decodes_to_its_class(name: str) -> None:
    raw, cls, fields, _ = EXAMPLES[name]
    before = copy.deepcopy(raw)
    event = decode(raw)
    assert type(event) is cls
    assert event.sender == SENDER
    assert event.decrypted_from is None
    for field, value in fields.items():
        assert getattr(event, field) == value, field
    assert raw == before  # the input is never modified


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_decodes_from_json_bytes_and_str(name: str) -> None:
    raw = EXAMPLES[name][0]
    from_dict = decode(raw)
    assert decode(json.dumps(raw)) == from_dict
    assert decode(json.dumps(raw).encode()) == from_dict
    assert decode(bytearray(json.dumps(raw).encode())) == from_dict
    assert decode(MappingProxyType(raw)) == from_dict


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_decrypted_from_is_kept(name: str) -> None:
    event = decode(EXAMPLES[name][0], decrypted_from=CURVE)
    assert event.decrypted_from == CURVE


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_unknown_content_keys_are_ignored(name: str) -> None:
    raw = _with(EXAMPLES[name][0], ("org.example.future",), {"nested": [1, 2, {"x": None}]})
    raw["content"]["relates_to"] = "not the wire name, ignored"
    assert decode(raw) == decode(EXAMPLES[name][0])


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_content_cannot_override_envelope_fields(name: str) -> None:
    raw = _with(EXAMPLES[name][0], ("sender",), "@mallory:example.org")
    raw["content"]["decrypted_from"] = 42
    event = decode(raw, decrypted_from=CURVE)
    assert event.sender == SENDER
    assert event.decrypted_from == CURVE


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_event_type_classvar(name: str) -> None:
    raw, cls, _, _ = EXAMPLES[name]
    expected = raw["type"].replace("org.matrix.room_key.withheld", "m.room_key.withheld")
    assert cls.event_type == expected
    assert decode(raw).event_type == expected


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_events_are_frozen(name: str) -> None:
    event = decode(EXAMPLES[name][0])
    with pytest.raises(AttributeError):
        event.sender = "@mallory:example.org"  # type: ignore[misc]


def test_class_hierarchy() -> None:
    assert issubclass(KeyVerificationStartSas, KeyVerificationStart)
    assert issubclass(KeyVerificationStartReciprocate, KeyVerificationStart)
    assert issubclass(KeyVerificationStart, VerificationEvent)
    assert issubclass(VerificationEvent, ToDeviceEvent)
    assert issubclass(OlmEncrypted, RoomEncrypted)
    assert issubclass(MegolmEncrypted, RoomEncrypted)
    for cls in (RoomKey, RoomKeyWithheld, Dummy, SecretSend, UnknownToDeviceEvent):
        assert issubclass(cls, ToDeviceEvent)
        assert not issubclass(cls, VerificationEvent)


# --------------------------------------------------------------------------- required fields


@pytest.mark.parametrize(("name", "path"), REQUIRED)
def test_missing_required_field(name: str, path: tuple[str, ...]) -> None:
    raw = EXAMPLES[name][0]
    error = _decode_error(_without(raw, path))
    assert error.path == "content." + ".".join(path)
    assert error.event_type == raw["type"]
    assert "missing" in error.reason


@pytest.mark.parametrize(("name", "path"), REQUIRED)
def test_wrong_type_required_field(name: str, path: tuple[str, ...]) -> None:
    raw = EXAMPLES[name][0]
    target = raw["content"]
    for key in path:
        target = target[key]
    error = _decode_error(_with(raw, path, _wrong(target)))
    assert error.path == "content." + ".".join(path)
    assert error.event_type == raw["type"]
    assert error.reason


@pytest.mark.parametrize(("name", "path"), REQUIRED)
def test_null_required_field(name: str, path: tuple[str, ...]) -> None:
    error = _decode_error(_with(EXAMPLES[name][0], path, None))
    assert error.path == "content." + ".".join(path)


@pytest.mark.parametrize(
    ("name", "path", "value", "expected_path"),
    [
        ("request", ("methods",), ["m.sas.v1", 7], "content.methods[1]"),
        ("request", ("timestamp",), True, "content.timestamp"),
        ("request", ("timestamp",), 1559598944869.5, "content.timestamp"),
        ("request", ("timestamp",), 2**64, "content.timestamp"),
        ("mac", ("mac",), {"ed25519:ABCDEF": 5}, "content.mac[...]"),
        ("start_sas", ("hashes",), [None], "content.hashes[0]"),
        ("start_other_method", ("m.relates_to",), "x", "content.m.relates_to"),
        ("start_other_method", ("m.relates_to",), {"event_id": 5}, "content.m.relates_to.event_id"),
        ("olm_encrypted", ("ciphertext",), "a string", "content.ciphertext"),
        ("olm_encrypted", ("ciphertext",), {"k": {"body": "b"}}, "content.ciphertext[...].type"),
        (
            "olm_encrypted",
            ("ciphertext",),
            {"k": {"type": "0", "body": "b"}},
            "content.ciphertext[...].type",
        ),
        (
            "megolm_encrypted",
            ("ciphertext",),
            {"k": {"type": 0, "body": "b"}},
            "content.ciphertext",
        ),
        ("forwarded_room_key", ("withheld",), "x", "content.withheld"),
        ("room_key_request", ("body", "sender_key"), 1, "content.body.sender_key"),
    ],
)
def test_nested_paths(name: str, path: tuple[str, ...], value: object, expected_path: str) -> None:
    error = _decode_error(_with(EXAMPLES[name][0], path, value))
    assert error.path == expected_path


def test_non_string_key_in_map() -> None:
    raw = _with(EXAMPLES["mac"][0], ("mac",), {1: "x"})
    error = _decode_error(raw)
    assert error.path == "content.mac"
    assert "key" in error.reason


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize("field", ["type", "sender", "content"])
def test_envelope_field_missing_or_wrong(field: str) -> None:
    raw = dict(EXAMPLES["key"][0])
    del raw[field]
    error = _decode_error(raw)
    assert error.path == field
    assert "missing" in error.reason
    raw[field] = 5
    error = _decode_error(raw)
    assert error.path == field
    assert "int" in error.reason


@pytest.mark.parametrize(
    "raw", [[], [1, 2], 5, None, "null", b"[1]", b"{", b"\xff\xfe", "NaN", 3.5, object()]
)
def test_not_an_object(raw: object) -> None:
    error = _decode_error(raw)
    assert error.event_type is None
    assert error.path == ""


def test_decrypted_from_wrong_type() -> None:
    with pytest.raises(DecodeError) as info:
        decode(EXAMPLES["key"][0], decrypted_from=5)  # type: ignore[arg-type]
    assert info.value.path == "decrypted_from"


def test_deeply_nested_json() -> None:
    assert _decode_error(b"[" * 100_000).path == ""


# --------------------------------------------------------------------------- rules


def test_transaction_id_null_is_rejected() -> None:
    for name in VERIFICATION:
        error = _decode_error(_with(EXAMPLES[name][0], ("transaction_id",), None))
        assert error.path == "content.transaction_id"


def test_unknown_cancel_code_kept() -> None:
    raw = _with(EXAMPLES["cancel"][0], ("code",), "org.example.custom_code")
    event = decode(raw)
    assert isinstance(event, KeyVerificationCancel)
    assert event.code == "org.example.custom_code"
    assert event.code not in set(CancelCode)


def test_unknown_withheld_code_kept() -> None:
    event = decode(_with(EXAMPLES["withheld"][0], ("code",), "org.example.nope"))
    assert isinstance(event, RoomKeyWithheld)
    assert event.code == "org.example.nope"


def test_cancel_code_values() -> None:
    assert {c.value for c in CancelCode} >= {
        "m.user",
        "m.timeout",
        "m.unknown_transaction",
        "m.unknown_method",
        "m.unexpected_message",
        "m.key_mismatch",
        "m.user_mismatch",
        "m.invalid_message",
        "m.accepted",
        "m.mismatched_commitment",
        "m.mismatched_sas",
    }
    assert {c.value for c in WithheldCode} >= {
        "m.blacklisted",
        "m.unverified",
        "m.unauthorised",
        "m.unavailable",
        "m.no_olm",
    }
    assert CancelCode("m.user") is CancelCode.USER


def test_withheld_no_olm_needs_no_room() -> None:
    raw = ev(
        "m.room_key.withheld",
        {"algorithm": "m.megolm.v1.aes-sha2", "code": "m.no_olm", "sender_key": CURVE},
    )
    event = decode(raw)
    assert isinstance(event, RoomKeyWithheld)
    assert event.code == WithheldCode.NO_OLM
    assert event.room_id is None
    assert event.session_id is None


@pytest.mark.parametrize("code", ["m.unavailable", "m.blacklisted", "org.example.custom"])
def test_withheld_other_codes_need_room(code: str) -> None:
    raw = ev(
        "m.room_key.withheld",
        {"algorithm": "m.megolm.v1.aes-sha2", "code": code, "sender_key": CURVE, "session_id": "s"},
    )
    error = _decode_error(raw)
    assert error.path == "content.room_id"
    assert "m.no_olm" in error.reason
    raw["content"]["room_id"] = ROOM
    del raw["content"]["session_id"]
    assert _decode_error(raw).path == "content.session_id"


def test_accept_without_method_means_sas() -> None:
    event = decode(_without(EXAMPLES["accept"][0], ("method",)))
    assert isinstance(event, KeyVerificationAccept)
    assert event.method == "m.sas.v1"
    error = _decode_error(_with(EXAMPLES["accept"][0], ("method",), 1))
    assert error.path == "content.method"
    other = decode(_with(EXAMPLES["accept"][0], ("method",), "org.example.other"))
    assert isinstance(other, KeyVerificationAccept)
    assert other.method == "org.example.other"  # kept; the SAS code refuses it


def test_start_unknown_method_is_plain_start() -> None:
    event = decode(EXAMPLES["start_other_method"][0])
    assert type(event) is KeyVerificationStart


def test_start_sas_with_missing_field_is_not_downgraded() -> None:
    error = _decode_error(_without(EXAMPLES["start_sas"][0], ("hashes",)))
    assert error.path == "content.hashes"


def test_unknown_sas_values_are_kept() -> None:
    raw = _with(
        EXAMPLES["start_sas"][0], ("short_authentication_string",), ["decimal", "org.example.sas"]
    )
    event = decode(raw)
    assert isinstance(event, KeyVerificationStartSas)
    assert event.short_authentication_string == ("decimal", "org.example.sas")


@pytest.mark.parametrize("name", ["room_key_request", "secret_request"])
def test_unknown_action_rejected(name: str) -> None:
    error = _decode_error(_with(EXAMPLES[name][0], ("action",), "org.example.other"))
    assert error.path == "content.action"
    assert "unknown action" in error.reason


def test_secret_request_cancellation_without_name() -> None:
    event = decode(EXAMPLES["secret_request_cancellation"][0])
    assert isinstance(event, SecretRequest)
    assert event.name is None


def test_room_key_request_cancellation_ignores_body() -> None:
    raw = _with(EXAMPLES["room_key_request_cancellation"][0], ("body",), "garbage")
    assert type(decode(raw)) is RoomKeyRequestCancellation


@pytest.mark.parametrize("value", [None, "yes", 1, [], {}])
def test_room_key_shared_history_non_bool_means_false(value: object) -> None:
    raw = _with(EXAMPLES["room_key"][0], ("shared_history",), value)
    before = copy.deepcopy(raw)
    event = decode(raw)
    assert isinstance(event, RoomKey)
    assert event.shared_history is False
    assert raw == before
    missing = decode(_without(EXAMPLES["room_key"][0], ("shared_history",)))
    assert isinstance(missing, RoomKey)
    assert missing.shared_history is False


def test_unknown_algorithm_encrypted_is_base_class() -> None:
    raw = ev("m.room.encrypted", {"algorithm": "org.example.crypto", "ciphertext": [1, 2]})
    event = decode(raw)
    assert type(event) is RoomEncrypted
    assert event.ciphertext == [1, 2]


def test_unknown_type() -> None:
    content = {"anything": [1, {"goes": None}], "n": 1.5}
    raw = ev("org.example.custom.event", content)
    event = decode(raw, decrypted_from=CURVE)
    assert isinstance(event, UnknownToDeviceEvent)
    assert event.event_type_name == "org.example.custom.event"
    assert event.content is content
    assert event.sender == SENDER
    assert event.decrypted_from == CURVE
    assert encode_content(event) == content


def test_unknown_type_with_non_string_key() -> None:
    error = _decode_error(
        {"type": "org.example.custom.event", "sender": SENDER, "content": {1: "x"}}
    )
    assert error.path == "content"


# --------------------------------------------------------------------------- DecodeError


def test_decode_error_attributes_and_message() -> None:
    error = _decode_error(_without(EXAMPLES["cancel"][0], ("code",)))
    assert isinstance(error, ValueError)
    assert (error.event_type, error.path, error.reason) == (
        "m.key.verification.cancel",
        "content.code",
        "missing required field",
    )
    message = str(error)
    assert "m.key.verification.cancel" in message
    assert "content.code" in message
    assert "missing required field" in message
    copy_ = pickle.loads(pickle.dumps(error))
    assert (copy_.event_type, copy_.path, copy_.reason) == (
        error.event_type,
        error.path,
        error.reason,
    )


def test_decode_error_message_without_type() -> None:
    error = DecodeError(None, "", "bad")
    assert "bad" in str(error)


# --------------------------------------------------------------------------- secrets in repr


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("room_key", SESSION_KEY),
        ("forwarded_room_key", SESSION_KEY),
        ("secret_send", SECRET),
        ("start_reciprocate", SECRET),
    ],
)
def test_secrets_not_in_repr(name: str, secret: str) -> None:
    event = decode(EXAMPLES[name][0])
    for text in (repr(event), str(event), f"{event!r}", f"{event}", repr([event])):
        assert secret not in text
        assert "<redacted>" in text
    rich = dict(event.__rich_repr__())
    assert secret not in repr(rich)
    assert event.sender in repr(event)  # the rest is still shown


def test_repr_of_event_without_secrets_is_normal() -> None:
    event = decode(EXAMPLES["key"][0])
    assert repr(event).startswith("KeyVerificationKey(")
    assert B64 in repr(event)


# --------------------------------------------------------------------------- encode_content


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_encode_content_round_trips(name: str) -> None:
    raw = EXAMPLES[name][0]
    event = decode(raw, decrypted_from=CURVE)
    content = encode_content(event)
    assert "sender" not in content
    assert "decrypted_from" not in content
    assert None not in content.values()
    # Plain JSON types under wire names.
    assert msgspec.json.decode(msgspec.json.encode(content)) == content
    again = decode(
        {"type": event.event_type, "sender": event.sender, "content": content},
        decrypted_from=CURVE,
    )
    assert again == event


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_encode_content_matches_wire(name: str) -> None:
    raw = EXAMPLES[name][0]
    content = encode_content(decode(raw))
    assert content == raw["content"]


def test_outbound_constructors() -> None:
    cancel = KeyVerificationCancel(
        sender="@bot:example.org", transaction_id=TXN, code=CancelCode.USER, reason="no"
    )
    assert encode_content(cancel) == {"transaction_id": TXN, "code": "m.user", "reason": "no"}
    assert type(encode_content(cancel)["code"]) is str

    start = KeyVerificationStartSas(
        sender="@bot:example.org",
        transaction_id=TXN,
        from_device="BOT",
        key_agreement_protocols=("curve25519-hkdf-sha256",),
        hashes=("sha256",),
        message_authentication_codes=("hkdf-hmac-sha256.v2",),
        short_authentication_string=("decimal", "emoji"),
    )
    assert encode_content(start) == {
        "transaction_id": TXN,
        "from_device": "BOT",
        "method": "m.sas.v1",
        "key_agreement_protocols": ["curve25519-hkdf-sha256"],
        "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
        "short_authentication_string": ["decimal", "emoji"],
    }

    done = KeyVerificationDone(
        sender="@bot:example.org",
        transaction_id=None,
        relates_to=VerificationRelatesTo(rel_type="m.reference", event_id="$e"),
    )
    assert encode_content(done) == {"m.relates_to": {"rel_type": "m.reference", "event_id": "$e"}}

    withheld = RoomKeyWithheld(
        sender="@bot:example.org",
        algorithm="m.megolm.v1.aes-sha2",
        sender_key=CURVE,
        code=WithheldCode.NO_OLM,
        reason="Unable to establish a secure channel.",
    )
    assert encode_content(withheld) == {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": CURVE,
        "code": "m.no_olm",
        "reason": "Unable to establish a secure channel.",
    }

    request = RoomKeyRequestCancellation(
        sender="@bot:example.org", requesting_device_id="BOT", request_id="r1"
    )
    assert encode_content(request) == {
        "action": "request_cancellation",
        "requesting_device_id": "BOT",
        "request_id": "r1",
    }

    assert encode_content(Dummy(sender="@bot:example.org")) == {}


def test_event_type_label_keeps_known_types_only() -> None:
    assert event_type_label("m.key.verification.start") == "m.key.verification.start"
    assert event_type_label("org.matrix.room_key.withheld") == "org.matrix.room_key.withheld"
    assert event_type_label("org.example.whatever") == "other"
    assert event_type_label(None) == "other"
    assert "m.room.encrypted" in KNOWN_EVENT_TYPES


def test_depth_bound_is_checked_without_recursion() -> None:
    def nested(levels: int) -> object:
        value: object = "leaf"
        for i in range(levels):
            value = {"a": value} if i % 2 else [value]
        return value

    assert not exceeds_depth("x") and not exceeds_depth({}) and not exceeds_depth([])
    assert not exceeds_depth(nested(MAX_JSON_DEPTH))
    assert exceeds_depth(nested(MAX_JSON_DEPTH + 1))
    assert exceeds_depth(nested(100_000))  # far past the interpreter's recursion limit
    ok = {"type": "org.example.x", "sender": "@a:b", "content": {"k": nested(MAX_JSON_DEPTH - 1)}}
    assert decode(ok).sender == "@a:b"
    deep = {**ok, "content": {"k": nested(MAX_JSON_DEPTH)}}
    with pytest.raises(DecodeError) as info:
        decode(deep)
    assert (info.value.path, info.value.event_type) == ("content", "org.example.x")
    with pytest.raises(DecodeError):
        decode(json.dumps({**ok, "content": {"k": nested(900)}}))
