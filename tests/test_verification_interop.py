"""The bot (nio + bot_toolkit's VerificationManager) verifies with matrix-js-sdk's Rust crypto.

The js peer (tests/interop/peer.mjs, the crypto engine inside Element) and the bot share no
room: the bot holds the peer's request while it downloads the peer's keys, and the peer is told
to download the bot's keys first (it ignores requests from devices it has not downloaded).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot_toolkit.verification import (
    SasReady,
    VerificationCancelled,
    VerificationDone,
    VerificationPolicy,
)
from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.nio_helpers import stored_trust
from tests.synapse import LocalSynapse
from tests.verification_helpers import Bot, eventually, running_bot

pytestmark = [pytest.mark.interop, pytest.mark.synapse, pytest.mark.timeout(240)]

T = 60.0


@pytest.fixture
async def peer(synapse: LocalSynapse) -> AsyncIterator[JsPeer]:
    require_node_peer()
    p = await started_peer(synapse, "js-verifier", timeout=T)
    try:
        yield p
    finally:
        await p.close()


def _peer_dev(peer: JsPeer) -> tuple[str, str]:
    assert peer.user_id and peer.device_id
    return peer.user_id, peer.device_id


async def _assert_bot_trusts(bot: Bot, user_id: str, device_id: str) -> None:
    device = bot.client.device_store[user_id][device_id]
    assert device.verified


def _reopened_verified(bot_info: dict[str, Any], user_id: str, device_id: str) -> bool:
    (verified,) = stored_trust(
        bot_info["url"],
        bot_info["user_id"],
        bot_info["device_id"],
        bot_info["token"],
        bot_info["store_path"],
        devices=[(user_id, device_id)],
    )
    return verified


def _bot_info(bot: Bot, synapse: LocalSynapse) -> dict[str, Any]:
    return {
        "url": synapse.url,
        "user_id": bot.user_id,
        "device_id": bot.device_id,
        "token": bot.client.access_token,
        "store_path": bot.client.store_path,
    }


async def test_peer_requests_bot_verification(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer
) -> None:
    async with running_bot(synapse, tmp_path) as bot:
        await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
        txn = (await peer.request_verification(bot.user_id, bot.device_id, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        await peer.start_sas(txn, timeout=T)
        sas = (await peer.wait_sas(txn, timeout=T))["sas"]
        await eventually(lambda: bool(bot.of(SasReady)), within=T)
        ours = bot.of(SasReady)[0]
        assert ours.transaction_id == txn
        assert [e[0] for e in ours.emoji] == [e[0] for e in sas["emoji"]]
        assert list(ours.decimals or ()) == list(sas["decimal"])
        await peer.confirm_sas(txn, timeout=T)
        await peer.wait_phase(txn, "done", timeout=T)
        await eventually(lambda: bool(bot.of(VerificationDone)), within=T)
        done = bot.of(VerificationDone)[0]
        assert (done.user_id, done.device_id) == _peer_dev(peer)
        status = await peer.device_status(bot.user_id, bot.device_id)
        assert status["verified"] and status["locally_verified"], status
        await _assert_bot_trusts(bot, *_peer_dev(peer))
        assert not bot.of(VerificationCancelled)
        info = _bot_info(bot, synapse)
    # The trust survives a restart: nio's store on disk says so.
    assert _reopened_verified(info, *_peer_dev(peer))


async def test_bot_requests_peer_verification(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer
) -> None:
    async with running_bot(synapse, tmp_path) as bot:
        await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
        await peer.auto_accept(confirm=True, user_id=bot.user_id)
        txn = await bot.manager.request_verification(*_peer_dev(peer))
        result = await bot.manager.wait_finished(txn, T)
        assert isinstance(result, VerificationDone), result
        await peer.wait_event("verification_done", lambda e: e["transaction_id"] == txn, T)
        status = await peer.device_status(bot.user_id, bot.device_id)
        assert status["verified"] and status["locally_verified"], status
        await _assert_bot_trusts(bot, *_peer_dev(peer))
        info = _bot_info(bot, synapse)
    assert _reopened_verified(info, *_peer_dev(peer))


async def test_peer_cancels_midway_no_reply(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer
) -> None:
    operator = VerificationPolicy(allowed_users=["@*:*"], confirm=None)
    async with running_bot(synapse, tmp_path, policy=operator) as bot:
        await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
        txn = (await peer.request_verification(bot.user_id, bot.device_id, timeout=T))[
            "transaction_id"
        ]
        await peer.wait_phase(txn, "ready", timeout=T)
        await peer.start_sas(txn, timeout=T)
        await peer.wait_sas(txn, timeout=T)
        await eventually(lambda: bool(bot.of(SasReady)), within=T)
        await peer.cancel(txn)
        await eventually(lambda: bool(bot.of(VerificationCancelled)), within=T)
        cancelled = bot.of(VerificationCancelled)[0]
        assert cancelled.transaction_id == txn
        assert not cancelled.by_us and cancelled.code == "m.user"
        # No reply: once the bot is idle, a marker it sends afterwards reaches the peer, and
        # the outbox keeps per-device order, so a reply would have arrived before the marker.
        assert await bot.dispatcher.join(timeout=T)
        peer_user, peer_device = _peer_dev(peer)
        await bot.outbox.send("org.example.marker", {peer_user: {peer_device: {"n": 1}}})
        assert await bot.outbox.flush(T)
        await peer.wait_event(
            "to_device",
            lambda e: e["type"] == "org.example.marker" and e["sender"] == bot.user_id,
            T,
        )
        from_bot = [
            e
            for e in peer.events
            if e.get("event") == "to_device"
            and e.get("type") == "m.key.verification.cancel"
            and e.get("sender") == bot.user_id
        ]
        assert from_bot == []
        assert bot.manager.list_in_progress() == []
        status = await peer.device_status(bot.user_id, bot.device_id)
        assert not status["verified"]
        assert not bot.client.device_store[peer.user_id][peer.device_id].verified
