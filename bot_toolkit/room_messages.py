"""Typed room messages for handlers: :class:`RoomMessage`, commands, replies.

:class:`RoomMessageFeed` hooks one nio ``AsyncClient`` (through nio's public
``add_event_callback``) and puts a :class:`RoomMessage` into a
:class:`~bot_toolkit.dispatcher.Dispatcher` for every text, notice or emote message nio hands
it, already decrypted by nio in encrypted rooms. Handlers register like for any event::

    @dispatcher.on(RoomMessage)
    async def seen(msg: RoomMessage) -> None: ...

The dispatcher orders the messages of one sender and runs different senders in parallel; a
handler's failure or time-out is isolated like any handler's. The feed skips the bot's own
messages and messages sent before it was attached (history that an initial sync or a newly
joined room brings), so a restart does not answer old commands. Events nio could not decrypt
are not messages and do not reach these handlers.

:func:`parse_command` reads ``!name args`` bodies; :func:`reply_content` builds the ``m.notice``
(or ``m.text``) that answers a message, with a rich reply relation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar, Final, Protocol

from nio import AsyncClient, MatrixRoom, RoomMessageEmote, RoomMessageNotice, RoomMessageText

from bot_toolkit.dispatcher import Dispatcher, DispatcherClosed

__all__ = [
    "Command",
    "RoomMessage",
    "RoomMessageFeed",
    "SenderTrust",
    "SenderTrustSource",
    "parse_command",
    "reply_content",
]

log = logging.getLogger("bot_toolkit.room_messages")

_MAX_BODY: Final = 65_536
"""Longest body handed to handlers, in characters; longer ones are cut (events are <= 64 KiB)."""


class SenderTrust(StrEnum):
    """How far the bot trusts the device that sent a message.

    ``unknown`` for unencrypted messages (no device is proven) and for a sending device the bot
    has no keys for. For encrypted ones the feed fills ``verified`` or ``unverified`` from nio's
    trust store (the sender's device key matches a device the bot verified); with a
    :class:`SenderTrustSource` (the toolkit's cross-signing view) ``unverified`` is refined to
    ``cross_signed`` or ``not_cross_signed``, and ``verified`` also covers devices cross-signed
    by a user whose identity the bot verified. The spec (v1.18, MSC4153) says messages from
    ``not_cross_signed`` devices "cannot be trusted and SHOULD NOT be displayed".
    """

    UNKNOWN = "unknown"
    UNVERIFIED = "unverified"
    """Encrypted by a device the bot did not verify; cross-signing not checked."""
    NOT_CROSS_SIGNED = "not_cross_signed"
    """Encrypted by a device its owner has not cross-signed (an insecure device)."""
    CROSS_SIGNED = "cross_signed"
    """Encrypted by a device cross-signed by its owner (whose identity the bot did not verify)."""
    VERIFIED = "verified"


class SenderTrustSource(Protocol):
    """Refines the trust of an encrypted message's sending device (cross-signing)."""

    async def sender_trust(self, user_id: str, sender_key: str, *, verified: bool) -> SenderTrust:
        """The trust of ``user_id``'s device with curve25519 ``sender_key``."""
        ...


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """One ``m.room.message`` (text, notice or emote) in a room the bot is in."""

    event_type: ClassVar[str] = "m.room.message"
    room_id: str
    event_id: str
    sender: str
    body: str
    msgtype: str
    """``m.text``, ``m.notice`` or ``m.emote``."""
    encrypted: bool
    """The event came Megolm-encrypted and nio decrypted it."""
    origin_server_ts: int
    """Milliseconds since the epoch, as the sender's homeserver stamped it."""
    sender_key: str | None = None
    """Curve25519 key of the sending device (encrypted messages only)."""
    sender_trust: SenderTrust = SenderTrust.UNKNOWN


@dataclass(frozen=True, slots=True)
class Command:
    """A ``!name arg1 arg2`` message body, split."""

    name: str
    """The command name, lower-cased, without the prefix."""
    args: tuple[str, ...]
    """The words after the name (split on whitespace)."""
    text: str
    """Everything after the name, stripped."""


def parse_command(body: str, prefix: str = "!") -> Command | None:
    """The command in ``body``, or ``None`` when it does not start with ``prefix`` + a name.

    Only the first line counts; leading whitespace is ignored.
    """
    line = body.lstrip().split("\n", 1)[0]
    if not prefix or not line.startswith(prefix):
        return None
    rest = line[len(prefix) :]
    parts = rest.split(None, 1)
    if not parts or rest[:1].isspace():
        return None
    text = parts[1].strip() if len(parts) > 1 else ""
    return Command(parts[0].lower(), tuple(text.split()), text)


def reply_content(to: RoomMessage, text: str, *, notice: bool = True) -> dict[str, Any]:
    """The ``m.room.message`` content answering ``to`` with ``text`` (a rich reply)."""
    return {
        "msgtype": "m.notice" if notice else "m.text",
        "body": text,
        "m.relates_to": {"m.in_reply_to": {"event_id": to.event_id}},
    }


def _trust(event: Any) -> SenderTrust:
    if not getattr(event, "decrypted", False):
        return SenderTrust.UNKNOWN
    return SenderTrust.VERIFIED if getattr(event, "verified", False) else SenderTrust.UNVERIFIED


def to_room_message(room: MatrixRoom, event: Any) -> RoomMessage | None:
    """The :class:`RoomMessage` of a nio message event; ``None`` when a field is unusable."""
    body, event_id, sender = event.body, event.event_id, event.sender
    if not (isinstance(body, str) and isinstance(event_id, str) and isinstance(sender, str)):
        return None
    ts = event.server_timestamp
    msgtype = (event.source.get("content") or {}).get("msgtype")
    decrypted = bool(getattr(event, "decrypted", False))
    return RoomMessage(
        room_id=room.room_id,
        event_id=event_id,
        sender=sender,
        body=body[:_MAX_BODY],
        msgtype=msgtype if isinstance(msgtype, str) else "m.text",
        encrypted=decrypted,
        origin_server_ts=ts if isinstance(ts, int) else 0,
        sender_key=getattr(event, "sender_key", None) if decrypted else None,
        sender_trust=_trust(event),
    )


class RoomMessageFeed:
    """Puts the room messages one client receives into a dispatcher; see the module doc.

    ``since_ms``: messages stamped earlier are skipped (default: now).
    ``backpressure_timeout``: the longest one message waits for room in a full dispatcher
    (holding up the sync meanwhile) before it is dropped and counted.
    ``trust``: refines :attr:`RoomMessage.sender_trust` of encrypted messages (cross-signing).
    """

    def __init__(
        self,
        client: AsyncClient,
        dispatcher: Dispatcher,
        *,
        since_ms: int | None = None,
        backpressure_timeout: float = 10.0,
        trust: SenderTrustSource | None = None,
    ) -> None:
        self.client = client
        self.trust = trust
        self.dispatcher = dispatcher
        self.backpressure_timeout = backpressure_timeout
        self.since_ms = int(time.time() * 1000) if since_ms is None else since_ms
        self._attached = True
        m = dispatcher.metrics
        self._m_messages = m.counter(
            "room_messages_total",
            "Room messages the feed saw (result: dispatched, old, own, dropped, invalid)",
            ["result"],
        )
        client.add_event_callback(
            self._on_event, (RoomMessageText, RoomMessageNotice, RoomMessageEmote)
        )

    def detach(self) -> None:
        """Stop feeding (nio keeps the callback; it does nothing from now on)."""
        self._attached = False

    async def _on_event(self, room: MatrixRoom, event: Any) -> None:
        if not self._attached:
            return
        try:
            message = to_room_message(room, event)
        except Exception:  # a nio event without the attributes nio documents
            log.exception("cannot read room message in %s", room.room_id)
            message = None
        if message is None:
            self._m_messages.inc("invalid")
            return
        if message.sender == self.client.user_id:
            self._m_messages.inc("own")
            return
        if message.origin_server_ts < self.since_ms:
            self._m_messages.inc("old")
            return
        if self.trust is not None and message.encrypted and message.sender_key is not None:
            try:
                refined = await self.trust.sender_trust(
                    message.sender,
                    message.sender_key,
                    verified=message.sender_trust is SenderTrust.VERIFIED,
                )
            except Exception:
                log.exception("sender trust of %s in %s", message.event_id, message.room_id)
            else:
                message = replace(message, sender_trust=refined)
        try:
            # Wait (bounded) for room rather than drop: this holds the sync, which is the
            # backpressure a full dispatcher should cause.
            async with asyncio.timeout(self.backpressure_timeout):
                await self.dispatcher.put(message)
        except (DispatcherClosed, TimeoutError):
            log.warning(
                "room message %s in %s dropped: dispatcher full or closed",
                message.event_id,
                message.room_id,
            )
            self._m_messages.inc("dropped")
            return
        self._m_messages.inc("dispatched")
