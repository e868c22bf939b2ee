"""Typed to-device events and the one entry point that builds them, :func:`decode`.

Every event is a frozen :class:`msgspec.Struct`. The event's ``content`` fields are flattened onto
the event (``event.transaction_id``, ``event.code``, ...) next to ``sender`` and ``decrypted_from``
(the Olm sender curve25519 key when the event arrived Olm-encrypted, ``None`` for plaintext).
Field names follow the wire names, except ``m.relates_to`` which is ``relates_to``.

:func:`decode` turns a raw to-device event (the parsed dict of a sync response, or JSON text) into
one of these classes, or raises :class:`DecodeError`, and nothing else, naming the field and the
reason. Unknown event types become :class:`UnknownToDeviceEvent`; unknown content keys are ignored
and unknown codes are kept as plain strings, so a newer peer is never rejected for being newer.
:func:`encode_content` gives the wire ``content`` of an event built here, for sending.

Schemas: https://spec.matrix.org/latest/client-server-api/#key-verification-framework and
https://spec.matrix.org/latest/client-server-api/#end-to-end-encryption
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

import msgspec

from bot_toolkit._json_depth import MAX_JSON_DEPTH, exceeds_depth
from bot_toolkit.codes import CancelCode, WithheldCode

__all__ = [
    "KNOWN_EVENT_TYPES",
    "CancelCode",
    "DecodeError",
    "Dummy",
    "ForwardedRoomKey",
    "KeyVerificationAccept",
    "KeyVerificationCancel",
    "KeyVerificationDone",
    "KeyVerificationKey",
    "KeyVerificationMac",
    "KeyVerificationReady",
    "KeyVerificationRequest",
    "KeyVerificationStart",
    "KeyVerificationStartReciprocate",
    "KeyVerificationStartSas",
    "MegolmEncrypted",
    "OlmCiphertext",
    "OlmEncrypted",
    "RequestedKeyInfo",
    "RoomEncrypted",
    "RoomKey",
    "RoomKeyRequest",
    "RoomKeyRequestCancellation",
    "RoomKeyWithheld",
    "SecretRequest",
    "SecretSend",
    "ToDeviceEvent",
    "UnknownToDeviceEvent",
    "VerificationEvent",
    "VerificationRelatesTo",
    "WithheldCode",
    "decode",
    "encode_content",
    "event_type_label",
]

logger = logging.getLogger("bot_toolkit.events")

_REDACTED = "<redacted>"

_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""JSON-schema ``format: int64``."""


class DecodeError(ValueError):
    """A raw to-device event that does not match its schema.

    ``event_type`` is the raw ``type`` (``None`` when it could not be read), ``path`` names the
    offending part (``""`` for the whole event, ``type``, ``sender``, ``content``,
    ``content.transaction_id``, ``content.body.room_id``, ``content.methods[1]``, ...), and
    ``reason`` says what is wrong with it.
    """

    def __init__(self, event_type: str | None, path: str, reason: str) -> None:
        self.event_type = event_type
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot decode {event_type or '<unknown type>'} event: {path or '<event>'}: {reason}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.event_type, self.path, self.reason))


# ---------------------------------------------------------------------------------------------
# Event classes


class ToDeviceEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every to-device event.

    ``sender`` is the sending user id; ``decrypted_from`` is the Olm sender curve25519 key when the
    event arrived inside an Olm ``m.room.encrypted`` event, else ``None``.
    """

    event_type: ClassVar[str] = ""
    _secret_fields: ClassVar[frozenset[str]] = frozenset()

    sender: str
    decrypted_from: str | None = None
    inbound_id: str | None = None
    """The event's stable id in the durable inbound queue (see :mod:`bot_toolkit.inbound_queue`):
    the same when the event is handed over again after a restart, so a handler can tell a
    replay. ``None`` for an event that did not come through the queue. Never part of the
    content."""

    def __repr__(self) -> str:
        secret = self._secret_fields
        if not secret:
            return msgspec.Struct.__repr__(self)
        fields = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"{type(self).__name__}({fields})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        secret = self._secret_fields
        return [
            (name, _REDACTED_VALUE if name in secret else getattr(self, name))
            for name in self.__struct_fields__
        ]


class _Redacted:
    """Stands in for a secret value in ``repr``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return _REDACTED


_REDACTED_VALUE = _Redacted()


class VerificationRelatesTo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``m.relates_to`` of a verification event (used in-room; optional in to-device events)."""

    rel_type: str | None = None
    event_id: str | None = None


_RELATES_TO: Any = msgspec.field(default=None, name="m.relates_to")


class VerificationEvent(ToDeviceEvent, frozen=True, kw_only=True):
    """Base of the ``m.key.verification.*`` events.

    ``transaction_id`` is "required when sent as a to-device message"; :func:`decode` only sees
    to-device messages, so it always rejects a verification event without a string
    ``transaction_id``. The type stays ``str | None`` for events built for other transports.
    """

    transaction_id: str | None


class KeyVerificationRequest(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.request``: asks another device to verify.

    ``timestamp`` (POSIX milliseconds) is "required when sent as a to-device message", so
    :func:`decode` requires it. https://spec.matrix.org/latest/client-server-api/#mkeyverificationrequest
    """

    event_type: ClassVar[str] = "m.key.verification.request"

    from_device: str
    methods: tuple[str, ...]
    timestamp: _Int64


class KeyVerificationReady(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.ready``: accepts a request.

    https://spec.matrix.org/latest/client-server-api/#mkeyverificationready
    """

    event_type: ClassVar[str] = "m.key.verification.ready"

    from_device: str
    methods: tuple[str, ...]
    relates_to: VerificationRelatesTo | None = _RELATES_TO


class KeyVerificationStart(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.start`` with a method this library does not know.

    A start with ``m.sas.v1`` decodes to :class:`KeyVerificationStartSas`, one with
    ``m.reciprocate.v1`` to :class:`KeyVerificationStartReciprocate`; any other method decodes to
    this class so that the caller can refuse it with ``m.unknown_method``.
    https://spec.matrix.org/latest/client-server-api/#mkeyverificationstart
    """

    event_type: ClassVar[str] = "m.key.verification.start"

    from_device: str
    method: str
    next_method: str | None = None
    relates_to: VerificationRelatesTo | None = _RELATES_TO


class KeyVerificationStartSas(KeyVerificationStart, frozen=True, kw_only=True):
    """``m.key.verification.start`` with method ``m.sas.v1``.

    ``short_authentication_string`` is a closed enum (``decimal``, ``emoji``) in the schema, but a
    newer peer may offer more: unknown values are kept, and the SAS code picks what it supports.
    https://spec.matrix.org/latest/client-server-api/#mkeyverificationstartmsasv1
    """

    method: str = "m.sas.v1"
    key_agreement_protocols: tuple[str, ...]
    hashes: tuple[str, ...]
    message_authentication_codes: tuple[str, ...]
    short_authentication_string: tuple[str, ...]


class KeyVerificationStartReciprocate(KeyVerificationStart, frozen=True, kw_only=True):
    """``m.key.verification.start`` with method ``m.reciprocate.v1`` (after a QR code scan).

    ``secret`` is redacted in ``repr``.
    https://spec.matrix.org/latest/client-server-api/#mkeyverificationstartmreciprocatev1
    """

    _secret_fields: ClassVar[frozenset[str]] = frozenset({"secret"})

    method: str = "m.reciprocate.v1"
    secret: str


class KeyVerificationAccept(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.accept``: accepts an SAS start and commits to a key.

    The schema lists ``method`` as required without declaring it. :func:`decode` does not require
    it: an accept is only defined for ``m.sas.v1``, so a missing ``method`` reads as ``m.sas.v1``
    (interop testing here reported matrix-rust-sdk based peers leaving it out); when present it
    must be a string, and the SAS code refuses any other value.
    https://spec.matrix.org/latest/client-server-api/#mkeyverificationaccept
    """

    event_type: ClassVar[str] = "m.key.verification.accept"

    method: str = "m.sas.v1"
    key_agreement_protocol: str
    hash: str
    message_authentication_code: str
    # Closed enum in the schema; unknown values are kept (see KeyVerificationStartSas).
    short_authentication_string: tuple[str, ...]
    commitment: str
    relates_to: VerificationRelatesTo | None = _RELATES_TO


class KeyVerificationKey(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.key``: the sender's ephemeral public key (unpadded base64).

    https://spec.matrix.org/latest/client-server-api/#mkeyverificationkey
    """

    event_type: ClassVar[str] = "m.key.verification.key"

    key: str
    relates_to: VerificationRelatesTo | None = _RELATES_TO


class KeyVerificationMac(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.mac``: MACs of the verified keys (``mac``) and of their ids (``keys``).

    https://spec.matrix.org/latest/client-server-api/#mkeyverificationmac
    """

    event_type: ClassVar[str] = "m.key.verification.mac"

    mac: dict[str, str]
    keys: str
    relates_to: VerificationRelatesTo | None = _RELATES_TO


class KeyVerificationDone(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.done``: the verification completed on the sender's side.

    https://spec.matrix.org/latest/client-server-api/#mkeyverificationdone
    """

    event_type: ClassVar[str] = "m.key.verification.done"

    relates_to: VerificationRelatesTo | None = _RELATES_TO


class KeyVerificationCancel(VerificationEvent, frozen=True, kw_only=True):
    """``m.key.verification.cancel``. ``code`` is an open enum: compare with :class:`CancelCode`.

    https://spec.matrix.org/latest/client-server-api/#mkeyverificationcancel
    """

    event_type: ClassVar[str] = "m.key.verification.cancel"

    code: str
    reason: str
    relates_to: VerificationRelatesTo | None = _RELATES_TO


class RoomKey(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.room_key``: a Megolm session key. ``session_key`` is redacted in ``repr``.

    It must arrive Olm-encrypted: trust it only when ``decrypted_from`` is set (``decode`` does not
    refuse a plaintext one; that is the caller's decision).

    ``algorithm`` is kept as a string (the schema allows only ``m.megolm.v1.aes-sha2``; the crypto
    layer refuses others). ``shared_history`` is ``True`` only when the sender sent ``true``: the
    spec says absence "or any other value" means not shareable, so other values are not an error.
    https://spec.matrix.org/latest/client-server-api/#mroom_key
    """

    event_type: ClassVar[str] = "m.room_key"
    _secret_fields: ClassVar[frozenset[str]] = frozenset({"session_key"})

    algorithm: str
    room_id: str
    session_id: str
    session_key: str
    shared_history: bool = False


class ForwardedRoomKey(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.forwarded_room_key``. ``session_key`` is redacted in ``repr``.

    Like :class:`RoomKey`, trust it only when ``decrypted_from`` is set.

    https://spec.matrix.org/latest/client-server-api/#mforwarded_room_key
    """

    event_type: ClassVar[str] = "m.forwarded_room_key"
    _secret_fields: ClassVar[frozenset[str]] = frozenset({"session_key"})

    algorithm: str
    room_id: str
    sender_key: str
    session_id: str
    session_key: str
    sender_claimed_ed25519_key: str
    forwarding_curve25519_key_chain: tuple[str, ...]
    withheld: dict[str, Any] | None = None


class RequestedKeyInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``body`` of an ``m.room_key_request``. ``sender_key`` is deprecated and optional."""

    algorithm: str
    room_id: str
    session_id: str
    sender_key: str | None = None


class RoomKeyRequest(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.room_key_request`` with ``action`` ``request``.

    https://spec.matrix.org/latest/client-server-api/#mroom_key_request
    """

    event_type: ClassVar[str] = "m.room_key_request"
    action: ClassVar[str] = "request"

    body: RequestedKeyInfo
    requesting_device_id: str
    request_id: str


class RoomKeyRequestCancellation(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.room_key_request`` with ``action`` ``request_cancellation``.

    https://spec.matrix.org/latest/client-server-api/#mroom_key_request
    """

    event_type: ClassVar[str] = "m.room_key_request"
    action: ClassVar[str] = "request_cancellation"

    requesting_device_id: str
    request_id: str


class RoomKeyWithheld(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.room_key.withheld`` (also decoded from the unstable ``org.matrix.room_key.withheld``).

    ``code`` is an open enum (compare with :class:`WithheldCode`). ``room_id`` and ``session_id``
    are required unless ``code`` is ``m.no_olm``. ``from_device`` comes from MSC3735 (sent by
    matrix-rust-sdk, not yet in the spec).
    https://spec.matrix.org/latest/client-server-api/#mroom_keywithheld
    """

    event_type: ClassVar[str] = "m.room_key.withheld"

    algorithm: str
    sender_key: str
    code: str
    reason: str | None = None
    room_id: str | None = None
    session_id: str | None = None
    from_device: str | None = None


class Dummy(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.dummy`` (arrives Olm-encrypted): marks a new Olm session. No content.

    https://spec.matrix.org/latest/client-server-api/#mdummy
    """

    event_type: ClassVar[str] = "m.dummy"


class SecretRequest(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.secret.request``: ``action`` is ``request`` (then ``name`` is set) or
    ``request_cancellation``.

    https://spec.matrix.org/latest/client-server-api/#msecretrequest
    """

    event_type: ClassVar[str] = "m.secret.request"

    action: str
    requesting_device_id: str
    request_id: str
    name: str | None = None


class SecretSend(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.secret.send``. ``secret`` is redacted in ``repr``.

    It must arrive Olm-encrypted from a verified device of our own user: check ``decrypted_from``.

    https://spec.matrix.org/latest/client-server-api/#msecretsend
    """

    event_type: ClassVar[str] = "m.secret.send"
    _secret_fields: ClassVar[frozenset[str]] = frozenset({"secret"})

    request_id: str
    secret: str


class OlmCiphertext(msgspec.Struct, frozen=True, kw_only=True):
    """One recipient's Olm ciphertext: message ``type`` (0 pre-key, 1 normal) and ``body``."""

    type: int
    body: str


class RoomEncrypted(ToDeviceEvent, frozen=True, kw_only=True):
    """``m.room.encrypted`` with an algorithm this library does not know (``ciphertext`` raw).

    Olm and Megolm events decode to :class:`OlmEncrypted` and :class:`MegolmEncrypted`.
    https://spec.matrix.org/latest/client-server-api/#mroomencrypted
    """

    event_type: ClassVar[str] = "m.room.encrypted"

    algorithm: str
    ciphertext: object
    sender_key: str | None = None
    device_id: str | None = None


class OlmEncrypted(RoomEncrypted, frozen=True, kw_only=True):
    """``m.room.encrypted`` with ``m.olm.v1.curve25519-aes-sha2``.

    ``ciphertext`` maps each recipient curve25519 key to its :class:`OlmCiphertext`;
    ``sender_key`` is required for Olm.
    """

    algorithm: str = "m.olm.v1.curve25519-aes-sha2"
    ciphertext: dict[str, OlmCiphertext]
    sender_key: str


class MegolmEncrypted(RoomEncrypted, frozen=True, kw_only=True):
    """``m.room.encrypted`` with ``m.megolm.v1.aes-sha2``: string ``ciphertext``, ``session_id``."""

    algorithm: str = "m.megolm.v1.aes-sha2"
    ciphertext: str
    session_id: str


class UnknownToDeviceEvent(ToDeviceEvent, frozen=True, kw_only=True):
    """A to-device event of a type this library does not decode.

    ``event_type_name`` is the raw ``type`` and ``content`` the raw content dict (not copied).
    """

    event_type_name: str
    content: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Decoding

_OLM = "m.olm.v1.curve25519-aes-sha2"
_MEGOLM = "m.megolm.v1.aes-sha2"

_Decoder = Callable[[str, dict[str, Any]], ToDeviceEvent]

_convert = msgspec.convert
_ValidationError = msgspec.ValidationError
_json_decode = msgspec.json.Decoder().decode

# msgspec says "<reason> - at `$.a.b[0]`" or "<reason> - at `key` in `$.a`".
_LOCATION = re.compile(r" - at `(key` in `)?\$([^`]*)`\Z")
_MISSING = re.compile(r"Object missing required field `([^`]*)`\Z")


def _error_from_msgspec(event_type: str, exc: msgspec.ValidationError) -> DecodeError:
    """Turn msgspec's message into a :class:`DecodeError` with a ``content.``-rooted path."""
    message = str(exc)
    path = ""
    key_error = False
    match = _LOCATION.search(message)
    if match is not None:
        key_error = match.group(1) is not None
        path = match.group(2)
        message = message[: match.start()]
    missing = _MISSING.match(message)
    if missing is not None:
        path = f"{path}.{missing.group(1)}"
        message = "missing required field"
    elif key_error:
        message = f"{message} (in an object key)"
    return DecodeError(event_type, "content" + path, message)


def _struct(event_type: str, data: dict[str, Any], cls: type[ToDeviceEvent]) -> Any:
    try:
        return _convert(data, cls)
    except _ValidationError as exc:
        raise _error_from_msgspec(event_type, exc) from None


def _null_txn(event_type: str) -> DecodeError:
    return DecodeError(event_type, "content.transaction_id", "Expected `str`, got `null`")


_START_VARIANTS: dict[str, type[KeyVerificationStart]] = {
    "m.sas.v1": KeyVerificationStartSas,
    "m.reciprocate.v1": KeyVerificationStartReciprocate,
}


def _decode_start(event_type: str, data: dict[str, Any]) -> ToDeviceEvent:
    method = data.get("method")
    cls = KeyVerificationStart
    if isinstance(method, str):
        cls = _START_VARIANTS.get(method, KeyVerificationStart)
    event: KeyVerificationStart = _struct(event_type, data, cls)
    if event.transaction_id is None:
        raise _null_txn(event_type)
    return event


def _decode_room_key(event_type: str, data: dict[str, Any]) -> ToDeviceEvent:
    # Anything but a JSON boolean means "not shareable" (spec), so it is not an error.
    if "shared_history" in data and type(data["shared_history"]) is not bool:
        data["shared_history"] = False
    event: RoomKey = _struct(event_type, data, RoomKey)
    return event


_ACTIONS = ("request", "request_cancellation")


def _action(event_type: str, data: dict[str, Any]) -> str:
    """The ``action`` field, checked against the schema's closed enum (it selects the meaning)."""
    if "action" not in data:
        raise DecodeError(event_type, "content.action", "missing required field")
    action = data["action"]
    if not isinstance(action, str):
        raise DecodeError(
            event_type, "content.action", f"Expected `str`, got `{_json_type(action)}`"
        )
    if action not in _ACTIONS:
        raise DecodeError(
            event_type,
            "content.action",
            # The value is left out of the reason: reasons are logged once per distinct text.
            "unknown action, expected 'request' or 'request_cancellation'",
        )
    return action


def _decode_room_key_request(event_type: str, data: dict[str, Any]) -> ToDeviceEvent:
    if _action(event_type, data) == "request":
        request: RoomKeyRequest = _struct(event_type, data, RoomKeyRequest)
        return request
    cancellation: RoomKeyRequestCancellation = _struct(event_type, data, RoomKeyRequestCancellation)
    return cancellation


def _decode_secret_request(event_type: str, data: dict[str, Any]) -> ToDeviceEvent:
    action = _action(event_type, data)
    event: SecretRequest = _struct(event_type, data, SecretRequest)
    if action == "request" and event.name is None:
        raise DecodeError(
            event_type, "content.name", "missing required field (required when action is request)"
        )
    return event


def _decode_withheld(event_type: str, data: dict[str, Any]) -> ToDeviceEvent:
    event: RoomKeyWithheld = _struct(event_type, data, RoomKeyWithheld)
    if event.code != WithheldCode.NO_OLM:
        for name in ("room_id", "session_id"):
            if getattr(event, name) is None:
                raise DecodeError(
                    event_type,
                    f"content.{name}",
                    "missing required field (required unless code is m.no_olm)",
                )
    return event


def _decode_encrypted(event_type: str, data: dict[str, Any]) -> ToDeviceEvent:
    algorithm = data.get("algorithm")
    cls: type[RoomEncrypted] = RoomEncrypted
    if algorithm == _OLM:
        cls = OlmEncrypted
    elif algorithm == _MEGOLM:
        cls = MegolmEncrypted
    event: RoomEncrypted = _struct(event_type, data, cls)
    return event


# Types whose class does not depend on the content: type -> class. Verification events
# also need a string ``transaction_id``.
_VERIFICATION: dict[str, type[VerificationEvent]] = {
    "m.key.verification.request": KeyVerificationRequest,
    "m.key.verification.ready": KeyVerificationReady,
    "m.key.verification.accept": KeyVerificationAccept,
    "m.key.verification.key": KeyVerificationKey,
    "m.key.verification.mac": KeyVerificationMac,
    "m.key.verification.done": KeyVerificationDone,
    "m.key.verification.cancel": KeyVerificationCancel,
}
_PLAIN: dict[str, type[ToDeviceEvent]] = {
    "m.forwarded_room_key": ForwardedRoomKey,
    "m.dummy": Dummy,
    "m.secret.send": SecretSend,
}

# Types where the content picks the class or adds rules: type -> decoder.
_SPECIAL: dict[str, _Decoder] = {
    "m.key.verification.start": _decode_start,
    "m.room_key": _decode_room_key,
    "m.room_key_request": _decode_room_key_request,
    "m.room_key.withheld": _decode_withheld,
    "org.matrix.room_key.withheld": _decode_withheld,
    "m.secret.request": _decode_secret_request,
    "m.room.encrypted": _decode_encrypted,
}

KNOWN_EVENT_TYPES: frozenset[str] = frozenset([*_VERIFICATION, *_PLAIN, *_SPECIAL])
"""Every to-device event type :func:`decode` has a class for."""


def event_type_label(event_type: str | None) -> str:
    """``event_type`` when it is a known type, else ``"other"``: safe as a metric label.

    The type of a to-device event is chosen by its sender; used raw as a label, a hostile peer
    could create unbounded metric series.
    """
    return event_type if event_type in KNOWN_EVENT_TYPES else "other"


_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    type(None): "null",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _field(event_type: str | None, raw: dict[Any, Any], name: str, cls: type, expected: str) -> Any:
    """``raw[name]`` when it is a ``cls``, else a :class:`DecodeError` naming ``name``."""
    value = raw.get(name)
    if isinstance(value, cls):
        return value
    if name not in raw:
        raise DecodeError(event_type, name, "missing required field")
    raise DecodeError(event_type, name, f"Expected `{expected}`, got `{_json_type(value)}`")


def _envelope_fields(sender: str, decrypted_from: str | None) -> dict[str, Any]:
    """The fields that come from the envelope, never from content keys of the same name."""
    return {"sender": sender, "decrypted_from": decrypted_from, "inbound_id": None}


def _decode_content(
    event_type: str, sender: str, content: dict[str, Any], decrypted_from: str | None
) -> ToDeviceEvent:
    """Build the event from a checked envelope. ``content`` is never modified."""
    # A fresh dict each time: ``sender`` / ``decrypted_from`` come from the envelope, never from
    # content keys of the same name.
    verification = _VERIFICATION.get(event_type)
    if verification is not None:
        try:
            event: VerificationEvent = _convert(
                {**content, **_envelope_fields(sender, decrypted_from)}, verification
            )
        except _ValidationError as exc:
            raise _error_from_msgspec(event_type, exc) from None
        if event.transaction_id is None:
            raise _null_txn(event_type)
        return event
    plain = _PLAIN.get(event_type)
    if plain is not None:
        try:
            return _convert({**content, **_envelope_fields(sender, decrypted_from)}, plain)
        except _ValidationError as exc:
            raise _error_from_msgspec(event_type, exc) from None
    special = _SPECIAL.get(event_type)
    if special is not None:
        return special(event_type, {**content, **_envelope_fields(sender, decrypted_from)})
    for key in content:
        if not isinstance(key, str):
            raise DecodeError(event_type, "content", "Expected `str` (in an object key)")
    return UnknownToDeviceEvent(
        sender=sender, decrypted_from=decrypted_from, event_type_name=event_type, content=content
    )


def _decode_envelope(raw: object, decrypted_from: object) -> ToDeviceEvent:
    """The general path: JSON text, other mappings, and every malformed envelope."""
    if isinstance(raw, (bytes, bytearray, memoryview, str)):
        try:
            raw = _json_decode(raw)
        except msgspec.DecodeError as exc:
            raise DecodeError(None, "", f"invalid JSON: {exc}") from None
        except RecursionError:
            raise DecodeError(None, "", "invalid JSON: nested too deeply") from None
    if type(raw) is not dict:
        if not isinstance(raw, Mapping):
            raise DecodeError(None, "", f"Expected `object`, got `{_json_type(raw)}`")
        raw = dict(raw)
    event_type: str = _field(None, raw, "type", str, "str")
    sender: str = _field(event_type, raw, "sender", str, "str")
    content = raw.get("content")
    if type(content) is not dict:
        content = dict(_field(event_type, raw, "content", Mapping, "object"))
    if decrypted_from is not None and not isinstance(decrypted_from, str):
        raise DecodeError(
            event_type,
            "decrypted_from",
            f"Expected `str | None`, got `{_json_type(decrypted_from)}`",
        )
    _check_depth(event_type, content)
    return _decode_content(event_type, sender, content, decrypted_from)


def _check_depth(event_type: str, content: Mapping[str, Any]) -> None:
    if exceeds_depth(content):
        raise DecodeError(event_type, "content", f"nested more than {MAX_JSON_DEPTH} levels deep")


def decode(
    raw: Mapping[str, Any] | bytes | bytearray | memoryview | str,
    *,
    decrypted_from: str | None = None,
) -> ToDeviceEvent:
    """Decode one raw to-device event (``{"type", "sender", "content"}``) into a typed event.

    ``raw`` is the parsed dict of a sync response (any mapping) or the event as JSON bytes/str.
    ``decrypted_from`` is the Olm sender curve25519 key when the event came out of an Olm
    ``m.room.encrypted`` event. Unknown types give :class:`UnknownToDeviceEvent`. Neither ``raw``
    nor its content is modified; an unknown event keeps a reference to the content dict.

    Content nested more than :data:`~bot_toolkit._json_depth.MAX_JSON_DEPTH` levels is refused
    (``DecodeError`` at ``content``) before anything copies or recurses into it.

    Raises :class:`DecodeError`, and only that, whatever ``raw`` is.
    """
    try:
        if type(raw) is dict:  # the fast path: a well-formed dict from a sync response
            event_type = raw.get("type")
            sender = raw.get("sender")
            content = raw.get("content")
            if (
                type(event_type) is str
                and type(sender) is str
                and type(content) is dict
                and (decrypted_from is None or type(decrypted_from) is str)
            ):
                _check_depth(event_type, content)
                return _decode_content(event_type, sender, content, decrypted_from)
        return _decode_envelope(raw, decrypted_from)
    except DecodeError:
        raise
    except Exception as exc:  # a safety net: the contract is "DecodeError only"
        try:
            event_type = raw.get("type") if isinstance(raw, Mapping) else None
            reason = f"{type(exc).__name__}: {exc}"
        except Exception:
            event_type, reason = None, type(exc).__name__
        if not isinstance(event_type, str):
            event_type = None
        logger.debug("unexpected %s while decoding a to-device event", type(exc).__name__)
        raise DecodeError(event_type, "", reason[:500]) from exc


_NOT_CONTENT = frozenset({"sender", "decrypted_from", "inbound_id"})


def encode_content(event: ToDeviceEvent) -> dict[str, Any]:
    """The wire ``content`` of ``event``: wire field names, ``None`` fields left out.

    Constant parts implied by the class (``action`` of the room key request classes) are added.
    For :class:`UnknownToDeviceEvent` a shallow copy of its raw content is returned.
    """
    if isinstance(event, UnknownToDeviceEvent):
        return dict(event.content)
    # A JSON round trip gives plain JSON types (lists, not tuples) under the wire names.
    built: dict[str, Any] = _json_decode(msgspec.json.encode(event))
    content = {
        key: value for key, value in built.items() if value is not None and key not in _NOT_CONTENT
    }
    if isinstance(event, (RoomKeyRequest, RoomKeyRequestCancellation)):
        content["action"] = event.action
    return content
