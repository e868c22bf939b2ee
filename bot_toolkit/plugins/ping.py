"""The example plugin: ``!ping`` answers ``pong``, and every finished verification is logged.

Enable it with::

    [plugins]
    modules = ["bot_toolkit.plugins.ping"]

    [plugins.ping]          # optional
    answer = "pong"

In an encrypted room the answer is encrypted (the room key goes to the devices the ``[keys]``
policy allows). ``!ping some text`` answers ``pong some text``; the log line also says whether
the bot trusts the device the command came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot_toolkit import Command, Plugin, RoomMessage, VerificationDone

__all__ = ["Config", "setup"]


@dataclass(frozen=True, slots=True)
class Config:
    """``[plugins.ping]``."""

    answer: str = "pong"
    """What ``!ping`` answers (followed by the command's text, if any)."""


def setup(plugin: Plugin[Config]) -> None:
    """Register ``!ping`` and the verification logger."""

    @plugin.command("ping")
    async def ping(msg: RoomMessage, cmd: Command) -> None:
        text = f"{plugin.config.answer} {cmd.text}".strip()
        await plugin.reply(msg, text)
        plugin.log.info(
            "answered ping %s in %s from %s (encrypted: %s, device trust: %s)",
            msg.event_id,
            msg.room_id,
            msg.sender,
            msg.encrypted,
            msg.sender_trust,
        )

    @plugin.on(VerificationDone)
    async def verified(event: VerificationDone) -> None:
        plugin.log.info(
            "verification %s done: %s device %s is verified",
            event.transaction_id,
            event.user_id,
            event.device_id,
        )
