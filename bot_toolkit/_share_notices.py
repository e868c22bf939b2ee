"""The withheld notices after a share: why a device got no room key, each sent once.

Part of :class:`~bot_toolkit.key_sharing.KeySharing` (see its module docs, "Sending" and "Crash
safety"). What a :class:`~bot_toolkit._key_recipients.ShareRound` found becomes notices through
the outbox:

* refused devices get ``m.blacklisted`` / ``m.unverified`` (:meth:`ShareNotices.send_refusals`),
  once per device, Megolm session and code (:class:`~bot_toolkit.withheld.WithheldDeduper`);
* devices with no Olm session get ``m.no_olm`` as the :class:`~bot_toolkit.withheld.NoOlmLedger`
  decides (:meth:`ShareNotices.deliver_no_olm`): the ledger commits the decision with a
  transaction id first, the outbox stores the notice under that id, the ledger marks it sent;
  :meth:`ShareNotices.recover` hands over what a crash left decided but unmarked;
* any Olm session with a device told ``m.no_olm`` re-arms it in the ledger
  (:meth:`ShareNotices.wrap_save_session`, the hook on ``Olm.save_session``;
  :meth:`ShareNotices.flush` records what it observed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bot_toolkit._key_recipients import ShareRound
from bot_toolkit._sharing_context import SharingContext
from bot_toolkit._withheld_wire import WITHHELD_EVENT
from bot_toolkit.events import WithheldCode
from bot_toolkit.withheld import (
    NoOlmLedger,
    PeerDevice,
    WithheldDeduper,
    WithheldError,
    withheld_content,
)

__all__ = ["ShareNotices"]

log = logging.getLogger("bot_toolkit.key_sharing")


class ShareNotices:
    """The withheld notices of one :class:`~bot_toolkit.key_sharing.KeySharing`."""

    def __init__(self, ctx: SharingContext, *, ledger: NoOlmLedger) -> None:
        self.client = ctx.client
        self.ledger = ledger
        self.deduper = WithheldDeduper(ctx.counters)
        self._ctx = ctx
        self._observed: set[str] = set()  # curve25519 keys with a live session, not yet recorded
        # m.no_olm transaction ids being handed to the outbox, or handed over but not recorded
        self._in_flight: set[str] = set()
        self._retry_needed = False  # a notice stayed pending after a failed hand-over

    @property
    def retry_needed(self) -> bool:
        """Whether an ``m.no_olm`` hand-over failed since the last :meth:`resend_pending`."""
        return self._retry_needed

    # ----------------------------------------------------------------- refusals

    async def send_refusals(self, done: ShareRound) -> None:
        """Tell the devices ``done`` refused why they get no key (once per session and code)."""
        assert done.session_id is not None
        _, device_id, curve = self._ctx.own()
        messages: dict[str, dict[str, dict[str, Any]]] = {}
        sent: list[tuple[PeerDevice, str]] = []
        for peer, refusal in done.refused:
            if not self.deduper.first(peer, done.session_id, refusal.code):
                continue
            content = withheld_content(
                refusal,
                sender_key=curve,
                from_device=device_id,
                room_id=done.room_id,
                session_id=done.session_id,
            )
            messages.setdefault(peer.user_id, {})[peer.device_id] = content
            sent.append((peer, refusal.code))
        if not sent:
            return
        try:
            await self._ctx.outbox.send(WITHHELD_EVENT, messages)
        except Exception:
            for peer, code in sent:
                self.deduper.forget(peer, done.session_id, code)
            self._ctx.on_error("send_refusals")
            return
        for _, code in sent:
            self._ctx.counters.sent.inc(code)
        log.info("told %d devices why they get no key for %s", len(sent), done.room_id)

    # ----------------------------------------------------------------- m.no_olm

    async def deliver_no_olm(self, peer: PeerDevice, txn_id: str) -> bool:
        """Hand the decided notice ``txn_id`` to the outbox and record that in the ledger.

        False when the outbox did not take it: it stays pending and is tried again after the
        next share (and by :meth:`recover`). When only the ledger's record fails, the notice is
        not handed over again by this process.
        """
        _, device_id, curve = self._ctx.own()
        content = withheld_content(
            WithheldError(WithheldCode.NO_OLM), sender_key=curve, from_device=device_id
        )
        messages = {peer.user_id: {peer.device_id: content}}
        self._in_flight.add(txn_id)
        try:
            await self._ctx.outbox.send(WITHHELD_EVENT, messages, txn_id=txn_id)
        except Exception:
            self._retry_needed = True
            self._in_flight.discard(txn_id)
            self._ctx.on_error("send_no_olm")
            return False
        self._ctx.counters.sent.inc(WithheldCode.NO_OLM)
        log.info("told %s %s m.no_olm", peer.user_id, peer.device_id)
        try:
            await self.ledger.mark_sent(peer, txn_id)
        except Exception:
            self._ctx.on_error("mark_sent")  # stays in _in_flight: never handed over twice here
        else:
            self._in_flight.discard(txn_id)
        return True

    async def resend_pending(self) -> int:
        """Hand over every decided ``m.no_olm`` notice whose hand-over was never recorded (and
        is not being handed over now); returns how many went."""
        self._retry_needed = False
        resent = 0
        for device, txn_id in await self.ledger.pending():
            if txn_id in self._in_flight:
                continue
            if await self.deliver_no_olm(device, txn_id):
                resent += 1
        if resent:
            log.info("sent %d recorded m.no_olm notices again", resent)
        return resent

    async def recover(self) -> int:
        """Record Olm sessions that exist with devices the ledger holds as told (a crash can
        lose the in-memory observation), then :meth:`resend_pending`; returns how many went."""
        olm = self.client.olm
        if olm is not None:
            for entry in await self.ledger.entries():
                curve = entry.device.curve25519
                if not entry.session_since_notice and olm.session_store.get(curve) is not None:
                    await self.ledger.session_established(curve, user_id=entry.device.user_id)
        return await self.resend_pending()

    # ----------------------------------------------------------------- Olm sessions observed

    def wrap_save_session(self, original: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        """The replacement for ``olm.save_session``: a session with a device told
        ``m.no_olm`` is observed, and recorded in the ledger in the background."""

        def save_session(curve_key: str, session: Any) -> None:
            original(curve_key, session)
            try:
                if self._ctx.attached() and self.ledger.armed(curve_key):
                    first = not self._observed
                    self._observed.add(curve_key)
                    if first:
                        self._ctx.spawn(self.flush())
            except Exception:
                self._ctx.on_error("save_session")

        return save_session

    async def flush(self) -> None:
        """Record observed Olm sessions in the ledger now."""
        while self._observed:
            curve = self._observed.pop()
            try:
                await self.ledger.session_established(curve)
            except Exception:
                self._observed.add(curve)
                self._ctx.on_error("session_established")
                return
