"""What the plugin tests (``bot-toolkit run`` and the container) do from a user's nio client:
make an encrypted room the bot joins, and ask the bot something and wait for its decrypted answer.

The client must be syncing (:func:`tests.nio_helpers.syncing`). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nio import AsyncClient, JoinedMembersResponse, RoomMessageNotice, RoomSendResponse

from tests.nio_helpers import wait_until

__all__ = ["Replies", "room_with_bot"]

T = 60.0


async def room_with_bot(user: AsyncClient, bot_id: str, *, within: float = T) -> str:
    """An encrypted room the user made and the bot joined (the bot joins allowed inviters),
    once the user's client knows the bot's device keys."""
    encryption = {
        "type": "m.room.encryption",
        "state_key": "",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"},
    }
    created = await user.room_create(invite=[bot_id], initial_state=[encryption])
    room_id: str = created.room_id  # type: ignore[union-attr]
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        members = await user.joined_members(room_id)
        if isinstance(members, JoinedMembersResponse) and bot_id in {
            m.user_id for m in members.members
        }:
            await wait_until(
                lambda: bot_id in user.rooms[room_id].users and user.rooms[room_id].encrypted,
                within=within,
                what="the user's client sees the bot in the encrypted room",
            )
            # nio's room_send shares the room key only with devices it already knows (it
            # queries keys itself only while the member list is unsynced): wait until the
            # syncing client has queried the bot's device keys, or the bot could not decrypt.
            await wait_until(
                lambda: any(True for _ in user.device_store.active_user_devices(bot_id)),
                within=within,
                what="the user's client knows the bot's device keys",
            )
            return room_id
        await asyncio.sleep(0.2)
    raise AssertionError("the bot never joined")


class Replies:
    """The bot's decrypted answers (m.notice) the user's client receives, by replied-to id."""

    def __init__(self, client: AsyncClient, bot_id: str) -> None:
        self.by_target: dict[str, RoomMessageNotice] = {}
        self.bot_id = bot_id
        client.add_event_callback(self._on_notice, RoomMessageNotice)

    async def _on_notice(self, room: Any, event: RoomMessageNotice) -> None:
        relates = event.source.get("content", {}).get("m.relates_to", {})
        target = relates.get("m.in_reply_to", {}).get("event_id")
        if event.sender == self.bot_id and isinstance(target, str):
            self.by_target[target] = event

    async def ask(
        self, client: AsyncClient, room_id: str, body: str, *, within: float = T
    ) -> RoomMessageNotice:
        sent = await client.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            ignore_unverified_devices=True,
        )
        assert isinstance(sent, RoomSendResponse), sent
        await wait_until(
            lambda: sent.event_id in self.by_target, within=within, what=f"an answer to {body!r}"
        )
        return self.by_target[sent.event_id]
