"""In-room verification: the room transport of the verification framework.

Specification ("Key verification framework"): between two users, verification runs in a room
they share (a DM). The request is an ``m.room.message`` with ``msgtype:
m.key.verification.request`` (``from_device``, ``methods``, ``to``); every later event is a room
event of type ``m.key.verification.*`` without ``transaction_id``, relating to the request with
``m.relates_to: {rel_type: m.reference, event_id: <request>}``. The flow id is the request's
event id; it plays the part of the to-device ``transaction_id`` everywhere (SAS and MAC info
strings included).

* :class:`RoomVerificationEvent`: one such room event as received (plaintext, or decrypted from
  Megolm), with its room, event id and ``origin_server_ts``; :meth:`RoomVerificationEvent.typed`
  gives the same typed event the to-device path produces, with ``transaction_id`` = the flow id.
* :func:`room_content`: a to-device style content turned into its in-room form.
* :class:`RoomSender`: what the engine needs to send into a room; :class:`NioRooms` implements
  it over a ``nio.AsyncClient`` (``room_send``, which encrypts in an encrypted room) and feeds
  the room events nio's sync delivers into the dispatcher.

Element Web sends these events unencrypted, Element X encrypted in an encrypted DM; both arrive
here alike (nio decrypts Megolm events before its callbacks run, and copies ``m.relates_to``
from the unencrypted part when the plaintext lacks it).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol
from urllib.parse import quote

from .._client_http import homeserver_json
from ..dispatcher import Dispatcher, DispatcherClosed
from ..events import DecodeError, VerificationEvent, decode
from ..metrics import Metrics

__all__ = [
    "REQUEST_MSGTYPE",
    "NioRooms",
    "RoomSendError",
    "RoomSender",
    "RoomVerificationEvent",
    "parse_room_event",
    "room_content",
]

log = logging.getLogger("bot_toolkit.verification.rooms")

REQUEST_MSGTYPE: Final = "m.key.verification.request"
_PREFIX: Final = "m.key.verification."
_REFERENCE: Final = "m.reference"
_ROOM_MESSAGE: Final = "m.room.message"
_SEND_TIMEOUT: Final = 30.0
_ROOM_WAIT: Final = 30.0
"""Seconds :meth:`NioRooms.direct_room` waits for a room it created to appear in the sync."""


class RoomSendError(RuntimeError):
    """The homeserver (or nio) refused to send a room event."""


@dataclass(frozen=True, slots=True)
class RoomVerificationEvent:
    """One in-room verification event as received.

    ``event_type`` is the verification type (``m.key.verification.request`` for the
    ``m.room.message`` request). ``flow_id`` is the request's event id: the event's own id for a
    request, ``m.relates_to.event_id`` for the others (``None`` when the relation is missing or
    not an ``m.reference``). ``content`` is a copy of the content as received (the SAS commitment
    covers a start's content exactly). ``sender_key``: the Megolm sender's curve25519 key when the
    event was encrypted.
    """

    room_id: str
    event_id: str
    sender: str
    origin_server_ts: int
    event_type: str
    flow_id: str | None
    content: Mapping[str, Any] = field(repr=False)
    encrypted: bool = False
    sender_key: str | None = None

    @property
    def transaction_id(self) -> str | None:
        """The flow id: the dispatcher orders the events of one flow by it."""
        return self.flow_id

    def typed(self) -> VerificationEvent:
        """The typed event, as the to-device path would have it (``transaction_id`` = flow id;
        a request's ``timestamp`` = ``origin_server_ts``). Raises :class:`DecodeError`."""
        content: dict[str, Any] = {
            k: v for k, v in self.content.items() if k not in ("transaction_id", "timestamp")
        }
        content["transaction_id"] = self.flow_id
        if self.event_type == REQUEST_MSGTYPE:
            content["timestamp"] = self.origin_server_ts
        event = decode(
            {"type": self.event_type, "sender": self.sender, "content": content},
            decrypted_from=self.sender_key,
        )
        if not isinstance(event, VerificationEvent):  # pragma: no cover - decode's mapping
            raise DecodeError(self.event_type, "", "not a verification event")
        return event

    @property
    def to(self) -> object:
        """A request's ``to`` field (the user it is meant for), as received."""
        return self.content.get("to")


def parse_room_event(
    room_id: str,
    source: Mapping[str, Any],
    *,
    encrypted: bool = False,
    sender_key: str | None = None,
) -> RoomVerificationEvent | None:
    """The verification event in a raw room event, or ``None`` when it is none.

    A request needs ``msgtype: m.key.verification.request`` in an ``m.room.message``; other
    verification events need a type under ``m.key.verification.``. Envelope fields that are not
    what the server sends (no string ``event_id`` / ``sender``, no integer ``origin_server_ts``)
    also give ``None``: such an event cannot be part of any flow.
    """
    etype = source.get("type")
    content = source.get("content")
    event_id = source.get("event_id")
    sender = source.get("sender")
    ts = source.get("origin_server_ts")
    if not (
        isinstance(etype, str)
        and isinstance(content, Mapping)
        and isinstance(event_id, str)
        and isinstance(sender, str)
        and isinstance(ts, int)
        and not isinstance(ts, bool)
    ):
        return None
    if etype == _ROOM_MESSAGE:
        if content.get("msgtype") != REQUEST_MSGTYPE:
            return None
        return RoomVerificationEvent(
            room_id,
            event_id,
            sender,
            ts,
            REQUEST_MSGTYPE,
            event_id,
            copy.deepcopy(dict(content)),
            encrypted,
            sender_key,
        )
    if not etype.startswith(_PREFIX) or etype == REQUEST_MSGTYPE:
        return None
    relation = content.get("m.relates_to")
    flow: str | None = None
    if (
        isinstance(relation, Mapping)
        and relation.get("rel_type") == _REFERENCE
        and isinstance(relation.get("event_id"), str)
    ):
        flow = relation["event_id"]
    return RoomVerificationEvent(
        room_id,
        event_id,
        sender,
        ts,
        etype,
        flow,
        copy.deepcopy(dict(content)),
        encrypted,
        sender_key,
    )


def room_content(content: Mapping[str, Any], flow_id: str) -> dict[str, Any]:
    """The in-room form of a to-device style content: no ``transaction_id``, and
    ``m.relates_to`` referencing the request ``flow_id``."""
    out = {k: v for k, v in content.items() if k != "transaction_id"}
    out["m.relates_to"] = {"rel_type": _REFERENCE, "event_id": flow_id}
    return out


def request_content(from_device: str, to: str, methods: list[str]) -> dict[str, Any]:
    """The ``m.room.message`` content of an in-room request (with the fallback body)."""
    return {
        "msgtype": REQUEST_MSGTYPE,
        "body": (
            "is requesting to verify your key, but your client does not support in-chat key "
            "verification. You will need to use legacy key verification to verify keys."
        ),
        "from_device": from_device,
        "methods": methods,
        "to": to,
    }


class RoomSender(Protocol):
    """What the verification engine needs to take part in in-room flows."""

    async def send(self, room_id: str, event_type: str, content: Mapping[str, Any]) -> str:
        """Send one room event (encrypted in an encrypted room); its event id.
        Raises :class:`RoomSendError`."""
        ...

    async def direct_room(self, user_id: str) -> str:
        """A room shared with just ``user_id`` (found, or created and invited)."""
        ...


class NioRooms:
    """:class:`RoomSender` over a ``nio.AsyncClient``, and the feed of room events.

    :meth:`attach` adds a nio event callback (nio's public ``add_event_callback``) that turns
    every verification room event of the sync into a :class:`RoomVerificationEvent` and puts it
    into the dispatcher without waiting (a full dispatcher drops it: counted in
    ``verification_room_events_dropped_total``, logged). Nothing raised here reaches nio's sync.
    :meth:`detach` removes the callback.

    Sending uses ``client.room_send`` with ``ignore_unverified_devices=True``: in an encrypted
    room nio shares the Megolm session with every device of the members (the peer's devices
    are, by definition, not verified yet) before encrypting.
    """

    def __init__(
        self, client: Any, dispatcher: Dispatcher, metrics: Metrics, *, encrypt: bool = True
    ) -> None:
        self._client = client
        self.encrypt = encrypt
        """Encrypt in encrypted rooms. Off when the key-sharing policy withholds room keys from
        unverified devices (``share_with = "verified"``): the peer's devices are unverified
        until the flow ends, so they could not decrypt; the spec then allows plaintext."""
        self._dispatcher = dispatcher
        self._callback: Callable[[Any, Any], Any] | None = None
        self._send_lock = asyncio.Lock()
        self._m_dropped = metrics.counter(
            "verification_room_events_dropped_total",
            "In-room verification events a full dispatcher refused",
        )
        self._m_errors = metrics.counter(
            "verification_room_feed_errors_total",
            "Room events the in-room verification feed failed on",
        )

    def attach(self) -> None:
        """Start feeding room events (idempotent)."""
        if self._callback is not None:
            return
        from nio import Event  # noqa: PLC0415 - nio is only needed with a nio client

        async def on_event(room: Any, event: Any) -> None:
            self._feed(room, event)

        self._callback = on_event
        self._client.add_event_callback(on_event, Event)

    def detach(self) -> None:
        """Stop feeding room events."""
        cb = self._callback
        if cb is None:
            return
        self._callback = None
        # nio has no remove_event_callback: drop ours from its list of ClientCallback.
        self._client.event_callbacks = [
            c for c in self._client.event_callbacks if getattr(c, "func", None) is not cb
        ]

    def _feed(self, room: Any, event: Any) -> None:
        try:
            source = getattr(event, "source", None)
            if not isinstance(source, Mapping):
                return
            parsed = parse_room_event(
                str(room.room_id),
                source,
                encrypted=bool(getattr(event, "decrypted", False)),
                sender_key=getattr(event, "sender_key", None)
                if getattr(event, "decrypted", False)
                else None,
            )
            if parsed is None:
                return
            try:
                ok = self._dispatcher.put_nowait(parsed)
            except DispatcherClosed:
                ok = False
            if not ok:
                self._m_dropped.inc()
                log.warning(
                    "dropped in-room verification event %s of flow %s",
                    parsed.event_type[:64],
                    (parsed.flow_id or "")[:64],
                )
        except Exception:
            self._m_errors.inc()
            log.exception("in-room verification feed failed on an event")

    async def send(self, room_id: str, event_type: str, content: Mapping[str, Any]) -> str:
        from nio import RoomSendResponse  # noqa: PLC0415

        room = self._client.rooms.get(room_id)
        if room is None or (room.encrypted and (not self.encrypt or room.invited_users)):
            # Plaintext, which the spec allows (verification events are not secret), where
            # encryption would hinder the verification: a room nio has not synced yet (a restart
            # cancel before the first sync), a member still invited (nio shares room keys with
            # joined members only: a DM we just created), or the policy withholding keys.
            return await self._send_plaintext(room_id, event_type, content)
        # One at a time: nio's group session sharing is not safe to run concurrently per room.
        async with self._send_lock:
            resp = await self._client.room_send(
                room_id, event_type, dict(content), ignore_unverified_devices=True
            )
        if not isinstance(resp, RoomSendResponse):
            raise RoomSendError(f"sending {event_type} to {room_id} failed: {resp}")
        return str(resp.event_id)

    async def _send_plaintext(
        self, room_id: str, event_type: str, content: Mapping[str, Any]
    ) -> str:
        """``PUT /rooms/{room}/send/{type}/{txn}`` without encryption (nio's ``room_send``
        always encrypts in an encrypted room)."""
        import aiohttp  # noqa: PLC0415

        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
            f"/send/{quote(event_type, safe='')}/{secrets.token_hex(12)}"
        )
        try:
            status, body = await homeserver_json(
                self._client, "PUT", path, dict(content), request_timeout=_SEND_TIMEOUT
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RoomSendError(f"sending {event_type} to {room_id} failed: {exc}") from None
        event_id = body.get("event_id") if isinstance(body, Mapping) else None
        if status != 200 or not isinstance(event_id, str):
            raise RoomSendError(f"sending {event_type} to {room_id} answered {status}")
        return event_id

    async def direct_room(self, user_id: str) -> str:
        """A room whose members (joined or invited) are just us and ``user_id``; an encrypted
        one is preferred. Otherwise an encrypted DM is created (``is_direct``, the
        ``trusted_private_chat`` preset, ``user_id`` invited) and the sync awaited until nio
        knows it (bounded)."""
        from nio import RoomCreateResponse, RoomPreset  # noqa: PLC0415

        client = self._client
        ours = str(client.user_id)
        found: list[Any] = []
        for room in list(client.rooms.values()):
            members = set(room.users) | set(getattr(room, "invited_users", {}))
            if members == {ours, user_id}:
                found.append(room)
        if found:
            found.sort(key=lambda r: (not r.encrypted, r.room_id))
            return str(found[0].room_id)
        resp = await client.room_create(
            is_direct=True,
            invite=[user_id],
            preset=RoomPreset.trusted_private_chat,
            initial_state=[
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ],
        )
        if not isinstance(resp, RoomCreateResponse):
            raise RoomSendError(f"creating a DM with {user_id} failed: {resp}")
        room_id = str(resp.room_id)

        def known() -> bool:
            # Encrypted and the invite seen (in the timeline the invite comes after the
            # encryption event, and nio may be between the two).
            room = client.rooms.get(room_id)
            return room is not None and room.encrypted and user_id in room.users

        async with asyncio.timeout(_ROOM_WAIT):
            while not known():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        return room_id
