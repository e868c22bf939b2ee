"""A device with malformed keys is skipped, never fatal for its user, its room or the bot.

Against the real Synapse, which accepts a device whose ed25519 key is not a curve point (or
whose curve25519 key is not 32 bytes). nio 0.26 raised out of the whole key query for the first
(so the user's valid device was refused verification) and a send to a room holding such a
device raised (so nobody got the message). Here, with Alice's second device broken:

* the bot's encrypted message to the room arrives and decrypts on Alice's valid device and on
  Bob's, and the broken device is not in the bot's device store (counted as skipped);
* Alice's valid device verifies the bot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nio import JoinResponse, RoomCreateResponse, RoomMessageText, RoomSendResponse

from bot_toolkit.verification import VerificationDone, VerificationPolicy
from bot_toolkit.withheld import SharingPolicy
from tests.nio_helpers import close_clients, make_client, sync_until, wait_until
from tests.raw_device import RawDevice
from tests.synapse import LocalSynapse
from tests.test_verification_encrypted import running_peer
from tests.verification_helpers import auto_confirm, running_bot

pytestmark = [pytest.mark.synapse, pytest.mark.timeout(180)]

T = 30.0
BAD_ED25519 = "AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
BAD_CURVE25519 = "c2hvcnQ"
ENCRYPTION = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


async def _broken_device(synapse: LocalSynapse, user: Any, which: str) -> RawDevice:
    """A second device of ``user`` whose uploaded ``which`` key is malformed."""
    # Its id sorts first, so nio 0.26 met it before the valid device (Synapse lists devices
    # in id order) and lost that one too.
    login = await asyncio.to_thread(synapse.login, user.user_id, user.password, "0BROKEN")
    device = RawDevice(synapse.url, user.user_id, login.access_token, login.device_id)
    keys = device.device_keys()
    bad = BAD_ED25519 if which == "ed25519" else BAD_CURVE25519
    keys["keys"][f"{which}:{device.device_id}"] = bad
    await device.request("POST", "/_matrix/client/v3/keys/upload", {"device_keys": keys})
    return device


def _messages(client: Any) -> list[str]:
    bodies: list[str] = []

    async def on_message(room: Any, event: RoomMessageText) -> None:
        bodies.append(event.body)

    client.add_event_callback(on_message, RoomMessageText)
    return bodies


@pytest.mark.parametrize("which", ["ed25519", "curve25519"])
async def test_a_broken_device_breaks_nothing(
    synapse: LocalSynapse, tmp_path: Path, which: str
) -> None:
    alice_user = await asyncio.to_thread(synapse.register)
    alice = await make_client(synapse, tmp_path, alice_user)
    bob = await make_client(synapse, tmp_path)
    broken = await _broken_device(synapse, alice_user, which)
    policy = VerificationPolicy(allowed_users=[alice.user_id], confirm=auto_confirm())
    sharing = SharingPolicy(share_with="all")  # type: ignore[arg-type]
    try:
        async with running_bot(synapse, tmp_path, policy=policy, key_sharing=sharing) as bot:
            created = await bot.client.room_create(
                invite=[alice.user_id, bob.user_id], initial_state=[ENCRYPTION]
            )
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            for client in (alice, bob):
                assert isinstance(await client.join(room_id), JoinResponse)
            await wait_until(
                lambda: (
                    {alice.user_id, bob.user_id}
                    <= set(getattr(bot.client.rooms.get(room_id), "users", {}))
                ),
                within=T,
                what="the bot sees both members",
            )
            alice_got, bob_got = _messages(alice), _messages(bob)
            sent = await bot.client.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": "still here"}
            )
            assert isinstance(sent, RoomSendResponse), sent
            for client, got in ((alice, alice_got), (bob, bob_got)):
                await sync_until(
                    client, lambda got=got: "still here" in got, within=T, what="decrypted"
                )
            # The broken device was skipped (and counted), never given the key.
            devices = bot.client.device_store[alice.user_id]
            assert alice.device_id in devices and broken.device_id not in devices
            skipped = bot.metrics.get("nio_devices_skipped_total")
            assert skipped is not None and skipped.get(f"invalid {which} key") >= 1
            session = bot.client.olm.outbound_group_sessions[room_id]
            assert (alice.user_id, broken.device_id) not in session.users_shared_with
            assert (alice.user_id, alice.device_id) in session.users_shared_with

            # Alice's valid device verifies the bot.
            peer_policy = VerificationPolicy(allowed_users=[bot.user_id], confirm=auto_confirm())
            async with running_peer(alice, peer_policy, tmp_path / "peer") as peer:
                txn = await peer.manager.request_verification(bot.user_id, bot.device_id)
                outcome = await peer.manager.wait_finished(txn, T)
                assert isinstance(outcome, VerificationDone), outcome
            assert bot.client.device_store[alice.user_id][alice.device_id].verified
    finally:
        await broken.close()
        await close_clients(alice, bob)
