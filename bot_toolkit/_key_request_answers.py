"""Answers to a received ``m.room_key_request``: the key, a refusal, or silence.

Part of :class:`~bot_toolkit.key_sharing.KeySharing` (see its module docs, "Receiving"). A request
for one of the bot's own sessions from a device the room-key log says it meant to have it gets
the key (``m.forwarded_room_key``, Olm-encrypted, through the outbox, from the index the device
was first given); other requests nio will not serve get ``m.unauthorised`` or ``m.unavailable``
as :meth:`~bot_toolkit.withheld.SharingPolicy.check_key_request` decides, within a per-sender
budget. Each request is answered at most once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from bot_toolkit._bounded import BoundedMap
from bot_toolkit._nio_adapter import inbound_group_sessions, olm_encrypt
from bot_toolkit._sharing_context import SharingContext
from bot_toolkit._withheld_wire import WITHHELD_EVENT
from bot_toolkit.events import RoomKeyRequest
from bot_toolkit.room_key_log import RoomKeyLog
from bot_toolkit.withheld import (
    DeviceTrust,
    SenderRateLimit,
    WithheldError,
    withheld_content,
)

__all__ = ["KeyRequestAnswers"]

log = logging.getLogger("bot_toolkit.key_sharing")

_ENCRYPTED_EVENT: Final = "m.room.encrypted"
_MEGOLM: Final = "m.megolm.v1.aes-sha2"
_REQUESTS_REMEMBERED: Final = 10_000


class KeyRequestAnswers:
    """The key-request answers of one :class:`~bot_toolkit.key_sharing.KeySharing`.

    ``trust(olm, device)`` is its view of a device's trust.
    """

    def __init__(
        self,
        ctx: SharingContext,
        *,
        room_keys: RoomKeyLog,
        trust: Callable[[Any, Any], DeviceTrust],
    ) -> None:
        self.client = ctx.client
        self.room_keys = room_keys
        self._ctx = ctx
        self._trust = trust
        self._m_forwarded = ctx.metrics.counter(
            "room_key_requests_served_total",
            "Key requests answered with the key (Olm, through the outbox)",
            ["result"],  # sent, no_olm_session
        )
        # Per sender user: withheld replies to key requests, and answers to m.no_olm (device-list
        # query, claim, m.dummy). Any Matrix user can send both.
        self._request_limit = SenderRateLimit(ctx.clock)
        self._answered: BoundedMap[tuple[str, str, str], None] = BoundedMap(_REQUESTS_REMEMBERED)

    async def on_key_request(self, event: RoomKeyRequest) -> None:
        """Answer ``event`` with the key, a withheld notice, or not at all (see the module)."""
        olm = self.client.olm
        if not self._ctx.attached() or olm is None or not self._ctx.policy().answer_key_requests:
            return
        own_user, own_device, _ = self._ctx.own()
        if event.sender == own_user and event.requesting_device_id == own_device:
            return
        key = (event.sender, event.requesting_device_id, event.request_id)
        if key in self._answered:
            return
        device = None
        if event.sender in olm.device_store.users:
            device = olm.device_store[event.sender].get(event.requesting_device_id)
            if device is not None and device.deleted:
                device = None
        trust = None if device is None else self._trust(olm, device)
        if (
            device is not None
            and trust is not None
            and await self._serve_meant_key(olm, event, device, trust)
        ):
            self._remember_answered(key)
            return
        if not self._ctx.policy().send_withheld:
            return
        try:
            self._ctx.policy().check_key_request(
                own_user_id=own_user,
                requester_user_id=event.sender,
                requester=trust,
                have_session=lambda: _holds_session(olm, event),
                requester_device_id=event.requesting_device_id,
            )
        except WithheldError as refusal:
            if not self._request_limit.allow(event.sender):
                self._ctx.limited.inc("key_request")
                log.debug("key request %s from %s: rate limited", event.request_id, event.sender)
                return
            await self._reply(event, refusal)
            self._remember_answered(key)

    def _remember_answered(self, key: tuple[str, str, str]) -> None:
        self._answered[key] = None

    async def _serve_meant_key(
        self, olm: Any, event: RoomKeyRequest, device: Any, trust: DeviceTrust
    ) -> bool:
        """Answer a request for one of the bot's own sessions with the key, when the room-key
        log says the bot meant this device (same identity key) to have it.

        The key goes out as ``m.forwarded_room_key`` (the spec's answer to a key request),
        Olm-encrypted, through the outbox, exported from the index the device was first given:
        never history from before it was meant to read. True when the request was handled
        (answered, or silently dropped by the rate limit); False leaves it to the spec's
        ``m.unauthorised``/``m.unavailable`` rules (and to nio for our own verified devices).
        """
        body = event.body
        own_curve = olm.account.identity_keys["curve25519"]
        if body.algorithm != _MEGOLM or not body.session_id or not body.room_id:
            return False
        if body.sender_key not in (None, own_curve):
            return False
        if event.sender == olm.user_id and trust.verified and not trust.blacklisted:
            return False  # nio forwards keys to our own verified devices itself
        if self._ctx.policy().withholds(trust):
            return False
        record = await self.room_keys.lookup(
            body.session_id, event.sender, event.requesting_device_id
        )
        if (
            record is None
            or record.room_id != body.room_id
            or record.curve25519 != device.curve25519
        ):
            return False
        inbound = inbound_group_sessions(olm.inbound_group_store, body.room_id)
        group_session = inbound.get(own_curve, {}).get(body.session_id)
        if group_session is None:
            return False
        if not self._request_limit.allow(event.sender):
            self._ctx.limited.inc("key_request")
            log.debug("key request %s from %s: rate limited", event.request_id, event.sender)
            return True
        session = olm.session_store.get(device.curve25519)
        if session is None:
            await self.client.keys_claim({device.user_id: [device.device_id]})
            session = olm.session_store.get(device.curve25519)
        if session is None:
            self._m_forwarded.inc("no_olm_session")
            log.info(
                "key request %s from %s %s: no Olm session could be opened",
                event.request_id,
                event.sender,
                event.requesting_device_id,
            )
            return True
        index = max(record.first_index, int(group_session.first_known_index))
        content = {
            "algorithm": _MEGOLM,
            "forwarding_curve25519_key_chain": [],
            "room_id": body.room_id,
            "sender_claimed_ed25519_key": olm.account.identity_keys["ed25519"],
            "sender_key": own_curve,
            "session_id": body.session_id,
            "session_key": group_session.export_session(index),
        }
        envelope = olm_encrypt(olm, session, device, "m.forwarded_room_key", content)
        await self._ctx.outbox.send(
            _ENCRYPTED_EVENT, {device.user_id: {device.device_id: envelope}}
        )
        self._m_forwarded.inc("sent")
        log.info(
            "answered key request %s from %s %s with the key of %s from index %d",
            event.request_id,
            event.sender,
            event.requesting_device_id,
            body.session_id,
            index,
        )
        return True

    async def _reply(self, event: RoomKeyRequest, refusal: WithheldError) -> None:
        _, device_id, curve = self._ctx.own()
        content = withheld_content(
            refusal,
            sender_key=event.body.sender_key or curve,
            from_device=device_id,
            room_id=event.body.room_id,
            session_id=event.body.session_id,
            algorithm=event.body.algorithm,
        )
        await self._ctx.outbox.send(
            WITHHELD_EVENT, {event.sender: {event.requesting_device_id: content}}
        )
        self._ctx.counters.sent.inc(refusal.code)
        log.info(
            "answered key request %s from %s %s: %s",
            event.request_id,
            event.sender,
            event.requesting_device_id,
            refusal.code,
        )


def _holds_session(olm: Any, event: RoomKeyRequest) -> bool:
    body = event.body
    if body.algorithm != "m.megolm.v1.aes-sha2":
        return False
    # nio 0.26's GroupSessionStore.get() would insert an empty entry per unknown room and
    # sender key (memory anyone can make us spend): read without writing.
    by_sender = inbound_group_sessions(olm.inbound_group_store, body.room_id)
    if body.sender_key:
        return body.session_id in by_sender.get(body.sender_key, {})
    return any(body.session_id in sessions for sessions in by_sender.values())
