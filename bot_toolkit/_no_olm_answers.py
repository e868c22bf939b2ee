"""Answers to a received ``m.no_olm``: open an Olm session to the sender, send it ``m.dummy``.

Part of :class:`~bot_toolkit.key_sharing.KeySharing` (see its module docs, "Receiving"): the
sender could not reach us, so the bot claims one of its one-time keys, opens a new Olm session
and sends an Olm-encrypted ``m.dummy`` through the outbox, at most once per peer device per hour
(:class:`~bot_toolkit.withheld.DummyThrottle`), within a per-sender budget, and only to users it
knows. Counted in ``withheld_dummy_total{result}``.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from bot_toolkit._nio_adapter import olm_encrypt
from bot_toolkit._sharing_context import SharingContext
from bot_toolkit.events import RoomKeyWithheld
from bot_toolkit.key_queries import KeyQueries
from bot_toolkit.withheld import DummyThrottle, PeerDevice, SenderRateLimit

__all__ = ["NoOlmAnswers"]

log = logging.getLogger("bot_toolkit.key_sharing")

_ENCRYPTED_EVENT: Final = "m.room.encrypted"
_NO_OLM_ANSWERS: Final = 64
"""``m.no_olm`` answers (device-list query, claim, ``m.dummy``) running at once; more are
dropped and counted (``withheld_dummy_total{result="busy"}``)."""


class NoOlmAnswers:
    """The ``m.no_olm`` answers of one :class:`~bot_toolkit.key_sharing.KeySharing`: they run
    while its hooks are attached and its policy's ``dummy_on_no_olm`` is on, in its background
    task set."""

    def __init__(self, ctx: SharingContext, *, throttle: DummyThrottle) -> None:
        self.client = ctx.client
        self._ctx = ctx
        self._throttle = throttle
        self._m_dummy = ctx.metrics.counter(
            "withheld_dummy_total",
            "Answers to received m.no_olm notices (result: sent, throttled, no_device, no_key)",
            ["result"],
        )
        self._no_olm_limit = SenderRateLimit(ctx.clock)
        self._queries = KeyQueries.of(ctx.client, ctx.metrics)
        self._answering = 0  # m.no_olm answers running in the background

    async def on_withheld(self, event: RoomKeyWithheld) -> None:
        """A peer could not set up an Olm session with us: open one to it and send ``m.dummy``."""
        client = self.client
        olm = client.olm
        if not (self._ctx.attached() and self._ctx.policy().dummy_on_no_olm) or olm is None:
            return
        if not self._no_olm_limit.allow(event.sender):
            self._ctx.limited.inc("no_olm")
            log.debug("m.no_olm from %s: rate limited", event.sender)
            return
        if not _knows_user(client, event.sender):
            # A user the bot shares no room with has no room key to send it: nothing to
            # answer, and no reason to query (and from then on track) its devices.
            self._m_dummy.inc("stranger")
            log.info("m.no_olm from %.255s: not a user the bot knows, no m.dummy", event.sender)
            return
        if self._answering >= _NO_OLM_ANSWERS:
            self._m_dummy.inc("busy")
            log.info("m.no_olm from %.255s: too many answers in progress", event.sender)
            return
        # Off the dispatcher: the device-list query and the one-time-key claim can take as
        # long as the sender's homeserver makes them.
        self._answering += 1
        self._ctx.spawn(self._answer_no_olm(event))

    async def _answer_no_olm(self, event: RoomKeyWithheld) -> None:
        try:
            olm = self.client.olm
            if olm is None:
                return
            device = _sender_device(olm, event)
            if device is None:
                # Unknown device: fetch the sender's device list (at most once a while).
                await self._queries.query(event.sender)
                device = _sender_device(olm, event)
            if device is None:
                self._m_dummy.inc("no_device")
                log.info("m.no_olm from %.255s: its device is unknown, no m.dummy", event.sender)
                return
            await self._dummy_to(olm, device)
        finally:
            self._answering -= 1

    async def _dummy_to(self, olm: Any, device: Any) -> None:
        peer = PeerDevice(device.user_id, device.device_id, device.curve25519)
        if not await self._throttle.acquire(peer):
            self._m_dummy.inc("throttled")
            log.info(
                "m.no_olm from %s %s: m.dummy sent within the hour", peer.user_id, peer.device_id
            )
            return
        try:
            sent = await self._open_and_send_dummy(olm, device, peer)
        except BaseException:
            await self._release_dummy(peer)
            raise
        if not sent:
            await self._release_dummy(peer)

    async def _open_and_send_dummy(self, olm: Any, device: Any, peer: PeerDevice) -> bool:
        """Claim a one-time key of ``device``, open a session and send it ``m.dummy``.

        False when no new session could be opened (nothing was sent).
        """
        before = olm.session_store.get(device.curve25519)
        await self.client.keys_claim({device.user_id: [device.device_id]})
        session = olm.session_store.get(device.curve25519)
        if session is None or session is before:
            self._m_dummy.inc("no_key")
            log.info(
                "m.no_olm from %s %s: no one-time key to open a session",
                peer.user_id,
                peer.device_id,
            )
            return False
        envelope = olm_encrypt(olm, session, device, "m.dummy", {})
        await self._ctx.outbox.send(
            _ENCRYPTED_EVENT, {device.user_id: {device.device_id: envelope}}
        )
        self._m_dummy.inc("sent")
        log.info("opened an Olm session with %s %s and sent m.dummy", peer.user_id, peer.device_id)
        return True

    async def _release_dummy(self, peer: PeerDevice) -> None:
        """Give the hour's ``m.dummy`` slot of ``peer`` back: nothing was sent."""
        try:
            await self._throttle.release(peer)
        except Exception:
            self._ctx.on_error("dummy_release")


# ---------------------------------------------------------------------------------------------


def _knows_user(client: Any, user_id: str) -> bool:
    """Whether nio tracks ``user_id``'s devices or the user is in a room with the bot."""
    olm = client.olm
    if olm is not None and (user_id in olm.tracked_users or user_id in olm.device_store.users):
        return True
    rooms = (*client.rooms.values(), *client.invited_rooms.values())
    return any(user_id in room.users for room in rooms)


def _sender_device(olm: Any, event: RoomKeyWithheld) -> Any:
    store = olm.device_store
    if event.sender not in store.users:
        return None
    if event.from_device:
        device = store[event.sender].get(event.from_device)
        if device is not None and not device.deleted and device.curve25519 == event.sender_key:
            return device
    return store.device_from_sender_key(event.sender, event.sender_key)
