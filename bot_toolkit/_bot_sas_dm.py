"""Posting the SAS for the person verifying the bot (``verification.post_sas_in_dm``).

An in-room verification gets the SAS in its own room (encrypted there when the room is); a
to-device one in a direct room with the peer user, found or created (unencrypted on purpose,
see :meth:`SasDm.dm_room`). The message is :func:`~bot_toolkit.sas_notice.sas_notice`.

Part of the standalone bot (:mod:`bot_toolkit.bot`); library code never imports it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from nio import AsyncClient

from bot_toolkit._bot_homeserver import Homeserver, describe
from bot_toolkit.metrics import Counter
from bot_toolkit.sas_notice import sas_notice
from bot_toolkit.verification import SasReady
from bot_toolkit.verification.rooms import RoomSender

__all__ = ["SasDm"]

# The bot's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("bot_toolkit.bot")


class SasDm:
    """The :class:`~bot_toolkit.verification.SasReady` handler that posts the SAS.

    ``rooms`` gives the verification manager's in-room sender (None: in-room flows are not
    available). ``posts`` counts by result (``sent``, ``failed``); a failure is logged, never
    raised: the verification goes on without the message.
    """

    def __init__(
        self,
        client: AsyncClient,
        homeserver: Homeserver,
        rooms: Callable[[], RoomSender | None],
        posts: Counter,
    ) -> None:
        self.client = client
        self.homeserver = homeserver
        self._rooms = rooms
        self._dm_rooms: dict[str, str] = {}
        self._m_dm = posts

    async def __call__(self, event: SasReady) -> None:
        try:
            rooms = self._rooms()
            if event.room_id is not None and rooms is not None:
                # An in-room flow: the SAS goes into the flow's own room (encrypted there
                # when the room is).
                room_id = event.room_id
                await rooms.send(room_id, "m.room.message", sas_notice(event))
            else:
                room_id = await self.dm_room(event.user_id)
                await self._send_message(room_id, sas_notice(event))
        except Exception as e:
            self._m_dm.inc("failed")
            log.warning("could not post the SAS to %s: %s", event.user_id, describe(e))
            return
        self._m_dm.inc("sent")
        log.info("posted the SAS of %s to %s in %s", event.transaction_id, event.user_id, room_id)

    async def dm_room(self, user_id: str) -> str:
        """An unencrypted room with just us and ``user_id`` (found, or created with an invite).

        Unencrypted on purpose: the peer's device is not verified yet, so a Megolm key would be
        withheld from it. The SAS is not secret (it is meant to be shown).
        """
        client = self.client
        known = self._dm_rooms.get(user_id)
        if known is not None:
            return known
        for room in client.rooms.values():
            members = set(room.users) | set(getattr(room, "invited_users", {}))
            if not room.encrypted and members == {client.user_id, user_id}:
                self._dm_rooms[user_id] = room.room_id
                return str(room.room_id)
        body = {"preset": "trusted_private_chat", "is_direct": True, "invite": [user_id]}
        status, data = await self.homeserver.request(
            "POST", "/_matrix/client/v3/createRoom", body, token=client.access_token
        )
        if status != 200 or not isinstance(data.get("room_id"), str):
            raise RuntimeError(f"createRoom answered {status} {data.get('errcode', '')}")
        room_id: str = data["room_id"]
        self._dm_rooms[user_id] = room_id
        return room_id

    async def _send_message(self, room_id: str, content: dict[str, Any]) -> None:
        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/m.room.message/"
            f"{secrets.token_hex(12)}"
        )
        status, data = await self.homeserver.request(
            "PUT", path, content, token=self.client.access_token
        )
        if status != 200:
            raise RuntimeError(f"send answered {status} {data.get('errcode', '')}")
