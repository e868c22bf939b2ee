"""Exclude insecure devices (spec v1.18 "Recommended client behaviour", MSC4153), end to end.

A matrix-js-sdk 43 peer (Rust crypto, the engine inside Element) in
``OnlySignedDevicesIsolationMode`` shares an encrypted room with the standalone bot (run
in-process, ``keys.share_with = "cross_signed"``):

* identity on: the peer's message reaches the bot's handler decrypted, and the bot's reply
  decrypts on the peer with no red shield;
* identity off (the same test, ``[identity] enabled = false``): the bot's device is not
  cross-signed, so the peer withholds its room key with ``m.unverified`` and the bot's handler
  never sees the text. This shows the first case proves something.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nio import LocalProtocolError, MegolmEvent, RoomMessageText, RoomSendResponse

from bot_toolkit.bot import Bot
from bot_toolkit.config import load_config
from bot_toolkit.events import RoomKeyWithheld
from bot_toolkit.identity import IdentityState
from bot_toolkit.room_messages import SenderTrust
from tests.bot_helpers import new_admin_token, write_config
from tests.interop_peer import JsPeer, require_node_peer, started_peer
from tests.synapse import LocalSynapse, RegisteredUser, free_port

pytestmark = [pytest.mark.synapse, pytest.mark.interop, pytest.mark.timeout(300)]

T = 60.0


async def _until(what: str, check: Any, within: float = T) -> Any:
    """Poll ``check()`` (sync) until truthy; bounded."""
    try:
        async with asyncio.timeout(within):
            while True:
                if value := check():
                    return value
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def running_bot(
    tmp_path: Path, synapse: LocalSynapse, user: RegisteredUser, *, identity: bool
) -> AsyncIterator[Bot]:
    config_path = write_config(
        tmp_path / "bot.toml",
        homeserver=synapse.url,
        user_id=user.user_id,
        data_dir=tmp_path / "data",
        port=free_port(),
        admin_token=new_admin_token(),
    )
    with config_path.open("a") as f:
        f.write(
            '\n[keys]\nshare_with = "cross_signed"\n'
            f"\n[identity]\nenabled = {'true' if identity else 'false'}\n"
        )
    config = load_config(config_path, {"BOT_TOOLKIT_PASSWORD": user.password})
    bot = Bot(config, install_signal_handlers=False)
    task = asyncio.create_task(bot.run())
    try:
        async with asyncio.timeout(T):
            ready = asyncio.create_task(bot.ready.wait())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()
                raise AssertionError("the bot stopped before its first sync")
        yield bot
    finally:
        bot.stop()
        async with asyncio.timeout(T):
            assert await task == 0


async def _send(bot: Bot, room_id: str, body: str) -> None:
    """``room_send`` from the bot (retried while the sync loop holds the key query)."""
    assert bot.client is not None
    async with asyncio.timeout(T):
        while True:
            try:
                resp = await bot.client.room_send(
                    room_id, "m.room.message", {"msgtype": "m.text", "body": body}
                )
            except LocalProtocolError:
                await asyncio.sleep(0.2)
                continue
            assert isinstance(resp, RoomSendResponse), resp
            return


@pytest.mark.parametrize("identity", [True, False], ids=["identity-on", "identity-off"])
async def test_peer_excluding_insecure_devices(
    synapse: LocalSynapse, tmp_path: Path, identity: bool
) -> None:
    require_node_peer()
    bot_user = await asyncio.to_thread(synapse.register)
    peer: JsPeer = await started_peer(synapse, f"isolation-{identity}", timeout=T)
    try:
        await peer.bootstrap_cross_signing()  # the peer's own device is cross-signed
        await peer.set_isolation_mode("only_signed")
        async with running_bot(tmp_path, synapse, bot_user, identity=identity) as bot:
            assert bot.client is not None and bot.toolkit is not None
            texts: list[tuple[str, str]] = []
            sender_keys: list[str] = []
            undecrypted: list[MegolmEvent] = []
            withheld: list[RoomKeyWithheld] = []

            async def on_text(room: Any, event: RoomMessageText) -> None:
                texts.append((event.sender, event.body))
                sender_keys.append(event.sender_key)

            async def on_megolm(room: Any, event: MegolmEvent) -> None:
                undecrypted.append(event)

            async def on_withheld(event: RoomKeyWithheld) -> None:
                withheld.append(event)

            bot.client.add_event_callback(on_text, RoomMessageText)
            bot.client.add_event_callback(on_megolm, MegolmEvent)
            bot.toolkit.dispatcher.register(RoomKeyWithheld, on_withheld)
            if identity:
                await _until(
                    "bot cross-signed",
                    lambda: (
                        bot.identity is not None
                        and bot.identity.identity.state is IdentityState.CROSS_SIGNED
                    ),
                )

            room_id = await peer.create_room([bot_user.user_id])
            await peer.wait_membership(room_id, bot_user.user_id, timeout=T)
            await peer.download_keys(bot_user.user_id, bot.client.device_id, timeout=T)
            status = await peer.device_status(bot_user.user_id, bot.client.device_id)
            assert status["signed_by_owner"] is identity
            await peer.call("send_text", room_id=room_id, body="hello bot")

            if not identity:
                # the peer withholds its room key from the bot's unsigned device
                got = await _until(
                    "m.unverified from the peer",
                    lambda: [w for w in withheld if w.code == "m.unverified"],
                )
                assert got[0].room_id == room_id
                await _until("the undecryptable message", lambda: undecrypted)
                assert not [t for t in texts if t[1] == "hello bot"]
                return

            await _until("the decrypted text", lambda: texts)
            assert (peer.user_id, "hello bot") in texts
            assert not withheld
            # what a handler is told about the sending device: cross-signed by its owner
            trust = await bot.toolkit.sender_trust.sender_trust(
                str(peer.user_id), sender_keys[0], verified=False
            )
            assert trust is SenderTrust.CROSS_SIGNED

            await _send(bot, room_id, "hello peer")
            reply = await peer.wait_event(
                "room_event",
                lambda e: e.get("room_id") == room_id and e.get("body") == "hello peer",
                timeout=T,
            )
            info = await peer.encryption_info(room_id, reply["event_id"])
            assert info["encrypted"] is True and info["decryption_failure"] is None
            assert info["shield"] != "red", info
            assert info["shield"] == "none", info
    finally:
        await peer.close()
