"""The matrix-js-sdk test peer works: two js peers verify each other over real Synapse.

This proves the harness (tests/interop/peer.mjs + tests/interop_peer.py) before bot_toolkit's
own verification is tested against it. Needs ``npm ci --prefix tests/interop``; a missing install
fails these tests with that instruction instead of skipping them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.interop_peer import JsPeer, JsPeerTimeout, require_node_peer, started_peer
from tests.synapse import LocalSynapse

pytestmark = [pytest.mark.interop, pytest.mark.synapse]

T = 60.0  # upper bound for every single wait below


@dataclass
class Pair:
    a: JsPeer
    b: JsPeer
    room_id: str | None

    @property
    def a_dev(self) -> tuple[str, str]:
        assert self.a.user_id and self.a.device_id
        return self.a.user_id, self.a.device_id

    @property
    def b_dev(self) -> tuple[str, str]:
        assert self.b.user_id and self.b.device_id
        return self.b.user_id, self.b.device_id


@pytest.fixture
async def pair(synapse: LocalSynapse) -> AsyncIterator[Pair]:
    """Two started js peers (two users) in one encrypted room, each knowing the other's device."""
    require_node_peer()
    a = await started_peer(synapse, "js-a", timeout=T)
    try:
        b = await started_peer(synapse, "js-b", timeout=T)
        try:
            assert b.user_id
            room_id = await a.create_room(invite=[b.user_id], encrypted=True)
            await b.join(room_id, timeout=T)
            await a.wait_membership(room_id, b.user_id, "join", timeout=T)
            await b.wait_membership(room_id, a.user_id, "join", timeout=T)
            # The shared encrypted room alone makes each SDK track the other user's devices.
            assert a.user_id and b.device_id and a.device_id
            await a.devices(b.user_id, b.device_id, wait=True, timeout=T)
            await b.devices(a.user_id, a.device_id, wait=True, timeout=T)
            yield Pair(a, b, room_id)
        finally:
            await b.close()
    finally:
        await a.close()


@pytest.fixture
async def strangers(synapse: LocalSynapse) -> AsyncIterator[Pair]:
    """Two started js peers that share no room: neither tracks the other's devices."""
    require_node_peer()
    a = await started_peer(synapse, "js-a", timeout=T)
    try:
        b = await started_peer(synapse, "js-b", timeout=T)
        try:
            yield Pair(a, b, None)
        finally:
            await b.close()
    finally:
        await a.close()


async def _assert_verified(peer: JsPeer, user_id: str, device_id: str) -> None:
    status = await peer.device_status(user_id, device_id)
    assert status["known"], status
    assert status["verified"], status
    assert status["locally_verified"], status


async def _assert_not_verified(peer: JsPeer, user_id: str, device_id: str) -> None:
    status = await peer.device_status(user_id, device_id)
    assert status["known"], status
    assert not status["verified"], status
    assert not status["locally_verified"], status


async def test_sas_verification_between_two_js_peers(pair: Pair) -> None:
    a, b = pair.a, pair.b
    await _assert_not_verified(a, *pair.b_dev)
    await b.auto_accept(confirm=True, user_id=a.user_id)

    req = await a.request_verification(*pair.b_dev, timeout=T)
    txn = req["transaction_id"]
    assert req["initiated_by_me"]

    incoming = await b.wait_event("verification_request", lambda e: e["transaction_id"] == txn, T)
    assert (incoming["other_user"], incoming["other_device"]) == pair.a_dev
    assert "m.sas.v1" in incoming["their_methods"]

    await a.wait_phase(txn, "ready", timeout=T)
    await a.start_sas(txn, timeout=T)
    sas_a = (await a.wait_sas(txn, timeout=T))["sas"]
    sas_b = await b.wait_event("sas", lambda e: e["transaction_id"] == txn, T)
    assert len(sas_a["emoji"]) == 7
    assert sas_a["emoji"] == sas_b["emoji"]
    assert sas_a["decimal"] == sas_b["decimal"]

    await a.confirm_sas(txn, timeout=T)
    done = await a.wait_phase(txn, "done", timeout=T)
    assert done["phase"] == "done"
    await b.wait_event("verification_done", lambda e: e["transaction_id"] == txn, T)

    await _assert_verified(a, *pair.b_dev)
    await _assert_verified(b, *pair.a_dev)


async def test_cancel_midway(pair: Pair) -> None:
    a, b = pair.a, pair.b
    # B accepts and shows the SAS but never confirms: A cancels while both look at the emoji.
    await b.auto_accept(confirm=False, user_id=a.user_id)
    txn = (await a.request_verification(*pair.b_dev, timeout=T))["transaction_id"]
    await a.wait_phase(txn, "ready", timeout=T)
    await a.start_sas(txn, timeout=T)
    await a.wait_sas(txn, timeout=T)
    await b.wait_event("sas", lambda e: e["transaction_id"] == txn, T)

    await a.cancel(txn)
    cancelled = await b.wait_event(
        "verification_cancelled", lambda e: e["transaction_id"] == txn, T
    )
    # Noted in docs/protocol-notes.md: request.cancel() always sends m.user.
    assert cancelled["code"] == "m.user"
    assert cancelled["cancelling_user"] == a.user_id
    info = await a.wait_phase(txn, "cancelled", timeout=T)
    assert info["cancellation_code"] == "m.user"

    await _assert_not_verified(a, *pair.b_dev)
    await _assert_not_verified(b, *pair.a_dev)


async def test_manual_flow_mismatch_cancels_both(pair: Pair) -> None:
    """Receiver drives by hand (wait_request, accept_request, start_sas) and reports a mismatch."""
    a, b = pair.a, pair.b
    txn = (await a.request_verification(*pair.b_dev, timeout=T))["transaction_id"]
    got = await b.wait_request(user_id=a.user_id, device_id=a.device_id, timeout=T)
    assert got["transaction_id"] == txn
    assert got["phase"] == "requested"
    await b.accept_request(txn, timeout=T)
    await a.wait_phase(txn, "ready", timeout=T)

    await b.start_sas(txn, timeout=T)  # the receiver starts, as Element lets either side do
    await a.wait_sas(txn, timeout=T)
    await b.wait_sas(txn, timeout=T)
    await b.mismatch_sas(txn, timeout=T)

    ev = await a.wait_event("verification_cancelled", lambda e: e["transaction_id"] == txn, T)
    assert ev["code"] == "m.mismatched_sas"
    await b.wait_phase(txn, "cancelled", timeout=T)
    await _assert_not_verified(a, *pair.b_dev)
    await _assert_not_verified(b, *pair.a_dev)


async def test_to_device_plain_and_encrypted(pair: Pair) -> None:
    a, b = pair.a, pair.b
    await a.send_to_device("org.example.plain", *pair.b_dev, {"n": 1})
    plain = await b.wait_event("to_device", lambda e: e["type"] == "org.example.plain", T)
    assert plain["content"] == {"n": 1}
    assert plain["sender"] == a.user_id
    assert not plain["encrypted"]

    sent = await a.send_encrypted_to_device("org.example.secret", *pair.b_dev, {"n": 2})
    assert sent["event_type"] == "m.room.encrypted"
    enc = await b.wait_event("to_device", lambda e: e["type"] == "org.example.secret", T)
    assert enc["encrypted"]
    assert enc["content"]["n"] == 2
    assert enc["sender"] == a.user_id


async def test_request_from_untracked_device_is_ignored_until_download_keys(
    strangers: Pair,
) -> None:
    """The pitfall from docs/protocol-notes.md, and download_keys as its remedy (no shared room)."""
    a, b = strangers.a, strangers.b
    assert a.user_id and a.device_id and b.user_id and b.device_id
    await a.download_keys(*strangers.b_dev, timeout=T)  # A must know B's device to ask at all
    await b.auto_accept(confirm=True, user_id=a.user_id)

    ignored = (await a.request_verification(*strangers.b_dev, timeout=T))["transaction_id"]
    # B gets the to-device event but raises no verification request for it.
    await b.wait_event(
        "to_device",
        lambda e: (
            e["type"] == "m.key.verification.request"
            and e["content"].get("transaction_id") == ignored
        ),
        T,
    )
    with pytest.raises(JsPeerTimeout):
        await b.wait_event("verification_request", timeout=3)
    await a.cancel(ignored)

    devices = await b.download_keys(*strangers.a_dev, timeout=T)
    assert a.device_id in [d["device_id"] for d in devices]
    txn = (await a.request_verification(*strangers.b_dev, timeout=T))["transaction_id"]
    await b.wait_event("verification_request", lambda e: e["transaction_id"] == txn, T)
    await a.wait_phase(txn, "ready", timeout=T)
    await a.start_sas(txn, timeout=T)
    await a.confirm_sas(txn, timeout=T)
    await a.wait_phase(txn, "done", timeout=T)
    await _assert_verified(a, *strangers.b_dev)
    await _assert_verified(b, *strangers.a_dev)


async def test_auto_accept_that_also_starts_sas(pair: Pair) -> None:
    """auto_accept(start=True): the receiving peer accepts, sends the SAS start and confirms."""
    a, b = pair.a, pair.b
    await b.auto_accept(start=True, confirm=True, user_id=a.user_id, device_id=a.device_id)
    txn = (await a.request_verification(*pair.b_dev, timeout=T))["transaction_id"]
    started = await a.wait_event(
        "to_device",
        lambda e: (
            e["type"] == "m.key.verification.start" and e["content"].get("transaction_id") == txn
        ),
        T,
    )
    assert started["content"]["from_device"] == b.device_id
    await a.confirm_sas(txn, timeout=T)
    await a.wait_phase(txn, "done", timeout=T)
    await b.wait_event("verification_done", lambda e: e["transaction_id"] == txn, T)
    await _assert_verified(a, *pair.b_dev)
    await _assert_verified(b, *pair.a_dev)
