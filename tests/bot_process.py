"""The bot as a library user runs it, against the real Synapse, for the key-sharing tests.

:class:`BotProcess` is one run of the whole bot_toolkit stack on a real nio ``AsyncClient``
built through :class:`bot_toolkit.BotToolkit` (store, outbox over HTTP, dispatcher, nio plugin,
key sharing); stopping and starting it again on
the same data directory is a process restart. The claim backoff runs on a
:class:`tests.fakes.FakeClock`.
:func:`room_with` makes an encrypted room that a :class:`tests.raw_device.RawDevice` peer shares
with the bot. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from nio import AsyncClient, AsyncClientConfig, RoomSendResponse, SyncResponse
from nio.store.models import OlmSessions

from bot_toolkit import BotToolkit, Settings
from bot_toolkit.events import ToDeviceEvent, WithheldCode
from bot_toolkit.withheld import SharingPolicy
from tests.fakes import FakeClock
from tests.raw_device import RawDevice
from tests.synapse import LocalSynapse, RegisteredUser

__all__ = ["NO_OLM", "BotProcess", "room_with"]

NO_OLM = WithheldCode.NO_OLM


class BotProcess:
    """One run of the bot: nio client + store + outbox + dispatcher + plugin + key sharing.

    :meth:`stop` then :meth:`start` again on the same ``data_dir`` is a restart: nio reloads its
    crypto store, bot_toolkit its SQLite store.
    """

    def __init__(
        self,
        synapse: LocalSynapse,
        user: RegisteredUser,
        data_dir: Path,
        *,
        policy: SharingPolicy | None = None,
        clock: FakeClock | None = None,
        homeserver: str | None = None,
    ) -> None:
        self.synapse = synapse
        self.homeserver = homeserver or synapse.url  # e.g. a FaultProxy in front of Synapse
        self.user = user
        self.data_dir = data_dir
        self.policy = policy or SharingPolicy(share_with="all")  # type: ignore[arg-type]
        self.clock = clock or FakeClock(time.monotonic())
        self.events: list[ToDeviceEvent] = []

    async def start(self) -> BotProcess:
        nio_dir = self.data_dir / "nio"
        nio_dir.mkdir(parents=True, exist_ok=True)
        config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
        self.client = AsyncClient(
            self.homeserver,
            self.user.user_id,
            device_id=self.user.device_id,
            store_path=str(nio_dir),
            config=config,
        )
        self.client.restore_login(self.user.user_id, self.user.device_id, self.user.access_token)
        self.toolkit = BotToolkit(
            self.client,
            self.data_dir,
            key_sharing=self.policy,
            settings=Settings(drain_timeout=5.0),
            clock=self.clock,
        )

        @self.toolkit.on(ToDeviceEvent)
        async def collect(event: ToDeviceEvent) -> None:
            self.events.append(event)

        await self.toolkit.start()
        self.metrics = self.toolkit.metrics
        self.dispatcher = self.toolkit.dispatcher
        self.store = self.toolkit.store
        self.outbox = self.toolkit.outbox
        self.plugin = self.toolkit.plugin
        self.sharing = self.toolkit.key_sharing
        assert isinstance(await self.client.sync(timeout=0, full_state=True), SyncResponse)
        return self

    async def stop(self) -> None:
        await self.toolkit.close()

    async def restart(self) -> BotProcess:
        await self.stop()
        return await self.start()

    async def refresh(self, poll_ms: int = 0) -> None:
        """One sync, then a key query if nio wants one (as ``sync_forever`` would)."""
        assert isinstance(await self.client.sync(timeout=poll_ms), SyncResponse)
        if self.client.should_query_keys:
            await self.client.keys_query()
        await self.dispatcher_idle()

    async def dispatcher_idle(self, within: float = 30.0) -> None:
        """Wait (bounded) until the handlers have finished what the last sync fed them, and
        key sharing's background tasks too, both at the same time (either can make work for
        the other).
        """
        async with asyncio.timeout(within):
            while True:
                assert await self.dispatcher.join()
                if not self.sharing.idle:
                    await self.sharing.join()
                elif await self.dispatcher.join(timeout=0):
                    return

    async def say(self, room_id: str, text: str) -> None:
        """``room_send`` a text message; waits until the outbox has delivered what it queued."""
        res = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}
        )
        assert isinstance(res, RoomSendResponse), res
        assert await self.outbox.flush(10.0)

    def sent(self, code: str = NO_OLM) -> float:
        counter = self.metrics.get("withheld_sent_total")
        return 0.0 if counter is None else counter.get(code)

    def suppressed(self, code: str = NO_OLM) -> float:
        counter = self.metrics.get("withheld_suppressed_total")
        return 0.0 if counter is None else counter.get(code)

    def discard_session(self, curve25519: str) -> None:
        """Forget every Olm session with a device, in memory and in nio's store (as a client
        does when it replaces a wedged session)."""
        olm: Any = self.client.olm
        olm.session_store._entries.pop(curve25519, None)
        store: Any = self.client.store
        with store.database.bind_ctx(store.models):
            OlmSessions.delete().where(OlmSessions.sender_key == curve25519).execute()


async def room_with(bot: BotProcess, peer: RawDevice) -> str:
    """An encrypted room of the bot that the peer has joined, as both have synced it."""
    room_id = await peer.create_room(invite=[bot.user.user_id])
    await bot.client.join(room_id)
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        await bot.refresh(poll_ms=200)
        room = bot.client.rooms.get(room_id)
        if room is not None and room.encrypted and peer.user_id in room.users:
            return room_id
    raise AssertionError("the bot never saw the peer in the room")
