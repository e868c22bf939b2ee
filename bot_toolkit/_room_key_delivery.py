"""Room keys delivered through the outbox; a key the homeserver refuses is withheld and replaced.

Part of :class:`~bot_toolkit.key_sharing.KeySharing` (see its module docs, "Sending"):

* :meth:`RoomKeyDelivery.share` is nio's ``share_group_session`` with the keys stored in the
  :class:`~bot_toolkit.outbox.Outbox` (:func:`bot_toolkit._nio_adapter.share_room_key`): each
  device's key is recorded in the :class:`~bot_toolkit.room_key_log.RoomKeyLog` and stored in the
  outbox before the device counts as shared; if that fails it raises :class:`RoomKeysNotQueued`;
* :meth:`RoomKeyDelivery.on_send_failed` (an :class:`~bot_toolkit.outbox.OutboxSendFailed` of a
  request carrying room keys): the refused devices get ``m.room_key.withheld`` with
  ``m.unavailable`` for that session, and a session still current is replaced before the next
  message.

Counted in ``room_keys_queued_total`` and ``room_key_failures_total{what}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from nio import ShareGroupSessionResponse

from bot_toolkit._bounded import BoundedMap
from bot_toolkit._nio_adapter import share_room_key
from bot_toolkit._sharing_context import SharingContext
from bot_toolkit._withheld_wire import WITHHELD_EVENT
from bot_toolkit.events import WithheldCode
from bot_toolkit.outbox import OutboxSendFailed
from bot_toolkit.room_key_log import RoomKeyLog, SharedKey
from bot_toolkit.withheld import WithheldError, withheld_content

__all__ = ["RoomKeyDelivery", "RoomKeysNotQueued", "is_room_key_failure"]

log = logging.getLogger("bot_toolkit.key_sharing")

_ENCRYPTED_EVENT: Final = "m.room.encrypted"
_REQUESTS_REMEMBERED: Final = 10_000


class RoomKeysNotQueued(RuntimeError):
    """The Megolm room keys of a message could not be stored in the outbox (the store failed or
    the outbox is closed). ``room_send`` raises it and sends nothing: a message whose keys are
    not on their way would be undecryptable. The cause is the ``__cause__``."""


def is_room_key_failure(event: OutboxSendFailed) -> bool:
    """Whether the refused request carried room keys (the filter of :meth:`on_send_failed`)."""
    return event.event_type == _ENCRYPTED_EVENT


class RoomKeyDelivery:
    """The room-key delivery of one :class:`~bot_toolkit.key_sharing.KeySharing`.

    ``rotate_later(session_id)`` replaces a session before the room's next message.
    """

    def __init__(
        self,
        ctx: SharingContext,
        *,
        room_keys: RoomKeyLog,
        rotate_later: Callable[[str], None],
    ) -> None:
        self.client = ctx.client
        self.room_keys = room_keys
        self._ctx = ctx
        self._rotate_later = rotate_later
        # outbox txn id -> (room, Megolm session id) of the room keys it carries (this run)
        self._key_requests: BoundedMap[str, tuple[str, str]] = BoundedMap(_REQUESTS_REMEMBERED)
        self._m_room_keys = ctx.metrics.counter(
            "room_keys_queued_total",
            "Megolm room keys stored in the outbox for a device",
            [],
        )
        self._m_room_key_failures = ctx.metrics.counter(
            "room_key_failures_total",
            "Room keys not delivered (what: store, refused_withheld)",
            ["what"],
        )

    async def share(
        self, room_id: str, ignore_unverified_devices: bool
    ) -> ShareGroupSessionResponse:
        """nio's ``share_group_session``, with the room keys going through the outbox.

        nio 0.26 sends the keys itself with ``_send``, ignores failed answers and marks the
        session as shared anyway. Here every device's Olm-encrypted key is recorded in the
        room-key log and stored in the outbox (one ``send()``: the outbox packs the messages
        into requests of its ``batch_size``, retries them with the same transaction ids and
        resends them after a crash); only then do the devices count as shared with, and only
        then is the session marked shared, so ``room_send`` encrypts nothing with a session
        whose keys are not durably on their way.

        Raises:
            LocalProtocolError: as nio's (no such room, not encrypted, already sharing).
            RoomKeysNotQueued: the keys could not be stored; nothing counts as shared, and
                ``room_send`` raises instead of sending a message nobody could decrypt.
        """
        olm = self.client.olm

        async def store(session: Any, shared: set[tuple[str, str]], messages: Any) -> None:
            await self._queue_room_keys(olm, room_id, session, shared, messages)

        return await share_room_key(self.client, room_id, ignore_unverified_devices, store)

    async def _queue_room_keys(
        self,
        olm: Any,
        room_id: str,
        session: Any,
        shared: set[tuple[str, str]],
        messages: dict[str, dict[str, Any]],
    ) -> None:
        """Record who gets the key of ``session``, then store the key messages in the outbox."""
        index = int(session.message_index)
        records = []
        for user_id, device_id in shared:
            device = olm.device_store[user_id].get(device_id)
            curve = "" if device is None else str(device.curve25519)
            records.append(SharedKey(room_id, session.id, user_id, device_id, curve, index))
        try:
            await self.room_keys.record(records)
            txn_ids = await self._ctx.outbox.send(_ENCRYPTED_EVENT, messages)
        except Exception as exc:
            self._m_room_key_failures.inc("store")
            log.error(
                "could not store the room key of %s for %d devices: %s; the message is not sent",
                room_id,
                len(shared),
                type(exc).__name__,
            )
            raise RoomKeysNotQueued(f"room keys for {room_id} not stored: {exc}") from exc
        for txn_id in txn_ids:
            self._key_requests[txn_id] = (room_id, session.id)
        try:
            await self.room_keys.note_requests(txn_ids, room_id, session.id)
        except Exception:
            # The keys are stored; only a refusal of them after a restart goes unanswered.
            self._ctx.on_error("note_requests")
        self._m_room_keys.inc(amount=len(shared))
        log.info(
            "room key of %s (session %s, index %d) stored for %d devices in %d requests",
            room_id,
            session.id,
            index,
            len(shared),
            len(txn_ids),
        )

    async def on_send_failed(self, event: OutboxSendFailed) -> None:
        """The homeserver refused a request carrying room keys: tell why, offer a new key.

        Each refused device gets ``m.room_key.withheld`` with ``m.unavailable`` for that
        session: the messages it cannot read now say why. When the session is still the room's
        current one it is discarded, so the next message uses a new session and offers its key
        to every device again, the refused ones included. (Offering the old session again would
        give them its key only from the current message index on: what they missed would stay
        unreadable with no reason shown.)
        """
        olm = self.client.olm
        if olm is None or not self._ctx.attached():
            return
        entry = self._key_requests.pop(event.txn_id, None)
        if entry is None:  # sent by an earlier run, or not a room-key request
            entry = await self.room_keys.request_session(event.txn_id)
        if entry is None:
            return
        room_id, session_id = entry
        refused: list[SharedKey] = []
        for user_id, device_id in event.recipients:
            record = await self.room_keys.lookup(session_id, user_id, device_id)
            if record is not None:  # else another message packed into the same request
                refused.append(record)
        if not refused:
            return
        session = olm.outbound_group_sessions.get(room_id)
        rotated = session is not None and session.id == session_id
        if rotated:
            self._rotate_later(session_id)
        log.warning(
            "room key of %s (session %s) refused for %d devices (%d %s); telling them "
            "m.unavailable%s",
            room_id,
            session_id,
            len(refused),
            event.status,
            event.errcode,
            "; the next message uses a new session" if rotated else "",
        )
        await self._withhold_unavailable(refused)

    async def _withhold_unavailable(self, records: list[SharedKey]) -> None:
        _, device_id, curve = self._ctx.own()
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        for r in records:
            messages.setdefault(r.user_id, {})[r.device_id] = withheld_content(
                WithheldError(WithheldCode.UNAVAILABLE),
                sender_key=curve,
                from_device=device_id,
                room_id=r.room_id,
                session_id=r.session_id,
            )
        try:
            await self._ctx.outbox.send(WITHHELD_EVENT, messages)
        except Exception:
            self._ctx.on_error("withhold_unavailable")
            return
        self._ctx.counters.sent.inc(WithheldCode.UNAVAILABLE, amount=len(records))
        self._m_room_key_failures.inc("refused_withheld", amount=len(records))
        log.info("told %d devices m.unavailable for a refused room key", len(records))
