"""m.no_olm against the real Synapse: a hand-made peer device and a real nio bot.

The peer (:class:`tests.raw_device.RawDevice`) has identity keys but no one-time keys and no
fallback key, so the bot cannot open an Olm session with it. Its real ``/sync`` is what the
assertions count. The bot is a nio ``AsyncClient`` with the whole bot_toolkit stack (store,
outbox over HTTP, dispatcher, nio plugin, key sharing) and can be stopped and started again on
the same data directory, as a process restart would.

The claim backoff runs on an injected clock: the tests move it forward so that the bot claims
again on the next message, instead of sleeping 15 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.withheld import PeerDevice
from tests.bot_process import NO_OLM, BotProcess, room_with
from tests.raw_device import RawDevice
from tests.synapse import LocalSynapse

pytestmark = pytest.mark.synapse


@pytest.fixture
async def bot(synapse: LocalSynapse, tmp_path: Path) -> AsyncIterator[BotProcess]:
    process = await BotProcess(synapse, synapse.register(), tmp_path / "bot").start()
    try:
        yield process
    finally:
        await process.stop()


@pytest.fixture
async def peer(synapse: LocalSynapse) -> AsyncIterator[RawDevice]:
    # identity keys only: no one-time keys, no fallback key
    device = await RawDevice.registered(synapse)
    try:
        yield device
    finally:
        await device.close()


def _peer_device(peer: RawDevice) -> PeerDevice:
    return PeerDevice(peer.user_id, peer.device_id, peer.curve25519)


def _no_olm(peer: RawDevice, bot: BotProcess) -> list[dict[str, Any]]:
    return peer.withheld(NO_OLM, sender=bot.user.user_id)


async def test_no_olm_lifecycle_against_a_real_homeserver(bot: BotProcess, peer: RawDevice) -> None:
    assert await peer.one_time_key_counts() == {"signed_curve25519": 0}
    room_id = await room_with(bot, peer)

    # 1. Three messages; the backoff has passed before each, so every one claims again.
    for i in range(3):
        await bot.say(room_id, f"hello {i}")
        bot.clock.advance(16 * 60)
    await peer.drain()
    notices = _no_olm(peer, bot)
    assert len(notices) == 1, peer.to_device_events
    content = notices[0]["content"]
    assert content["code"] == "m.no_olm"
    assert "room_id" not in content and "session_id" not in content
    assert content["algorithm"] == "m.megolm.v1.aes-sha2"
    assert content["sender_key"] == bot.client.olm.account.identity_keys["curve25519"]
    assert content["from_device"] == bot.user.device_id
    assert (bot.sent(), bot.suppressed()) == (1, 2)

    # 2. A restart keeps the ledger: the next failure stays silent.
    await bot.restart()
    await bot.say(room_id, "after restart")
    await peer.drain()
    assert len(_no_olm(peer, bot)) == 1
    assert (bot.sent(), bot.suppressed()) == (0, 1)

    # 3. The peer uploads one one-time key; the bot's next message opens a session and the
    #    peer gets the room key (nio alone would never offer it the shared session again).
    await peer.upload_keys(device_keys=False, one_time_keys=1)
    bot.clock.advance(16 * 60)
    await bot.say(room_id, "now you can read this")
    await peer.drain()
    payloads = [
        p
        for e in peer.to_device_events
        if e["type"] == "m.room.encrypted" and (p := peer.decrypt_olm(e)) is not None
    ]
    assert [p["type"] for p in payloads] == ["m.room_key"]
    assert payloads[0]["content"]["room_id"] == room_id
    assert await peer.one_time_key_counts() == {"signed_curve25519": 0}
    entry = await bot.sharing.ledger.entry(
        _peer_device(peer)  # the ledger saw the session
    )
    assert entry is not None and entry.session_since_notice

    # 4. The bot's session is discarded (as when a wedged session is replaced) and the device
    #    has no one-time key left: exactly one more notice, then silence again.
    bot.discard_session(peer.curve25519)
    bot.client.invalidate_outbound_session(room_id)
    await bot.say(room_id, "new session needed")
    bot.clock.advance(16 * 60)
    bot.client.invalidate_outbound_session(room_id)
    await bot.say(room_id, "and again")
    await peer.drain()
    assert len(_no_olm(peer, bot)) == 2
    assert bot.sent() == 1

    # 5. The same device id comes back with a new identity key and no keys: one notice for it.
    old_key = peer.curve25519
    new_key = await peer.replace_identity_key()
    assert new_key != old_key

    def sees_new_key() -> bool:
        device = bot.client.olm.device_store[peer.user_id].get(peer.device_id)
        return device is not None and device.curve25519 == new_key

    deadline = asyncio.get_running_loop().time() + 30
    while not sees_new_key():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError("the bot never saw the new identity key")
        await bot.refresh(poll_ms=200)
    bot.clock.advance(16 * 60)
    await bot.say(room_id, "who are you now")
    bot.clock.advance(16 * 60)
    bot.client.invalidate_outbound_session(room_id)
    await bot.say(room_id, "still nobody")
    await peer.drain()
    assert len(_no_olm(peer, bot)) == 3
    assert bot.sent() == 2
    rendered = bot.metrics.render()
    assert 'bot_toolkit_withheld_sent_total{code="m.no_olm"} 2' in rendered
    assert 'bot_toolkit_withheld_suppressed_total{code="m.no_olm"}' in rendered


async def test_claims_back_off_between_messages(bot: BotProcess, peer: RawDevice) -> None:
    room_id = await room_with(bot, peer)
    claims: list[dict[str, Any]] = []
    original = bot.client.keys_claim

    async def counting(user_set: dict[str, Any]) -> Any:
        claims.append(user_set)
        return await original(user_set)

    bot.client.keys_claim = counting
    for i in range(4):
        await bot.say(room_id, f"quick {i}")  # within 15 s of the first failure
    assert len(claims) == 1
    bot.clock.advance(15)
    await bot.say(room_id, "after 15s")
    assert len(claims) == 2
    bot.clock.advance(29)
    await bot.say(room_id, "after 29s more")
    assert len(claims) == 2  # the second wait is 30 s
    bot.clock.advance(1)
    await bot.say(room_id, "after 30s")
    assert len(claims) == 3
    await peer.drain()
    assert len(_no_olm(peer, bot)) == 1


async def test_crash_after_the_decision_sends_the_notice_once_after_restart(
    bot: BotProcess, peer: RawDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    room_id = await room_with(bot, peer)

    async def dies_before_the_outbox(device: PeerDevice, txn_id: str) -> bool:
        return False  # the process dies here: decided and recorded, never handed over

    monkeypatch.setattr(bot.sharing, "_deliver_no_olm", dies_before_the_outbox)
    await bot.say(room_id, "one")
    [(device, txn_id)] = await bot.sharing.ledger.pending()
    assert device == _peer_device(peer)
    await peer.drain()
    assert _no_olm(peer, bot) == []

    await bot.restart()  # recovery hands the recorded notice to the outbox
    assert await bot.outbox.flush(10.0)
    assert await bot.sharing.ledger.pending() == []
    entry = await bot.sharing.ledger.entry(_peer_device(peer))
    assert entry is not None and (entry.txn_id, entry.notices) == (txn_id, 1)
    bot.clock.advance(16 * 60)
    await bot.say(room_id, "two")
    await peer.drain()
    assert len(_no_olm(peer, bot)) == 1
    assert (bot.sent(), bot.suppressed()) == (1, 1)


async def test_crash_after_the_outbox_stored_the_notice_sends_no_second_one(
    bot: BotProcess, peer: RawDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    room_id = await room_with(bot, peer)

    async def dies_before_marking(device: PeerDevice, txn_id: str) -> None:
        raise RuntimeError("process killed")

    monkeypatch.setattr(bot.sharing.ledger, "mark_sent", dies_before_marking)
    await bot.say(room_id, "one")
    monkeypatch.undo()
    await bot.restart()
    assert await bot.outbox.flush(10.0)
    await peer.drain()
    assert len(_no_olm(peer, bot)) == 1
