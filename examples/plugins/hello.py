# hello.py
from dataclasses import dataclass

from bot_toolkit import Command, Plugin, RoomMessage, VerificationDone


@dataclass(frozen=True)
class Config:  # optional; [plugins.hello] is checked against it
    greeting: str = "hello"


def setup(plugin: Plugin[Config]) -> None:
    @plugin.command("hello")  # "!hello world"
    async def hello(msg: RoomMessage, cmd: Command) -> None:
        await plugin.reply(msg, f"{plugin.config.greeting}, {cmd.text or msg.sender}")

    @plugin.on(RoomMessage)  # every text, notice and emote message
    async def seen(msg: RoomMessage) -> None:
        plugin.log.info(
            "%s in %s (encrypted: %s, trust: %s)",
            msg.sender,
            msg.room_id,
            msg.encrypted,
            msg.sender_trust,
        )

    @plugin.on(VerificationDone)
    async def verified(event: VerificationDone) -> None:
        plugin.log.info("verified %s %s", event.user_id, event.device_id)

    @plugin.on_start  # once logged in, before the first sync; plugin.client works
    async def start() -> None: ...

    @plugin.on_stop  # at shutdown, after the dispatcher has drained
    async def stop() -> None: ...
