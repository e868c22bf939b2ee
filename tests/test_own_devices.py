"""A new device on the bot's own account gets no verification and no key unless opted in.

Against the real Synapse. The bot is the production wiring (:func:`running_bot`: nio, the
plugin, outbox, verification with ``allowed_users = ["@*:*"]`` and automatic confirmation, key
sharing), the riskiest configuration: ``allowed_users`` matches the bot's own user. Someone who
knows the bot's password logs in a new device (a real nio client running bot_toolkit's own
verification manager), asks the bot to verify it, then asks for the Megolm session of a message
the bot sent. Without ``own_devices`` the verification is refused (``m.user``), the key request
gets ``m.unauthorised``, no forwarded key leaves the bot, and the bot's next message to the room
gives the device ``m.unauthorised`` instead of the room key; with the device named in
``own_devices`` all three go through (the positive control: the same steps do deliver keys).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from nio import JoinResponse, RoomCreateResponse, RoomSendResponse

from bot_toolkit.events import ForwardedRoomKey, RoomKey, RoomKeyWithheld
from bot_toolkit.verification import VerificationCancelled, VerificationDone, VerificationPolicy
from bot_toolkit.withheld import ShareWith, SharingPolicy
from tests.nio_helpers import (
    close_clients,
    know_each_other,
    make_client,
    send_plaintext,
    wait_until,
)
from tests.synapse import LocalSynapse
from tests.test_verification_encrypted import running_peer
from tests.verification_helpers import auto_confirm, running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(180)]

T = 30.0
NEW_DEVICE = "NEWDEVICE"
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


@pytest.mark.parametrize("opted_in", [False, True], ids=["not-named", "named"])
async def test_new_device_on_the_bots_account(
    synapse: LocalSynapse, tmp_path: Path, opted_in: bool
) -> None:
    bot_user = await asyncio.to_thread(synapse.register)
    own = (NEW_DEVICE,) if opted_in else ()
    policy = VerificationPolicy(allowed_users=["@*:*"], confirm=auto_confirm(), own_devices=own)
    # share_with="all": without the own-device rule, an unverified device would get room keys.
    sharing = SharingPolicy(share_with=ShareWith.ALL, own_devices=frozenset(own))
    friend = await make_client(synapse, tmp_path)
    try:
        async with running_bot(
            synapse, tmp_path, policy=policy, user=bot_user, key_sharing=sharing
        ) as bot:
            # The bot holds a Megolm session: its own, from a message it sends to a room.
            created = await bot.client.room_create(
                invite=[friend.user_id], initial_state=[ENCRYPTION]
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            assert isinstance(await friend.join(room_id), JoinResponse)
            await wait_until(
                lambda: friend.user_id in getattr(bot.client.rooms.get(room_id), "users", {}),
                within=T,
                what="the bot sees the friend join",
            )
            sent = await bot.client.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "secret"}
            )
            assert isinstance(sent, RoomSendResponse), sent
            session_id = bot.client.olm.outbound_group_sessions[room_id].id

            # Someone with the bot's password logs in a new device.
            login = await asyncio.to_thread(
                synapse.login, bot_user.user_id, bot_user.password, NEW_DEVICE
            )
            intruder = await make_client(synapse, tmp_path, login)
            try:
                await know_each_other(bot.client, intruder)
                peer_policy = VerificationPolicy(
                    allowed_users=[bot.user_id],
                    confirm=auto_confirm(),
                    own_devices=(bot.device_id,),
                )
                async with running_peer(intruder, peer_policy, tmp_path / "peer") as peer:
                    await _verify_then_request(bot, peer, intruder, room_id, session_id, opted_in)
                    await _next_message(bot, peer, room_id, opted_in)
            finally:
                await close_clients(intruder)
    finally:
        await close_clients(friend)


async def _verify_then_request(  # noqa: PLR0917
    bot: Any, peer: Any, intruder: Any, room_id: str, session_id: str, opted_in: bool
) -> None:
    txn = await peer.manager.request_verification(bot.user_id, bot.device_id)
    outcome = await peer.manager.wait_finished(txn, T)
    trusted = bot.client.device_store[bot.user_id][NEW_DEVICE].verified
    if opted_in:
        assert isinstance(outcome, VerificationDone), outcome
        assert trusted
    else:
        assert isinstance(outcome, VerificationCancelled), outcome
        assert outcome.code == "m.user"
        assert not trusted
        assert bot.of(VerificationDone) == []

    request = {
        "action": "request",
        "body": {
            "algorithm": "m.megolm.v1.aes-sha2",
            "room_id": room_id,
            "session_id": session_id,
            "sender_key": bot.client.olm.account.identity_keys["curve25519"],
        },
        "requesting_device_id": NEW_DEVICE,
        "request_id": "steal-it",
    }
    await send_plaintext(intruder, bot.user_id, bot.device_id, "m.room_key_request", request)

    def forwarded() -> list[ForwardedRoomKey]:
        return [
            e for e in peer.seen if isinstance(e, ForwardedRoomKey) and e.session_id == session_id
        ]

    def refused() -> list[RoomKeyWithheld]:
        return [
            e for e in peer.seen if isinstance(e, RoomKeyWithheld) and e.session_id == session_id
        ]

    # nio looks at queued key requests after a sync that brought something: nudge it until
    # the answer arrives (bounded).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    n = 0
    while not (forwarded() or refused()):
        assert loop.time() < deadline, "no answer to the key request"
        n += 1
        await send_plaintext(intruder, bot.user_id, bot.device_id, "org.example.ping", {"n": n})
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: bool(forwarded() or refused()), within=1.0)
    kept = bot.metrics.get("nio_kept_from_nio_total")
    if opted_in:
        assert refused() == []
        (key,) = forwarded()
        assert key.room_id == room_id
        assert kept is None or kept.get("key_request") == 0
        return
    (withheld,) = refused()
    assert withheld.code == "m.unauthorised"
    # nio never saw the request, so nothing can forward it later. Let the bot run a few more
    # sync rounds, then send a marker after them: whatever the bot sent before the marker has
    # arrived when the marker has.
    received = bot.metrics.get("nio_to_device_total")
    assert received is not None
    before = received.get("plaintext")
    for m in range(3):
        await send_plaintext(intruder, bot.user_id, bot.device_id, "org.example.ping", {"m": m})
    await wait_until(
        lambda: received.get("plaintext") >= before + 3,
        within=T,
        what="the bot's sync loop takes three more pings",
    )
    await bot.outbox.send("org.example.marker", {bot.user_id: {NEW_DEVICE: {"last": True}}})
    await wait_until(
        lambda: any(getattr(e, "event_type_name", "") == "org.example.marker" for e in peer.seen),
        within=T,
        what="the marker reaches the new device",
    )
    assert forwarded() == []
    assert kept is not None and kept.get("key_request") == 1


async def _next_message(bot: Any, peer: Any, room_id: str, opted_in: bool) -> None:
    """The bot's next message: the new device (a member of the room, as the bot's own user is)
    gets the room key only when named; otherwise ``m.unauthorised``."""
    sent = await bot.client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "after the login"}
    )
    assert isinstance(sent, RoomSendResponse), sent
    session_id = bot.client.olm.outbound_group_sessions[room_id].id

    def keys() -> list[RoomKey]:
        return [e for e in peer.seen if isinstance(e, RoomKey) and e.session_id == session_id]

    def refused() -> list[RoomKeyWithheld]:
        return [
            e for e in peer.seen if isinstance(e, RoomKeyWithheld) and e.session_id == session_id
        ]

    await wait_until(
        lambda: bool(keys() or refused()), within=T, what="the new device hears of the session"
    )
    if opted_in:
        assert len(keys()) == 1 and refused() == []
    else:
        assert [e.code for e in refused()] == ["m.unauthorised"]
        assert keys() == []
