"""In-room user verification between the bot and matrix-js-sdk's Rust crypto (Element's engine).

The peer verifies the bot as Element does: in a DM, ``requestVerificationDM``, every later step a
room event relating to the request. Both sides have a cross-signing identity (the bot's from
``bot_toolkit.identity``, the peer's from ``bootstrapCrossSigning``), so the MACs cover the master
keys and each side ends up signing the other's: the peer reports the bot cross-signing verified,
and the peer's master key carries the bot's user-signing signature on the server. The same runs
in an unencrypted DM (as Element Web sends them) and in an encrypted one (as Element X does), and
with the bot starting the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nio import RoomMessageText

from bot_toolkit.identity import Identity, identity_for
from bot_toolkit.verification import (
    SasReady,
    UserIdentityChanged,
    VerificationCancelled,
    VerificationDone,
)
from bot_toolkit.withheld import ShareWith, SharingPolicy
from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.synapse import LocalSynapse
from tests.verification_helpers import Bot, eventually, running_bot

pytestmark = [pytest.mark.interop, pytest.mark.synapse, pytest.mark.timeout(300)]

T = 60.0


@pytest.fixture
async def peer(synapse: LocalSynapse) -> AsyncIterator[JsPeer]:
    require_node_peer()
    p = await started_peer(synapse, "js-dm-verifier", timeout=T)
    try:
        await p.bootstrap_cross_signing()
        yield p
    finally:
        await p.close()


async def with_identity(bot: Bot, tmp_path: Path) -> Identity:
    """The bot's cross-signing identity, bootstrapped, and user trust switched on."""
    (tmp_path / "identity").mkdir(mode=0o700, exist_ok=True)
    identity = identity_for(bot.client, tmp_path / "identity")
    await identity.ensure()
    assert identity.master_key is not None
    await bot.manager.enable_user_trust(identity, identity.api.query_keys)
    return identity


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
    await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
    return room_id


async def signed_by_bot(identity: Identity, bot: Bot, user_id: str) -> bool:
    """Whether ``user_id``'s published master key carries a signature of the bot's user."""
    body = await identity.api.query_keys([user_id])
    master: Any = body.get("master_keys", {}).get(user_id, {})
    return bool(master.get("signatures", {}).get(bot.user_id))


async def assert_mutually_verified(peer: JsPeer, bot: Bot, identity: Identity) -> None:
    assert peer.user_id is not None
    trust = bot.manager.user_trust
    assert trust is not None
    await eventually(lambda: trust.is_verified(str(peer.user_id)), within=T)
    assert await signed_by_bot(identity, bot, peer.user_id)
    deadline = asyncio.get_running_loop().time() + T
    while True:  # the peer downloads our signature of its key and the bot's identity
        status = await peer.user_verification_status(bot.user_id)
        if status["cross_signing_verified"] or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status["cross_signing_verified"] is True, status


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext_dm", "encrypted_dm"])
async def test_peer_requests_in_dm(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer, encrypted: bool
) -> None:
    async with running_bot(synapse, tmp_path) as bot:
        identity = await with_identity(bot, tmp_path)
        room_id = await shared_dm(peer, bot, encrypted=encrypted)
        req = await peer.request_verification_dm(bot.user_id, room_id, timeout=T)
        flow = req["transaction_id"]
        assert flow.startswith("$")  # the flow id is the request's event id
        await peer.wait_phase(flow, "ready", timeout=T)
        await peer.start_sas(flow, timeout=T)
        sas = (await peer.wait_sas(flow, timeout=T))["sas"]
        await eventually(lambda: bool(bot.of(SasReady)), within=T)
        ours = bot.of(SasReady)[0]
        assert (ours.transaction_id, ours.room_id) == (flow, room_id)
        assert [e[0] for e in ours.emoji] == [e[0] for e in sas["emoji"]]
        assert list(ours.decimals or ()) == list(sas["decimal"])
        await peer.confirm_sas(flow, timeout=T)
        await peer.wait_phase(flow, "done", timeout=T)
        await eventually(lambda: bool(bot.of(VerificationDone)), within=T)
        done = bot.of(VerificationDone)[0]
        assert (done.transaction_id, done.room_id, done.user_id) == (flow, room_id, peer.user_id)
        assert len(done.verified_keys) == 2  # the device key and the master key
        assert not bot.of(VerificationCancelled)
        assert bot.manager.list_in_progress() == []
        await assert_mutually_verified(peer, bot, identity)


async def test_encrypted_dm_with_share_with_verified(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer
) -> None:
    """Under ``share_with = "verified"`` the peer's unverified device gets no room key, so the
    bot's verification events go out in plaintext in the encrypted DM (the spec's alternative);
    the peer's encrypted ones are read as usual."""
    policy = SharingPolicy(share_with=ShareWith.VERIFIED)
    async with running_bot(synapse, tmp_path, key_sharing=policy) as bot:
        identity = await with_identity(bot, tmp_path)
        room_id = await shared_dm(peer, bot, encrypted=True)
        req = await peer.request_verification_dm(bot.user_id, room_id, timeout=T)
        flow = req["transaction_id"]
        await peer.wait_phase(flow, "ready", timeout=T)
        await peer.start_sas(flow, timeout=T)
        await peer.confirm_sas(flow, timeout=T)
        await peer.wait_phase(flow, "done", timeout=T)
        result = await bot.manager.wait_finished(flow, T)
        assert isinstance(result, VerificationDone), result
        await assert_mutually_verified(peer, bot, identity)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext_dm", "encrypted_dm"])
async def test_bot_requests_in_dm(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer, encrypted: bool
) -> None:
    async with running_bot(synapse, tmp_path) as bot:
        identity = await with_identity(bot, tmp_path)
        room_id = await shared_dm(peer, bot, encrypted=encrypted)
        await peer.auto_accept(confirm=True, user_id=bot.user_id)
        assert peer.user_id is not None
        flow = await bot.manager.request_user_verification(peer.user_id, room_id)
        result = await bot.manager.wait_finished(flow, T)
        assert isinstance(result, VerificationDone), result
        assert (result.room_id, result.user_id) == (room_id, peer.user_id)
        await peer.wait_event("verification_done", lambda e: e["transaction_id"] == flow, T)
        await assert_mutually_verified(peer, bot, identity)


async def test_second_device_cross_signed_by_a_verified_user_is_trusted(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    require_node_peer()
    user = await asyncio.to_thread(synapse.register)
    peer = await started_peer(synapse, "js-dm-first", user=user, timeout=T)
    second: JsPeer | None = None
    try:
        await peer.bootstrap_cross_signing()
        policy = SharingPolicy(share_with=ShareWith.VERIFIED)
        async with running_bot(synapse, tmp_path, key_sharing=policy) as bot:
            identity = await with_identity(bot, tmp_path)
            room_id = await shared_dm(peer, bot, encrypted=True)
            await peer.auto_accept(confirm=True, user_id=bot.user_id)
            flow = await bot.manager.request_user_verification(user.user_id, room_id)
            assert isinstance(await bot.manager.wait_finished(flow, T), VerificationDone)
            await assert_mutually_verified(peer, bot, identity)
            # A second device of the same user, which the first one cross-signs: the bot trusts
            # it without a SAS of its own (it is what share_with = "verified" looks at).
            second_login = await asyncio.to_thread(synapse.login, user.user_id, user.password)
            second = await started_peer(synapse, "js-dm-second", user=second_login, timeout=T)
            dev2 = second_login.device_id
            await peer.download_keys(user.user_id, dev2, timeout=T)
            await peer.cross_sign_device(dev2, timeout=T)

            def trusted() -> bool:
                devices = bot.client.device_store[user.user_id]
                return dev2 in devices and bool(devices[dev2].verified)

            await eventually(trusted, within=T)
            assert not bot.client.device_store[user.user_id][dev2].blacklisted
            # And it gets the room key under share_with = "verified": it reads what the bot says.
            await bot.client.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "for every device"}
            )
            got = await second.wait_event(
                "room_event",
                lambda e: e.get("room_id") == room_id and e.get("body") == "for every device",
                timeout=T,
            )
            assert got["encrypted"] is True and got["decryption_failure"] is None
    finally:
        if second is not None:
            await second.close()
        await peer.close()


async def test_identity_change_of_a_verified_user_is_noticed(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    require_node_peer()
    user = await asyncio.to_thread(synapse.register)
    peer = await started_peer(synapse, "js-dm-resetter", user=user, timeout=T)
    try:
        await peer.bootstrap_cross_signing()
        async with running_bot(synapse, tmp_path) as bot:
            identity = await with_identity(bot, tmp_path)
            changes: list[UserIdentityChanged] = []

            async def record(event: UserIdentityChanged) -> None:
                changes.append(event)

            bot.dispatcher.register(UserIdentityChanged, record)
            room_id = await shared_dm(peer, bot, encrypted=True)
            await peer.auto_accept(confirm=True, user_id=bot.user_id)
            flow = await bot.manager.request_user_verification(user.user_id, room_id)
            assert isinstance(await bot.manager.wait_finished(flow, T), VerificationDone)
            await assert_mutually_verified(peer, bot, identity)
            trust = bot.manager.user_trust
            assert trust is not None
            old = trust.master_key_of(user.user_id)
            # The user resets their cross-signing identity (as "Reset" in Element does; the
            # password answers the server's interactive auth).
            await peer.bootstrap_cross_signing(password=user.password, reset=True)
            await eventually(lambda: bool(changes), within=T)
            assert changes[0].user_id == user.user_id and changes[0].old_master_key == old
            assert changes[0].new_master_key not in (None, old)
            assert not trust.is_verified(user.user_id)
            assert bot.metrics.get("user_identity_changes_total").get() == 1  # type: ignore[union-attr]
            assert not bot.client.device_store[user.user_id][peer.device_id].verified
    finally:
        await peer.close()


async def test_hostile_room_events_on_the_wire(synapse: LocalSynapse, tmp_path: Path) -> None:
    """On a real room: a third member's events pointing at the flow and a relation to an
    unknown event get silence and change nothing (the flow completes); a malformed start from
    the peer gets m.invalid_message; the peer's cancel after that is not answered."""
    require_node_peer()
    peer = await started_peer(synapse, "js-dm-peer", timeout=T)
    carol = await started_peer(synapse, "js-dm-carol", timeout=T)
    try:
        await peer.bootstrap_cross_signing()
        assert carol.user_id is not None
        async with running_bot(synapse, tmp_path) as bot:
            await with_identity(bot, tmp_path)
            room_id = await shared_dm(peer, bot, encrypted=False)
            await peer.invite(room_id, carol.user_id)
            await carol.join(room_id, timeout=T)
            await eventually(lambda: carol.user_id in bot.client.rooms[room_id].users, within=T)

            flow = (await peer.request_verification_dm(bot.user_id, room_id, timeout=T))[
                "transaction_id"
            ]
            await peer.wait_phase(flow, "ready", timeout=T)
            ref = {"m.relates_to": {"rel_type": "m.reference", "event_id": flow}}
            await carol.send_room_event(
                room_id, "m.key.verification.cancel", {"code": "m.user", "reason": "x", **ref}
            )
            await carol.send_room_event(room_id, "m.key.verification.key", {"key": "AAAA", **ref})
            # Synapse refuses relations to events it does not have: relate to a plain message.
            text = await carol.send_room_event(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "no flow"}
            )
            unknown = {"m.relates_to": {"rel_type": "m.reference", "event_id": text}}
            await peer.send_room_event(
                room_id,
                "m.key.verification.ready",
                {"from_device": peer.device_id, "methods": ["m.sas.v1"], **unknown},
            )
            await peer.start_sas(flow, timeout=T)
            await peer.confirm_sas(flow, timeout=T)
            await peer.wait_phase(flow, "done", timeout=T)
            assert isinstance(await bot.manager.wait_finished(flow, T), VerificationDone)
            assert not bot.of(VerificationCancelled)

            # A malformed start (no hashes) in a second flow: m.invalid_message.
            flow2 = (await peer.request_verification_dm(bot.user_id, room_id, timeout=T))[
                "transaction_id"
            ]
            await peer.wait_phase(flow2, "ready", timeout=T)
            start = {
                "from_device": peer.device_id,
                "method": "m.sas.v1",
                "key_agreement_protocols": ["curve25519-hkdf-sha256"],
                "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
                "short_authentication_string": ["decimal", "emoji"],
                "m.relates_to": {"rel_type": "m.reference", "event_id": flow2},
            }
            await peer.send_room_event(room_id, "m.key.verification.start", start)
            cancelled = await bot.manager.wait_finished(flow2, T)
            assert isinstance(cancelled, VerificationCancelled)
            assert (cancelled.code, cancelled.by_us) == ("m.invalid_message", True)
            # The peer's cancel now is never answered: the bot sends exactly one cancel.
            await peer.send_room_event(
                room_id,
                "m.key.verification.cancel",
                {"code": "m.user", "reason": "late", "m.relates_to": start["m.relates_to"]},
            )
            # Once the bot has synced past a marker sent after that cancel and is idle, a message
            # of its own comes after anything it would have answered (one timeline order).
            seen: list[str] = []

            async def on_text(_room: Any, event: Any) -> None:
                seen.append(getattr(event, "body", ""))

            bot.client.add_event_callback(on_text, RoomMessageText)
            await peer.send_room_event(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "marker"}
            )
            await eventually(lambda: "marker" in seen, within=T)
            assert await bot.dispatcher.join(timeout=T)
            await bot.client.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "end"}
            )
            await carol.wait_event(
                "room_event",
                lambda e: e.get("room_id") == room_id and e.get("body") == "end",
                timeout=T,
            )
            bot_cancels = [
                e
                for e in carol.events
                if e.get("event") == "room_event"
                and e.get("sender") == bot.user_id
                and e.get("type") == "m.key.verification.cancel"
            ]
            assert len(bot_cancels) == 1
    finally:
        await carol.close()
        await peer.close()


async def test_bot_creates_the_dm_and_requests(
    synapse: LocalSynapse, tmp_path: Path, peer: JsPeer
) -> None:
    """No shared room yet: the bot creates an encrypted DM, invites the user and requests there;
    the user joins and accepts."""
    async with running_bot(synapse, tmp_path) as bot:
        identity = await with_identity(bot, tmp_path)
        assert peer.user_id is not None and peer.device_id is not None
        await peer.download_keys(bot.user_id, bot.device_id, timeout=T)
        await peer.auto_accept(confirm=True, user_id=bot.user_id)
        flow = await bot.manager.request_user_verification(peer.user_id)
        (info,) = bot.manager.list_in_progress()
        assert info.id == flow and info.room_id is not None
        room = bot.client.rooms[info.room_id]
        assert room.encrypted and peer.user_id in room.invited_users
        await peer.join(info.room_id, timeout=T)
        result = await bot.manager.wait_finished(flow, T)
        assert isinstance(result, VerificationDone), result
        await assert_mutually_verified(peer, bot, identity)
        # Asked again, the bot reuses that DM.
        assert await bot.manager.rooms.direct_room(peer.user_id) == info.room_id  # type: ignore[union-attr]
