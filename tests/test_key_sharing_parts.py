"""The parts of key sharing on their own: the withheld notices after a share, room-key
delivery's answer to a refused request, and the rotation of a session whose keys were refused.

Each part gets a :class:`~bot_toolkit._sharing_context.SharingContext` built here, the real
store, ledger and room-key log, a nio client with an Olm machine and no server
(:func:`bot_toolkit.testing.offline_client`) and :class:`bot_toolkit.testing.FakeOutbox`, which
can refuse an event type the way a closed outbox does. The same paths through the whole stack
and Synapse are in ``tests/test_key_sharing.py``, ``tests/test_withheld_integration.py`` and
``tests/test_room_keys.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nio import AsyncClient
from nio.crypto import OutboundGroupSession

from bot_toolkit._key_recipients import KeyRecipients, ShareRound
from bot_toolkit._room_key_delivery import RoomKeyDelivery
from bot_toolkit._share_notices import ShareNotices
from bot_toolkit._sharing_context import SharingContext
from bot_toolkit.events import WithheldCode
from bot_toolkit.metrics import Metrics
from bot_toolkit.outbox import OutboxSendFailed
from bot_toolkit.room_key_log import RoomKeyLog, SharedKey
from bot_toolkit.store import Store
from bot_toolkit.testing import FakeClock, FakeOutbox, offline_client
from bot_toolkit.withheld import (
    ClaimBackoff,
    NoOlmLedger,
    PeerDevice,
    SharingPolicy,
    WithheldError,
    WithheldMetrics,
)

WITHHELD = "m.room_key.withheld"
ROOM = "!room:example.org"
OUR_CURVE = "our-curve25519-key"
PEER = PeerDevice("@peer:example.org", "PEERDEVICE", "peer-curve25519-key")


@dataclass
class Parts:
    """One key sharing's shared context, with what it records."""

    client: AsyncClient
    store: Store
    outbox: FakeOutbox = field(default_factory=FakeOutbox)
    metrics: Metrics = field(default_factory=Metrics)
    errors: list[str] = field(default_factory=list)
    attached: bool = True

    @property
    def olm(self) -> Any:
        return self.client.olm

    def context(self) -> SharingContext:
        def spawn(coro: Any) -> None:
            coro.close()
            raise AssertionError("nothing here runs in the background")

        return SharingContext(
            client=self.client,
            outbox=self.outbox,
            metrics=self.metrics,
            counters=WithheldMetrics(self.metrics),
            limited=self.metrics.counter("test_limited_total", "rate limited", ["what"]),
            clock=FakeClock(1_000.0),
            policy=SharingPolicy,
            attached=lambda: self.attached,
            own=lambda: (self.client.user_id, self.client.device_id or "", OUR_CURVE),
            spawn=spawn,
            on_error=self.errors.append,
        )


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    client = offline_client(tmp_path / "nio")
    store = await Store.open(tmp_path / "bot.sqlite3")
    try:
        yield Parts(client, store)
    finally:
        await store.close()
        await client.close()


def _withheld(outbox: FakeOutbox) -> list[tuple[str, str, str, str | None]]:
    return [
        (m.user_id, m.device_id, m.content["code"], m.content.get("session_id"))
        for m in outbox.of_type(WITHHELD)
    ]


# ---------------------------------------------------------------------------------- ShareNotices


async def _notices(parts: Parts) -> tuple[ShareNotices, NoOlmLedger]:
    ctx = parts.context()
    ledger = await NoOlmLedger.open(parts.store, ctx.counters)
    return ShareNotices(ctx, ledger=ledger), ledger


async def test_a_refusal_the_outbox_did_not_take_goes_with_a_later_round_once(
    parts: Parts,
) -> None:
    notices, _ = await _notices(parts)
    done = ShareRound(
        ROOM, session_id="S1", refused=[(PEER, WithheldError(WithheldCode.UNVERIFIED))]
    )
    parts.outbox.fail_types.add(WITHHELD)
    await notices.send_refusals(done)
    assert parts.outbox.sent == []
    assert parts.errors == ["send_refusals"]

    parts.outbox.fail_types.clear()
    await notices.send_refusals(done)  # not taken, so not counted as told
    await notices.send_refusals(done)  # told: once per device, session and code
    assert _withheld(parts.outbox) == [(PEER.user_id, PEER.device_id, "m.unverified", "S1")]
    [sent] = parts.outbox.sent
    assert (sent.content["room_id"], sent.content["sender_key"]) == (ROOM, OUR_CURVE)


async def test_a_no_olm_the_outbox_did_not_take_stays_pending_and_goes_once_with_its_txn_id(
    parts: Parts,
) -> None:
    notices, ledger = await _notices(parts)
    txn_id = await ledger.decide(PEER)
    assert txn_id is not None
    parts.outbox.fail_types.add(WITHHELD)
    assert not await notices.deliver_no_olm(PEER, txn_id)
    assert notices.retry_needed
    assert await ledger.pending() == [(PEER, txn_id)]
    assert parts.errors == ["send_no_olm"]

    parts.outbox.fail_types.clear()
    assert await notices.resend_pending() == 1
    assert not notices.retry_needed
    assert await ledger.pending() == []
    assert await notices.resend_pending() == 0
    [sent] = parts.outbox.sent
    assert (sent.user_id, sent.device_id, sent.content["code"], sent.txn_id) == (
        PEER.user_id,
        PEER.device_id,
        "m.no_olm",
        txn_id,
    )


async def test_a_no_olm_handed_over_but_not_recorded_is_not_handed_over_again(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    notices, ledger = await _notices(parts)
    txn_id = await ledger.decide(PEER)
    assert txn_id is not None

    async def broken_mark_sent(device: PeerDevice, txn: str) -> None:
        raise RuntimeError("store gone")

    monkeypatch.setattr(ledger, "mark_sent", broken_mark_sent)
    assert await notices.deliver_no_olm(PEER, txn_id)  # the outbox has it
    assert parts.errors == ["mark_sent"]
    assert await ledger.pending() == [(PEER, txn_id)]  # a restart resends it, same txn id
    assert await notices.resend_pending() == 0  # this process does not
    assert len(parts.outbox.sent) == 1


# ------------------------------------------------------------------------------ RoomKeyDelivery


async def _refused_request(parts: Parts, delivery: RoomKeyDelivery, session_id: str) -> None:
    """A room-key request for ``PEER`` (and a device not in the room-key log) refused for good,
    as noted by an earlier run (found through the log, not this run's memory)."""
    room_keys = delivery.room_keys
    share = SharedKey(ROOM, session_id, PEER.user_id, PEER.device_id, PEER.curve25519, 0)
    await room_keys.record([share])
    await room_keys.note_requests(["txn-keys"], ROOM, session_id)
    await delivery.on_send_failed(
        OutboxSendFailed(
            event_type="m.room.encrypted",
            txn_id="txn-keys",
            status=403,
            errcode="M_FORBIDDEN",
            error="refused",
            recipients=((PEER.user_id, PEER.device_id), ("@other:example.org", "PACKED")),
        )
    )


async def _delivery(parts: Parts) -> tuple[RoomKeyDelivery, list[str]]:
    rotated: list[str] = []
    room_keys = await RoomKeyLog.open(parts.store)
    delivery = RoomKeyDelivery(parts.context(), room_keys=room_keys, rotate_later=rotated.append)
    return delivery, rotated


async def test_a_refused_room_key_is_withheld_and_its_current_session_replaced(
    parts: Parts,
) -> None:
    delivery, rotated = await _delivery(parts)
    session = OutboundGroupSession()
    parts.olm.outbound_group_sessions[ROOM] = session
    await _refused_request(parts, delivery, session.id)
    assert _withheld(parts.outbox) == [(PEER.user_id, PEER.device_id, "m.unavailable", session.id)]
    assert rotated == [session.id]
    failures = parts.metrics.get("room_key_failures_total")
    assert failures is not None and failures.get("refused_withheld") == 1


async def test_a_refused_room_key_of_an_old_session_is_withheld_without_a_rotation(
    parts: Parts,
) -> None:
    delivery, rotated = await _delivery(parts)
    parts.olm.outbound_group_sessions[ROOM] = OutboundGroupSession()  # the room moved on
    await _refused_request(parts, delivery, "OLD-SESSION")
    assert _withheld(parts.outbox) == [
        (PEER.user_id, PEER.device_id, "m.unavailable", "OLD-SESSION")
    ]
    assert rotated == []


async def test_a_refused_request_is_ignored_once_detached_or_when_it_carried_no_known_key(
    parts: Parts,
) -> None:
    delivery, rotated = await _delivery(parts)
    parts.attached = False
    await _refused_request(parts, delivery, "S1")
    parts.attached = True
    await delivery.on_send_failed(
        OutboxSendFailed(
            event_type="m.room.encrypted",
            txn_id="never-noted",
            status=403,
            errcode="M_FORBIDDEN",
            error=None,
            recipients=((PEER.user_id, PEER.device_id),),
        )
    )
    assert parts.outbox.sent == [] and rotated == [] and parts.errors == []


# -------------------------------------------------------------------------------- KeyRecipients


def test_a_session_marked_for_rotation_is_replaced_once(parts: Parts) -> None:
    recipients = KeyRecipients(
        parts.context(), backoff=ClaimBackoff(FakeClock(0.0)), cross_signing=lambda: None
    )
    olm = parts.olm
    session = OutboundGroupSession()
    olm.outbound_group_sessions[ROOM] = session
    should_share = recipients.wrap_should_share(olm, lambda room_id: False)
    assert not should_share(ROOM)

    recipients.rotate_later(session.id)
    parts.attached = False
    assert not should_share(ROOM)  # detached: nio decides alone
    parts.attached = True
    assert should_share(ROOM)
    assert ROOM not in olm.outbound_group_sessions  # nio makes a new one

    olm.outbound_group_sessions[ROOM] = session  # the mark was used up: no second rotation
    assert not should_share(ROOM)
    assert olm.outbound_group_sessions[ROOM] is session
    assert parts.errors == []
