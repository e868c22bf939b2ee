"""In-room user verification between the bot and matrix-js-sdk's Rust crypto (Element's engine).

The peer verifies the bot as Element does: in a DM, ``requestVerificationDM``, every later step a
room event relating to the request. The same runs in an unencrypted DM (as Element Web sends
them) and in an encrypted one (as Element X does), and with the bot starting the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot_toolkit.verification import VerificationDone
from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.synapse import LocalSynapse
from tests.verification_helpers import Bot, eventually, running_bot

pytestmark = [pytest.mark.interop, pytest.mark.synapse, pytest.mark.timeout(240)]

T = 60.0


@pytest.fixture
async def peer(synapse: LocalSynapse) -> AsyncIterator[JsPeer]:
    require_node_peer()
    p = await started_peer(synapse, "js-dm-verifier", timeout=T)
    try:
        yield p
    finally:
        await p.close()


async def shared_dm(peer: JsPeer, bot: Bot, *, encrypted: bool) -> str:
    """A DM the peer creates and the bot joins; both sides know each other's devices."""
    room_id = await peer.create_room([bot.user_id], encrypted=encrypted)
    await eventually(lambda: room_id in bot.client.invited_rooms, within=T)
    await bot.client.join(room_id)
    await peer.wait_membership(room_id, bot.user_id, timeout=T)
    await eventually(
        lambda: room_id in bot.client.rooms and bot.client.rooms[room_id].encrypted == encrypted,
        within=T,
    )
    assert peer.user_id is not None
    await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
    return room_id


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext_dm", "encrypted_dm"])
async def test_bot_requests_in_dm(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer, encrypted: bool
) -> None:
    async with running_bot(synapse, tmp_path) as bot:
        room_id = await shared_dm(peer, bot, encrypted=encrypted)
        await peer.auto_accept(confirm=True, user_id=bot.user_id)
        assert peer.user_id is not None
        flow = await bot.manager.request_user_verification(peer.user_id, room_id)
        result = await bot.manager.wait_finished(flow, T)
        assert isinstance(result, VerificationDone), result
        assert (result.room_id, result.user_id) == (room_id, peer.user_id)
        await peer.wait_event("verification_done", lambda e: e["transaction_id"] == flow, T)
